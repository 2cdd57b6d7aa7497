"""The coordinator: drives one job step by step on Ray.

It starts the job's parameter server(s) and gradient workers, assigns logical
shards to workers, and runs each step as a small graph of actor calls —
workers compute shard gradients from the published parameters, the servers
reduce and apply them — without the data ever passing through it (compiled
to shared-memory channels when every actor is on its node, in a Ray instance
this process started). It keeps
up to `pipeline_depth` steps in flight, so no driver round trip sits on the
critical path, and reads each step's statistics as they complete: loss,
samples/s, time per phase, evaluations and checkpoints.

When a worker or a server dies it restarts what is missing and submits the
lost steps again (from the latest checkpoint for a server); the arithmetic is
fixed by the step and the shard, so the result is the same bits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayChannelError, RayTaskError

from core.mlp import MLP
from core.spec import JobSpec, checkpoint_key, load_spec
from core.trainer import (NonFiniteGuard, ShardedData, TrainingError, build_network, evaluate,
                          should_evaluate, step_record)
from workers import shared
from workers.checkpoint import Checkpoint, latest_checkpoint, write_checkpoint
from workers.gradient_worker import GradientWorker
from workers.parameter_server import ParameterServer, slice_bounds
from workers.runtime import connect_ray, run_at_low_priority, started_here

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 300.0
CANCEL_GRACE_S = 5.0
HANGS_PER_STEP = 3  # a step (or async update) that hangs this often fails the job
PROBE_TIMEOUT_S = 5.0  # how long a worker may take to say whether it is computing
LOSSES_PER_STEP = 5  # a sync step, or an async shard batch, whose actors die this often fails the job


class JobCancelled(Exception):
    """The job was cancelled; its actors are gone and its CPUs free."""


class ActorLost(Exception):
    """An actor of the job died; `servers` says whether a parameter server did."""

    def __init__(self, servers: bool, detail: str):
        super().__init__(detail)
        self.servers = servers


@dataclass
class Counters:
    """Failure and recovery accounting that the service exports as metrics."""

    worker_failures: int = 0
    server_failures: int = 0
    recoveries: int = 0
    steps_replayed: int = 0
    recovery_seconds: float = 0.0
    nonfinite_skipped: int = 0
    damaged_checkpoints: int = 0
    hung_workers: int = 0  # workers killed for exceeding resources.worker_timeout_s (also in worker_failures)
    stale_rejected: int = 0  # async: gradients refused for exceeding max_staleness
    staleness: list = field(default_factory=list)  # async: staleness of each applied update
    nodes: set = field(default_factory=set)


def join_optimizer_states(states: list[dict], sizes: list[int]) -> dict:
    """One optimizer state from k slices: per-element arrays are joined,
    scalars (step counts) are the same on every slice and kept once."""
    joined = {}
    for key in states[0]:
        parts = [s[key] for s in states]
        if parts[0].ndim == 1 and [p.size for p in parts] == sizes:
            joined[key] = np.concatenate(parts)
        else:
            joined[key] = parts[0]
    return joined


def split_optimizer_state(state: dict | None, bounds: list[tuple[int, int]], size: int) -> list[dict | None]:
    if not state:
        return [None] * len(bounds)
    return [{k: (v[a:b] if v.ndim == 1 and v.size == size else v) for k, v in state.items()}
            for a, b in bounds]


class Coordinator:
    def __init__(self, spec: JobSpec | dict | str | Path, checkpoint_dir: str | Path, *,
                 data_roots: list[str | Path] | None = None, job_id: str | None = None,
                 on_step: Callable[[dict], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 faults: dict[int, dict] | None = None, pipeline_depth: int = 2):
        self.spec = load_spec(spec)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.data_roots = [str(r) for r in data_roots] if data_roots else None
        self.job_id = job_id or self.spec.name
        self.on_step = on_step or (lambda record: None)
        self.on_event = on_event or (lambda kind, detail: None)
        self.faults = faults or {}  # worker index -> knobs (see GradientWorker); tests and benchmarks only
        self.pipeline_depth = max(1, pipeline_depth)
        self.counters = Counters()
        self.step = 0  # highest version reported; never goes backwards
        self._cancelled = threading.Event()
        self._target_workers = self.spec.resources.workers
        self._lock = threading.Lock()
        self.workers: list = []
        self._worker_indices: list[int] = []  # each worker's index (its fault knobs and its name in errors)
        self.locations: dict[int, dict] = {}  # worker index -> node ID and pid, for operators and tests
        self.servers: list = []
        self._graph = None  # the step graph over the current actors (CompiledStep or InterpretedStep)
        # Parameters and gradients in shared files while the graph is compiled (workers.shared).
        self.shared_root = shared.DEFAULT_ROOT
        self._shared_dir: Path | None = None  # this job's directory there, made on first use
        self._job_shared_dir: str | None = None  # what the current graph's jobs use (None: arrays in channels)
        self._last_done = time.perf_counter()
        self._arrivals: deque = deque(maxlen=9)  # arrival times of the last steps' results
        self._next_worker_index = 0
        self._no_capacity_at = 0.0
        # Sync: when the wait for the oldest step in flight began, and that step (see _watchdog).
        self._wait_lock = threading.Lock()
        self._waiting_since: float | None = None
        self._waiting_step = 0
        self._hangs: dict[tuple, int] = {}  # sync step or async (shard, batch) -> how often it hung
        self._losses: dict[tuple, int] = {}  # sync step or async (shard, batch) -> how often its actors died
        self._given_up: TrainingError | None = None  # set by the watchdog when a step hung HANGS_PER_STEP times
        self.applied_batches: list[tuple[int, int]] = []  # async: (shard, batch) of every applied update, in order
        self._resumed_taken: list[int] | None = None  # async: per shard, batches applied, from the checkpoint
        self._killed_for_hang = False  # sync: the watchdog's kill, so that _recover counts a hang, not a loss

    # ----------------------------------------------------------- control

    @property
    def required_cpus(self) -> int:
        return self.spec.resources.workers * self.spec.resources.cpus_per_worker

    def cancel(self) -> None:
        """Stop at the next step boundary. A compiled step cannot be
        interrupted, so if the job has not stopped CANCEL_GRACE_S later (a
        hung worker), its workers are killed, which ends the step at once."""
        self._cancelled.set()
        timer = threading.Timer(CANCEL_GRACE_S, self._kill_workers_if_still_running)
        timer.daemon = True
        timer.start()

    def _kill_workers_if_still_running(self) -> None:
        if self._graph is not None:
            for w in list(self.workers):
                _kill(w)

    def resize(self, workers: int) -> None:
        """Use `workers` gradient workers from the next step boundary on."""
        shards = self.spec.data.shards
        if not isinstance(workers, int) or not 1 <= workers <= shards:
            raise ValueError(f"workers must be in [1, {shards}] (data.shards), got {workers!r}")
        with self._lock:
            self._target_workers = workers

    @property
    def worker_locations(self) -> list[dict]:
        """Node ID, pid and pinned cores (None: not pinned) of each live worker, in worker order."""
        return [self.locations[i] for i in self._worker_indices]

    # ----------------------------------------------------------- running

    def run(self, resume: bool = False) -> MLP:
        """Train to the end; returns the trained network."""
        connect_ray(None, self.spec.resources.workers)
        spec = self.spec
        # Loading the data here checks it before any actor starts, and gives the
        # initial network; the workers load their own copies.
        self.data = data = ShardedData.from_spec(spec, self.data_roots)
        self.net = net = build_network(spec, data.dataset)
        start, optimizer_state = 0, None
        self.guard = NonFiniteGuard(spec.training.max_nonfinite_steps)
        if resume:
            ckpt = self._latest_checkpoint()
            if ckpt is not None:
                net.params[:] = ckpt.params
                start, optimizer_state = ckpt.step, ckpt.optimizer
                self._take_counters(ckpt)
                self._resumed_taken = ckpt.counters.get("async_taken")
                self.on_event("resumed", {"step": start})
        self.step = start
        try:
            if start == 0:
                self._write_checkpoint(0, net.params, None)
            self._start_servers(net.params, start, optimizer_state)
            self._start_workers(self._target_workers)
            self._last_done = time.perf_counter()
            if spec.training.mode == "sync":
                with self._watchdog():
                    params_refs = run_at_low_priority(self._train, start)
            else:
                params_refs = self._train_async(start)
            net.params[:] = self._fetch(params_refs)
            final_state = ray.get([s.state.remote() for s in self.servers])
            self._write_checkpoint(spec.training.steps, net.params, final_state)
            return net
        finally:
            self._shutdown()

    @contextmanager
    def _watchdog(self):
        """Sync mode: while no step result comes for `worker_timeout_s`, the
        workers that hang are found (see _hung_workers) and killed. The step then fails like
        one whose workers died, and is recovered from the same way. The lock
        makes the kill part of the wait it timed: a result that arrives
        meanwhile is only taken once the kill is done, and nothing changes the
        workers while the coordinator waits."""
        limit = self.spec.resources.worker_timeout_s
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(min(1.0, limit / 4)):
                with self._wait_lock:
                    since = self._waiting_since
                    if since is None or time.monotonic() - since <= limit:
                        continue
                    self._waiting_since = None
                    hung = self._hung_workers(limit)
                    step = self._waiting_step
                    # counted before the kill, so that _lost sees a third hang
                    event = self._count_hang([i for i, _ in hung], step, [(("step", step), f"step {step}")])
                    self._killed_for_hang = True
                    for _, actor in hung:
                        _kill(actor)
                try:
                    self.on_event("hung", event)
                except Exception:  # an on_event callback's error must not end the watch
                    log.exception("job %s: reporting hung workers", self.job_id)

        thread = threading.Thread(target=watch, name="shardprop-watchdog", daemon=True) if limit > 0 else None
        if thread is not None:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(5)

    def _hung_workers(self, limit: float) -> list:
        """(index, actor) of the workers that hang, as the step graph finds
        them; every worker when none does (the servers or the transfers hang)."""
        workers = list(zip(self._worker_indices, self.workers))
        positions = self._graph.hung(self._waiting_step - 1, limit) if self._graph is not None else []
        return [workers[i] for i in positions if i < len(workers)] or workers

    def _train(self, start: int) -> list:
        """Sync mode: every step runs through the job's step graph, up to
        `pipeline_depth` steps in flight. Returns refs to the final parameters."""
        steps = self.spec.training.steps
        step = start
        while step < steps:
            self._check_cancelled()
            change = self._wanted_worker_count()
            if change is not None:
                self._close_graph()
                self._resize_now(change)
                continue
            graph = self._graph or self._compile_graph()
            pending: deque = deque()
            try:
                while step < steps or pending:
                    while step < steps and len(pending) < self.pipeline_depth:
                        job = self._job(step)
                        pending.append((job, graph.execute(job)))
                        step += 1
                    job, ref = pending[0]
                    stats = self._graph_result(ref, job["step"])
                    pending.popleft()
                    self._finish_step(job, stats)
                    if self._cancelled.is_set() or (step < steps and self._wanted_worker_count() is not None):
                        step = self._drain(pending)
                        break
            except ActorLost as lost:
                step = self._recover(lost, pending[0][0]["step"] if pending else step)
        self._close_graph()
        return [s.publish.remote() for s in self.servers]

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled at step {self.step}")

    def _drain(self, pending: deque) -> int:
        """Finish the steps already in flight (a cancel or a resize waits for a
        step boundary); returns the next step to run."""
        self._check_cancelled()
        while pending:
            job, ref = pending[0]
            stats = self._graph_result(ref, job["step"])  # on a failure the step stays pending: see _recover
            pending.popleft()
            self._finish_step(job, stats)
        return self.step

    def _job(self, step: int) -> dict:
        """The graph's input for one step: which shards each worker computes,
        and whether the servers return parameters (to evaluate) or their state
        (to checkpoint) with the step's statistics."""
        return {"step": step, "assignment": self._assignment_by_index(),
                "params": should_evaluate(self.spec, step), "state": self._should_checkpoint(step),
                "shared_dir": self._job_shared_dir}

    def _assignment_by_index(self) -> dict[int, list[int]]:
        return {index: shards for index, shards in zip(self._worker_indices, self._assignment())}

    def _compile_graph(self):
        """One step as a Ray graph: the servers publish the parameters, every
        worker computes its shards from them, the servers reduce and apply.

        When every actor of the job is on one node of the private Ray instance
        this process started (a local run, the embedded service), the graph is
        compiled to shared-memory channels between the actors, with no task
        submission per step and never through this driver, and the parameters
        and gradients themselves go through shared files (workers.shared),
        only handles through the channels (measured here: a 2-worker step's
        overhead over its compute fell from ~9 ms to ~1.8 ms). Otherwise the
        same graph runs as ordinary actor calls whose arguments are object
        refs, still without a driver round trip inside a step. Ray 2.60's
        compiled graphs are experimental, and only in instances of our own have
        they held: across nodes their channels crashed a raylet on teardown
        here, and a service attached to a one-node `ray start` cluster failed
        two CI runs out of three, the last with its compiled step waiting for
        good (cause not found; the process then outlived SIGKILL)."""
        nodes = {loc["node_id"] for loc in ray.get([s.location.remote() for s in self.servers])}
        nodes |= {self.locations[i]["node_id"] for i in self._worker_indices}
        nodes.add(ray.get_runtime_context().get_node_id())  # the driver reads and writes channels too
        self._job_shared_dir = None
        if len(nodes) == 1 and started_here():
            self._job_shared_dir = self._shared_arrays_dir()
            with InputNode() as job:
                out = step_graph(self.servers, self.workers, job, lambda method, *args: method.bind(*args))
                if isinstance(out, list):
                    out = MultiOutputNode(out)
            self._graph = CompiledStep(out.experimental_compile(_max_inflight_executions=self.pipeline_depth + 1),
                                       self.workers)
        else:
            self._graph = InterpretedStep(self.servers, self.workers)
        self.on_event("graph", {"transport": self._graph.transport, "nodes": len(nodes), "step": self.step,
                                "zero_copy": self._job_shared_dir is not None})
        return self._graph

    def _shared_arrays_dir(self) -> str | None:
        """This job's directory for shared parameters and gradients (made once;
        None when the memory file system lacks the room: arrays then go
        through the channels)."""
        if self._shared_dir is None:
            t = self.spec.training
            size = self.net.params.size * np.dtype(t.dtype).itemsize
            # the servers' parameters and one row per shard, twice over for
            # workers replaced after a failure
            self._shared_dir = shared.make_job_dir(size * (1 + 2 * self.spec.data.shards), self.shared_root)
        return str(self._shared_dir) if self._shared_dir is not None else None

    def _close_graph(self) -> None:
        """Tear the step graph down, leaving its actors alive and callable."""
        graph, self._graph = self._graph, None
        if graph is not None:
            graph.close()

    def _graph_result(self, ref, step: int) -> dict:
        """A step's statistics (the servers' joined when there are several).

        A worker's or server's error ends the job with its message; a dead
        actor is recovered from."""
        with self._wait_lock:  # see _watchdog
            self._waiting_since, self._waiting_step = time.monotonic(), step + 1
        try:
            try:
                out = self._graph.result(ref, self._cancelled)
            finally:
                with self._wait_lock:
                    self._waiting_since = None
        except JobCancelled:
            raise JobCancelled(f"job {self.job_id} cancelled at step {self.step}") from None
        except RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            if isinstance(cause, (RayActorError, RayChannelError)):
                raise self._lost(err) from None
            raise TrainingError(str(cause).strip()) from None
        except (RayActorError, RayChannelError, ValueError) as err:
            raise self._lost(err) from None
        if isinstance(out, list):
            stats = dict(out[0])
            if "params" in stats:
                stats["params"] = np.concatenate([o["params"] for o in out])
            if "state" in stats:
                stats["state"] = [o["state"] for o in out]
            stats["reduce_apply_s"] = max(o["reduce_apply_s"] for o in out)
            return stats
        if "state" in out:
            out["state"] = [out["state"]]
        return out

    def _lost(self, err: Exception) -> Exception:
        """After a failed step: tear the graph down and find what died."""
        self._close_graph()
        if self._cancelled.is_set():
            return JobCancelled(f"job {self.job_id} cancelled at step {self.step}")
        if self._given_up is not None:
            return self._given_up
        if not self._servers_alive():
            return ActorLost(True, f"a parameter server died after step {self.step}")
        dead = [w for w in self.workers if not _alive(w)]
        if dead:
            return ActorLost(False, f"{len(dead)} worker(s) lost after step {self.step}")
        return TrainingError(f"step {self.step + 1} failed: {err}")

    def _wanted_worker_count(self) -> int | None:
        """The worker count to change to at the next step boundary, if any: a
        resize, or growing back towards the target once lost capacity returns."""
        with self._lock:
            target = self._target_workers
        have = len(self.workers)
        if target <= have:
            return target if target < have else None
        now = time.monotonic()
        if now - self._no_capacity_at < 1.0:  # asking the cluster costs a round trip
            return None
        placeable = self._placeable_workers()
        if placeable <= 0:
            self._no_capacity_at = now
            return None
        return have + min(placeable, target - have)

    def _placeable_workers(self) -> int:
        free = ray.available_resources().get("CPU", 0.0)
        return int(free // self.spec.resources.cpus_per_worker)

    def _train_async(self, start: int) -> list:
        """Async mode: each worker computes one shard at a time on the newest
        parameters it was given and the server applies each shard gradient as
        it arrives, refusing any computed more than `max_staleness` versions
        ago. Not bit-reproducible with several workers: the order of updates
        follows timing.

        No shard batch is ever applied twice or skipped: a batch is only
        marked taken when its update is accepted, and a shard is never given
        to two workers at once (shards move between workers when workers come
        and go). A lost worker is replaced, or its shards go to the
        survivors, and its batch is computed again on the newest parameters.
        A lost server is restored from the latest checkpoint, the updates
        since are made again, and computations made for the old server are
        dropped as they end. With one worker the order of updates is fixed,
        so a failure changes no bit."""
        t = self.spec.training
        run = AsyncRun(self.servers[0].publish.remote(), start, self._async_taken(self._resumed_taken, start), start)
        self._async_submit(run)
        last_done = time.perf_counter()
        while run.version < t.steps:
            self._check_cancelled()
            change = self._wanted_worker_count()
            if change is not None:
                self._resize_now(change)
                self._async_submit(run)
            self._async_replace_hung(run)
            ready, _ = ray.wait(list(run.inflight), num_returns=1, timeout=0.5)
            if not ready:
                continue
            c = run.inflight.pop(ready[0])
            if c.generation != run.generation:  # computed for a server since replaced
                self._async_submit(run)
                continue
            new_params, stats_ref = self.servers[0].push.remote(c.version, t.max_staleness, [ready[0]])
            try:
                stats = ray.get(stats_ref)
                if stats["accepted"]:
                    run.params_ref, run.version = new_params, stats["version"]
                    run.taken[c.shard] += 1
                    run.turns[c.index] = run.turns.get(c.index, 0) + 1
                    self.applied_batches.append((c.shard, c.batch))
                    now = time.perf_counter()
                    self._finish_async_update(run.version - 1, stats, run.params_ref, now - last_done,
                                              len(self.workers), run.taken)
                    last_done = now
                else:
                    self.counters.stale_rejected += 1
            # The order matters: a RayTaskError caused by a dead worker is also a
            # RayActorError (Ray's as_instanceof_cause), a dead server's is not.
            except RayTaskError as err:  # the worker's computation failed
                cause = err.cause if err.cause is not None else err
                if isinstance(cause, RayActorError) or (isinstance(cause, ObjectLostError) and not self._async_alive(c)):
                    self._async_worker_lost(c.index, ("batch", c.shard, c.batch),
                                            f"shard {c.shard}'s batch {c.batch}")
                elif not isinstance(cause, ObjectLostError):  # else: its result was lost, not it: made again
                    raise TrainingError(str(cause).strip()) from None
            except (RayActorError, ObjectLostError):  # the server died: in push, evaluation or checkpoint
                self._async_server_lost(run)
            self._async_submit(run)
        return [run.params_ref]

    def _async_alive(self, c: "Computation") -> bool:
        return c.index in self._worker_indices and _alive(self.workers[self._worker_indices.index(c.index)])

    def _async_submit(self, run: "AsyncRun") -> None:
        """Give a computation to every worker that has none in flight: the next
        of its shards in turn that no other worker is computing (a worker all
        of whose shards are taken waits for the next arrival)."""
        live = set(self._worker_indices)
        for ref in [r for r, c in run.inflight.items() if c.index not in live]:
            del run.inflight[ref]  # a dropped worker's
        busy = {c.index for c in run.inflight.values()}
        computing = {c.shard for c in run.inflight.values() if c.generation == run.generation}
        assignment = self._assignment_by_index()
        for index, actor in zip(self._worker_indices, self.workers):
            if index in busy:
                continue
            own = assignment[index]
            first = run.turns.setdefault(index, run.version)
            free = [own[(first + j) % len(own)] for j in range(len(own))
                    if own[(first + j) % len(own)] not in computing]
            if not free:
                continue
            shard, batch = free[0], run.taken[free[0]]
            ref = actor.compute.remote(batch, [shard], [run.params_ref])
            run.inflight[ref] = Computation(index, shard, batch, run.version, time.monotonic(), run.generation)
            computing.add(shard)

    def _async_replace_hung(self, run: "AsyncRun") -> None:
        """Replace every worker whose computation has taken longer than
        `worker_timeout_s` (one hang, however many workers)."""
        limit = self.spec.resources.worker_timeout_s
        now = time.monotonic()
        hung = [c for c in run.inflight.values() if limit > 0 and now - c.submitted > limit]
        if not hung:
            return
        event = self._count_hang(sorted({c.index for c in hung}), min(c.version for c in hung) + 1,
                                 [(("batch", c.shard, c.batch), f"shard {c.shard}'s batch {c.batch}") for c in hung])
        self.on_event("hung", event)
        if self._given_up is not None:
            raise self._given_up
        for c in hung:
            self._async_worker_lost(c.index, None, "")
        self._async_submit(run)

    def _count_hang(self, workers: list[int], step: int, made: list[tuple[tuple, str]]) -> dict:
        """Count workers declared hung while making `step`, and a hang of each
        piece of work in `made` (a sync step, or async shard batches: (key,
        its name)); a piece's HANGS_PER_STEP-th hang fails the job (the job's
        steps may just be slow). Returns the "hung" event's detail."""
        limit = self.spec.resources.worker_timeout_s
        self.counters.hung_workers += len(workers)
        for key, what in made:
            count = self._hangs[key] = self._hangs.get(key, 0) + 1
            if count >= HANGS_PER_STEP:
                self._given_up = TrainingError(
                    f"{what} hung {count} times: no result within resources.worker_timeout_s ({limit:g} s) "
                    f"with workers started afresh each time; if this job's steps are that slow, raise it")
        return {"step": step, "seconds": limit, "workers": workers}

    def _note_loss(self, key: tuple | None, what: str) -> None:
        """Count a loss of actors while making `key`; the LOSSES_PER_STEP-th
        fails the job (something in it kills them: memory, say)."""
        if key is None:
            return
        count = self._losses[key] = self._losses.get(key, 0) + 1
        if count >= LOSSES_PER_STEP:
            raise TrainingError(f"{what}: actors of the job died {count} times while making it; giving up "
                                "(their logs say why; a batch too large for a worker's memory, say)")

    def _async_worker_lost(self, index: int, key: tuple | None, what: str) -> None:
        if index not in self._worker_indices:
            return  # dropped already
        began = time.perf_counter()
        position = self._worker_indices.index(index)
        self.counters.worker_failures += 1
        self._drop_workers([(index, self.workers[position])])
        del self.workers[position], self._worker_indices[position]
        self._note_loss(key, what)
        self._restart_workers()
        self._recovered(began, self.step, servers=False)

    def _async_server_lost(self, run: "AsyncRun") -> None:
        """Restore the server from the latest checkpoint and go on from there."""
        began = time.perf_counter()
        self.counters.server_failures += 1
        making = run.version + 1
        ckpt = self._restore_servers()
        self._note_loss(("update", making), f"update {making}")
        # the updates after the checkpoint are made again, and recorded again
        del self.applied_batches[max(0, ckpt.step - run.start):]
        run.restart(self.servers[0].publish.remote(), ckpt.step,
                    self._async_taken(ckpt.counters.get("async_taken"), ckpt.step))
        self._recovered(began, ckpt.step, servers=True)

    def _async_taken(self, recorded, version: int) -> list[int]:
        """Per shard, the batches applied by `version`: as a checkpoint
        recorded them, else as if the shards had been taken in turn (right
        for one worker, and for version 0)."""
        S = self.spec.data.shards
        if isinstance(recorded, list) and len(recorded) == S and all(isinstance(n, int) for n in recorded):
            return list(recorded)
        return async_position(version, S)

    def _finish_async_update(self, step: int, stats: dict, params_ref, seconds: float, workers: int,
                             taken: list[int]) -> None:
        applied = stats["skipped"] == 0
        try:
            self.guard.record(step, applied, stats["loss"])
        finally:
            self.counters.nonfinite_skipped = self.guard.skipped
        if step + 1 <= self.step:
            return  # an update made again after the server was restored: already reported
        self.counters.staleness.append(stats["staleness"])
        record = step_record(self.spec, step, stats["loss"], stats["count"], seconds, applied,
                             workers=workers, version=stats["version"], staleness=stats["staleness"],
                             phases={"compute": stats["compute_s"], "reduce_apply": stats["reduce_apply_s"]})
        if should_evaluate(self.spec, step):
            ds = self.data.dataset
            record["val_loss"], record["val_accuracy"] = evaluate(self.net.bind(self._fetch([params_ref])),
                                                                  ds.X_val, ds.y_val)
        if self._should_checkpoint(step):
            state = ray.get(self.servers[0].state.remote())  # pushes are serial: its version is step + 1
            self._write_checkpoint(step + 1, state["params"], [state], {"async_taken": list(taken)})
        self.step = step + 1
        self.on_step(record)

    def _should_checkpoint(self, step: int) -> bool:
        every = self.spec.training.checkpoint_every
        return every > 0 and (step + 1) % every == 0 and step + 1 < self.spec.training.steps

    def _assignment(self) -> list[list[int]]:
        """Shards round-robin over the live workers: shard s to worker s mod W."""
        W = len(self.workers)
        return [list(range(w, self.spec.data.shards, W)) for w in range(W)]

    def _servers_alive(self) -> bool:
        try:
            ray.get([s.publish.remote() for s in self.servers], timeout=30)
            return True
        except (RayActorError, RayTaskError, GetTimeoutError):
            return False

    def _finish_step(self, job: dict, stats: dict) -> None:
        step = job["step"]
        now = time.perf_counter()
        # Results of pipelined steps arrive in bursts, so samples/s is taken over
        # the last few arrivals rather than from one gap.
        if not self._arrivals:
            self._arrivals.append(self._last_done)
        self._arrivals.append(now)
        seconds = (now - self._arrivals[0]) / (len(self._arrivals) - 1)
        self._last_done = now
        try:
            self.guard.record(step, stats["applied"], stats["loss"])
        finally:
            self.counters.nonfinite_skipped = self.guard.skipped
        if step + 1 <= self.step:
            return  # a replayed step: already reported, and its numbers are the same
        # Phases of the step's critical path, from its slowest worker: computing,
        # then moving gradients to the servers and the new parameters back (its
        # idle time less the servers' reduce and apply), and how long the
        # fastest worker waited for it.
        transfer = max(0.0, stats["idle_s"] - stats["reduce_apply_s"])
        record = step_record(
            self.spec, step, stats["loss"], stats["count"], seconds, stats["applied"],
            workers=len(self.workers), version=stats["version"],
            phases={"compute": stats["compute_s"], "transfer": transfer,
                    "reduce_apply": stats["reduce_apply_s"], "wait": stats["straggler_wait_s"]},
        )
        if "params" in stats:
            # The coordinator holds the validation split; workers hold only training shards' work.
            ds = self.data.dataset
            record["val_loss"], record["val_accuracy"] = evaluate(self.net.bind(stats["params"]), ds.X_val, ds.y_val)
        if "state" in stats:
            state = stats["state"]
            self._write_checkpoint(step + 1, np.concatenate([s["params"] for s in state]), state)
        self.step = step + 1
        self.on_step(record)

    # ----------------------------------------------------------- failures

    def _recover(self, lost: ActorLost, first: int) -> int:
        """Restart what died and return the next step to run; `first` is the
        oldest step whose result was not received."""
        began = time.perf_counter()
        self._close_graph()
        alive = [(i, w) for i, w in zip(self._worker_indices, self.workers) if _alive(w)]
        self.counters.worker_failures += len(self.workers) - len(alive)
        # A worker that did not answer may still be running its old step: end
        # it, so it holds no CPU, no core and no view of the parameters.
        kept = {i for i, _ in alive}
        self._drop_workers([(i, w) for i, w in zip(self._worker_indices, self.workers) if i not in kept])
        self._worker_indices = [i for i, _ in alive]
        self.workers = [w for _, w in alive]
        restore = lost.servers
        if not restore:
            # The servers may have applied steps whose results were lost with the
            # graph; going back to a checkpoint keeps every step reported once.
            versions = ray.get([s.location.remote() for s in self.servers])
            restore = any(v["version"] != first for v in versions)
        if restore:
            if lost.servers:
                self.counters.server_failures += 1
            step = self._restore_servers().step
        else:
            step = first
        if not self._killed_for_hang:  # a hang is counted as one (see _watchdog)
            self._note_loss(("step", first + 1), f"step {first + 1}")
        self._killed_for_hang = False
        self._restart_workers()
        self._recovered(began, step, servers=lost.servers)
        return step

    def _restore_servers(self) -> Checkpoint:
        """Replace the parameter servers by ones started from the latest
        checkpoint, which it returns."""
        for s in self.servers:
            _kill(s)
        ckpt = self._latest_checkpoint()
        if ckpt is None:
            raise TrainingError("a parameter server died and no checkpoint is left to restore it from")
        self._take_counters(ckpt)
        self._start_servers(ckpt.params, ckpt.step, ckpt.optimizer)
        return ckpt

    def _take_counters(self, ckpt: Checkpoint) -> None:
        """The non-finite guard's state as of a checkpoint."""
        self.guard.streak = ckpt.counters.get("nonfinite_streak", 0)
        self.guard.skipped = ckpt.counters.get("nonfinite_skipped", 0)

    def _restart_workers(self) -> None:
        """Start the missing workers that fit now; the rest come back when
        capacity does (see _wanted_worker_count), the survivors taking over the
        lost shards meanwhile. With no worker left, wait for room for one."""
        missing = self._target_workers - len(self.workers)
        placeable = min(missing, self._placeable_workers())
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not self.workers and placeable < 1:
            self._check_cancelled()
            if time.monotonic() > deadline:
                raise TrainingError("every worker was lost and no capacity came back to restart one")
            time.sleep(0.5)
            placeable = min(missing, self._placeable_workers())
        if placeable > 0:
            self._start_workers(placeable)

    def _recovered(self, began: float, step: int, servers: bool) -> None:
        """Account for a recovery that resumes at `step`."""
        replayed = max(0, self.step - step)
        seconds = time.perf_counter() - began
        self.counters.recoveries += 1
        self.counters.steps_replayed += replayed
        self.counters.recovery_seconds += seconds
        self._last_done = time.perf_counter()
        self._arrivals.clear()
        self.on_event("recovery", {"step": step, "steps_replayed": replayed, "seconds": seconds,
                                   "servers": servers, "workers": len(self.workers)})

    # ----------------------------------------------------------- actors

    def _start_servers(self, params: np.ndarray, version: int, optimizer_state) -> None:
        k = self.spec.resources.parameter_servers
        bounds = slice_bounds(params.size, k)
        if isinstance(optimizer_state, list):  # states of k live slices
            optimizer_state = join_optimizer_states([s["optimizer"] for s in optimizer_state],
                                                    [b - a for a, b in bounds])
        states = split_optimizer_state(optimizer_state, bounds, params.size)
        self.servers = [
            ParameterServer.options(name=None).remote(self.spec, j, params[a:b], a, b, version, states[j])
            for j, (a, b) in enumerate(bounds)
        ]
        self.server_locations = ray.get([s.location.remote() for s in self.servers])

    def _start_workers(self, count: int) -> None:
        t = self.spec.resources
        new = []
        for _ in range(count):
            index = self._next_worker_index
            self._next_worker_index += 1
            new.append(GradientWorker.options(num_cpus=t.cpus_per_worker, scheduling_strategy="SPREAD").remote(
                self.spec, index, self.data_roots, t.cpus_per_worker, self.faults.get(index)))
        try:
            where = self._placed([w.location.remote() for w in new], new)
        except GetTimeoutError:
            for w in new:
                ray.kill(w, no_restart=True)
            raise TrainingError(
                f"{count} worker(s) of {t.cpus_per_worker} CPU(s) could not be placed within "
                f"{WORKER_START_TIMEOUT_S:.0f} s; cluster resources: {ray.available_resources()}"
            ) from None
        except RayTaskError as err:
            for w in new:
                ray.kill(w, no_restart=True)
            raise TrainingError(f"a worker could not start: {err.cause or err}") from None
        self.counters.nodes.update(loc["node_id"] for loc in where)
        self.locations.update((loc["index"], loc) for loc in where)
        self._worker_indices.extend(loc["index"] for loc in where)
        self.workers.extend(new)
        self.on_event("workers", {"count": len(self.workers), "nodes": sorted({l["node_id"] for l in where})})

    def _placed(self, refs: list, actors: list) -> list:
        """Wait for new workers to be placed and started, seeing a cancel promptly."""
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            if len(ready) == len(refs):
                return ray.get(refs)
            if self._cancelled.is_set():
                for w in actors:
                    ray.kill(w, no_restart=True)
                raise JobCancelled(f"job {self.job_id} cancelled while its workers were starting")
            if time.monotonic() > deadline:
                raise GetTimeoutError("workers not placed in time")

    def _resize_now(self, target: int) -> None:
        before = len(self.workers)
        if target > before:
            self._start_workers(target - before)
        else:
            self._drop_workers(list(zip(self._worker_indices[target:], self.workers[target:])))
            self.workers = self.workers[:target]
            self._worker_indices = self._worker_indices[:target]
        self.on_event("resize", {"from": before, "to": target, "step": self.step})

    def _drop_workers(self, dropped: list) -> None:
        """Kill these (index, actor) workers and remove their gradient files
        (worker indices are never reused, so nobody reads those again)."""
        for index, actor in dropped:
            _kill(actor)
            if self._shared_dir is not None:
                for path in self._shared_dir.glob(f"worker-{index}-*.grads"):
                    path.unlink(missing_ok=True)

    def _shutdown(self) -> None:
        self._close_graph()
        for actor in self.workers + self.servers:
            _kill(actor)
        self.workers, self.servers, self._worker_indices = [], [], []
        shared.remove_job_dir(self._shared_dir)
        self._shared_dir = self._job_shared_dir = None

    # ----------------------------------------------------------- checkpoints

    def _fetch(self, params_refs: list) -> np.ndarray:
        slices = ray.get(params_refs)
        return np.concatenate(slices) if len(slices) > 1 else np.array(slices[0])

    def _write_checkpoint(self, step: int, params: np.ndarray, server_states, extra: dict | None = None) -> None:
        optimizer = {}
        if server_states:
            bounds = slice_bounds(params.size, len(server_states))
            optimizer = join_optimizer_states([s["optimizer"] for s in server_states],
                                              [b - a for a, b in bounds])
        counters = {"nonfinite_streak": self.guard.streak, "nonfinite_skipped": self.guard.skipped, **(extra or {})}
        path = write_checkpoint(self.checkpoint_dir, Checkpoint(step, params, optimizer, self._spec_key(), counters))
        self.on_event("checkpoint", {"step": step, "path": str(path)})

    def _spec_key(self) -> str:
        """The spec as stored in checkpoints, less what may change on resume
        because it changes no arithmetic: its `resources`."""
        return spec_key(self.spec.model_dump(mode="json"))

    def _latest_checkpoint(self) -> Checkpoint | None:
        def damaged(path, err):
            self.counters.damaged_checkpoints += 1
            self.on_event("checkpoint_damaged", {"path": str(path), "error": str(err)})

        ckpt = latest_checkpoint(self.checkpoint_dir, on_damaged=damaged)
        if ckpt is not None and _stored_spec_key(ckpt.spec_json) != self._spec_key():
            raise TrainingError(f"the checkpoints in {self.checkpoint_dir} belong to a different job spec")
        return ckpt


def spec_key(raw: dict) -> str:
    """A spec (as JSON data) as checkpoints name it: less its `resources`,
    which change no arithmetic and so may change on resume."""
    return checkpoint_key(raw)


def _stored_spec_key(spec_json: str) -> str:
    """A checkpoint's spec key, read again by today's rule (a checkpoint
    written before `resources` existed names its fields in `training`)."""
    try:
        raw = json.loads(spec_json)
    except ValueError:
        return spec_json
    return spec_key(raw) if isinstance(raw, dict) else spec_json


@dataclass
class Computation:
    """Async mode: one worker's computation in flight."""

    index: int  # the worker's
    shard: int
    batch: int
    version: int  # of the parameters it is computed on
    submitted: float  # time.monotonic()
    generation: int  # of the server it is for (AsyncRun.generation)


@dataclass
class AsyncRun:
    """Async mode: where the job is."""

    params_ref: object  # the newest parameters
    version: int
    taken: list[int]  # per shard: batches applied so far
    start: int  # the version the run began at (applied_batches[i] is update start + i + 1)
    turns: dict = field(default_factory=dict)  # worker index -> updates it made (where it is in its shards)
    inflight: dict = field(default_factory=dict)  # result ref -> Computation
    generation: int = 0  # bumped when the server is restored

    def restart(self, params_ref, version: int, taken: list[int]) -> None:
        """After the server is restored at `version`: computations in flight
        stay, to be dropped as they end (a worker gets new work only then)."""
        self.params_ref, self.version, self.taken, self.turns = params_ref, version, taken, {}
        self.generation += 1


def async_position(version: int, shards: int) -> list[int]:
    """Async mode: how many batches each shard has contributed after
    `version` updates, were the shards taken in turn (exact with one worker,
    whose turns go round its shards in order)."""
    return [version // shards + (1 if s < version % shards else 0) for s in range(shards)]


def step_graph(servers: list, workers: list, job, call, worker_calls: list | None = None):
    """One sync step's actor calls, made through `call(method, *args)`: the
    servers publish the parameters, every worker computes its shards from
    them, the servers reduce and apply. With `bind` it describes a graph to
    compile, with `remote` it makes the calls. Returns the output (a list of
    outputs when there are several servers); the workers' calls are added to
    `worker_calls` when given."""
    params = [call(s.publish_step, job) for s in servers]
    results = [call(w.step, job, *params) for w in workers]
    if worker_calls is not None:
        worker_calls.extend(results)
    if len(servers) == 1:
        return call(servers[0].apply, job, *results)
    finite = [call(s.reduce, job, *results) for s in servers]
    return [call(s.commit, job, *finite) for s in servers]


class CompiledStep:
    """A step graph compiled to shared-memory channels (actors on one node).

    Waiting for a result polls shared memory, so the coordinator waits in a
    thread at the lowest priority (workers.runtime.run_at_low_priority)."""

    transport = "shared memory"

    def __init__(self, compiled, workers: list):
        self.compiled, self.workers = compiled, workers

    def execute(self, job: dict):
        return self.compiled.execute(job)

    def result(self, ref, cancelled: threading.Event):
        """The step's output, every array in it copied out of the channel.

        Ray deserializes a channel's arrays without copying them, and the
        channel's buffer cannot be written again while any such array lives:
        holding the parameters of three evaluated steps stopped a graph for
        good here. A copy (only evaluation and checkpoint steps carry arrays)
        leaves what the coordinator and its callers keep independent of the
        graph."""
        if isinstance(ref, list):  # several servers: one output each
            return [_owned(r.get(timeout=-1)) for r in ref]
        return _owned(ref.get(timeout=-1))

    def hung(self, step: int, limit: float) -> list[int]:
        """Positions of the workers computing for over limit / 2, or not
        answering within PROBE_TIMEOUT_S. Each answers on a thread of its own
        (GradientWorker.computing_for), and the driver makes no other calls to
        them while the graph runs, so an answer waits for nothing else."""
        refs = [w.computing_for.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        hung = []
        for i, ref in enumerate(refs):
            try:
                seconds = ray.get(ref) if ref in ready else None
                stuck = ref not in ready or (seconds is not None and seconds > limit / 2)
            except (RayActorError, RayTaskError):
                stuck = True
            if stuck:
                hung.append(i)
        return hung

    def close(self) -> None:
        try:
            self.compiled.teardown()
        except Exception:  # an actor of the graph already died
            pass


def _owned(value):
    """`value` with every numpy array in it (in dicts, plain lists and
    tuples) replaced by a copy that owns its memory."""
    if isinstance(value, np.ndarray):
        return value if value.flags.owndata else value.copy()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_owned(v) for v in value)
    return value


class InterpretedStep:
    """The same step graph as ordinary actor calls chained by object refs:
    Ray hands each call its inputs once they exist, so a step needs no driver
    round trip, and each actor runs its calls in the order they were made."""

    transport = "object store"

    def __init__(self, servers: list, workers: list):
        self.servers, self.workers = servers, workers
        self._worker_calls: dict[int, list] = {}  # step -> each worker's call, for hung()

    def execute(self, job: dict):
        calls: list = []
        out = step_graph(self.servers, self.workers, job, lambda method, *args: method.remote(*args), calls)
        self._worker_calls[job["step"]] = calls
        self._worker_calls.pop(job["step"] - 8, None)  # a few steps back is plenty
        return out

    def hung(self, step: int, limit: float) -> list[int]:
        """Positions (in `workers`) of the workers whose part of `step` has
        not finished."""
        calls = self._worker_calls.get(step, [])
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=0) if calls else ([], [])
        return [i for i, ref in enumerate(calls) if ref not in done]

    def result(self, ref, cancelled: threading.Event):
        while True:  # polling, so that a cancel is seen promptly
            if cancelled.is_set():
                raise JobCancelled("cancelled")
            try:
                return ray.get(ref, timeout=0.5)
            except GetTimeoutError:
                continue

    def close(self) -> None:
        pass


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already gone
        pass


def _alive(actor) -> bool:
    try:
        ray.get(actor.location.remote(), timeout=30)
        return True
    except (RayActorError, GetTimeoutError):
        return False
