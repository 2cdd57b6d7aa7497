"""The coordinator: drives one job on Ray, and is all a caller needs.

It wires the job's parts together (workers.job) and runs them: the server
group (workers.servers) and the worker pool (workers.pool) execute, a sync
loop (workers.sync_loop, each step a graph of actor calls, workers.step_graph)
or an async loop (workers.async_loop) drives them, the reporter
(workers.reporting) finishes every step, and the recovery routine
(workers.recovery) and the watchdog (workers.watchdog) handle failures. The
data never passes through it. Callers get `run`, `cancel`, `resize`, the
job's counters and where its actors are.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from core.datafiles import DataLimits
from core.mlp import MLP
from core.spec import JobSpec, checkpoint_key, load_spec, stop_step
from core.trainer import ShardedData, TrainingError, build_network
from workers import shared
from workers.async_loop import AsyncLoop
from workers.checkpoint import JobCheckpoints
from workers.evaluation import Evaluation
from workers.fencing import Membership
from workers.goodput import GoodputClock
from workers.job import JobParts
from workers.pool import JobCancelled, StartWorker, WorkerPool, start_gradient_worker
from workers.protocol import (CheckpointDamaged, CheckpointWritten, Counters, Event, Resumed, ServerState)
from workers.recovery import FailurePolicy, Recovery
from workers.reporting import Reporter
from workers.runtime import connect_ray, run_at_low_priority
from workers.servers import ServerGroup
from workers.sync_loop import SyncLoop
from workers.watchdog import Watchdog

__all__ = ["Coordinator", "JobCancelled"]

CANCEL_GRACE_S = 5.0


class Coordinator:
    def __init__(self, spec: JobSpec | dict | str | Path, checkpoint_dir: str | Path, *,
                 data_roots: list[str | Path] | None = None, job_id: str | None = None,
                 on_step: Callable[[dict], None] | None = None, on_event: Callable[[Event], None] | None = None,
                 data_limits: DataLimits = DataLimits(), start_worker: StartWorker = start_gradient_worker,
                 pipeline_depth: int = 2):
        self.spec = load_spec(spec)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.data_roots = [str(r) for r in data_roots] if data_roots else None
        self.data_limits = data_limits  # what the data may be, checked here and in every worker (core.datafiles)
        self.job_id = job_id or self.spec.name
        self.on_step = on_step or (lambda record: None)
        self.on_event = on_event or (lambda event: None)
        self.start_worker = start_worker  # how a worker is started: tests pass a fault plan (workers.faults)
        self.pipeline_depth = max(1, pipeline_depth)
        self.counters = Counters()
        self.applied_batches: list[tuple[int, int]] = []  # async: (shard, batch) of every applied update
        self.shared_root = shared.DEFAULT_ROOT  # where zero-copy arrays go on a compiled graph
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._target_workers = self.spec.resources.workers
        self._job: JobParts | None = None
        self._loop: SyncLoop | AsyncLoop | None = None

    # ------------------------------------------------------------ control

    @property
    def required_cpus(self) -> int:
        return self.spec.resources.workers * self.spec.resources.cpus_per_worker

    @property
    def step(self) -> int:
        """Steps reported so far."""
        return self._job.reporter.reported if self._job is not None else 0

    def cancel(self) -> None:
        """Stop at the next step boundary. A compiled step cannot be
        interrupted, so if a sync step is still under way CANCEL_GRACE_S
        later (a hung worker), the job's workers are killed, which ends it."""
        self._cancelled.set()
        timer = threading.Timer(CANCEL_GRACE_S, self._kill_if_still_computing)
        timer.daemon = True
        timer.start()

    def _kill_if_still_computing(self) -> None:
        if self._loop is not None and self._loop.computing:
            self._job.pool.kill()

    def resize(self, workers: int) -> None:
        """Use `workers` gradient workers from the next step boundary on."""
        shards = self.spec.data.shards
        if not isinstance(workers, int) or not 1 <= workers <= shards:
            raise ValueError(f"workers must be in [1, {shards}] (data.shards), got {workers!r}")
        with self._lock:
            self._target_workers = workers

    def _target(self) -> int:
        with self._lock:
            return self._target_workers

    # ------------------------------------------------------------ where things are

    @property
    def locations(self) -> dict[int, dict]:
        """Every worker the job started, by index: node ID, pid, pinned cores."""
        return {i: asdict(loc) for i, loc in self._job.pool.locations.items()} if self._job else {}

    @property
    def worker_locations(self) -> list[dict]:
        """The live workers' locations, in worker order."""
        return [asdict(self._job.pool.locations[i]) for i in self._job.pool.indices] if self._job else []

    @property
    def server_locations(self) -> list[dict]:
        return [asdict(loc) for loc in self._job.servers.locations] if self._job else []

    @property
    def shared_dir(self) -> Path | None:
        """This job's directory of zero-copy arrays, once made."""
        return self._job.files.path if self._job else None

    # ------------------------------------------------------------ running

    def run(self, resume: bool = False) -> MLP:
        """Train to the job's stop (training.stop_at, else the end); returns the trained network."""
        spec, clock = self.spec, GoodputClock()
        connect_ray(None, spec.resources.workers)
        # Opening the data here checks it before any actor starts (an in-memory
        # source is loaded; a prepared set's manifest read) and gives the
        # initial network; workers read their own rows.
        data = ShardedData.from_spec(spec, self.data_roots, self.data_limits)
        net = build_network(spec, data.dataset)
        job = self._job = self._parts(net, data, clock)
        del data  # the driver keeps no rows: the workers read and evaluate them
        start, resumed = 0, job.reporter.latest_checkpoint() if resume else None
        if resumed is not None:
            if resumed.step > stop_step(spec):
                raise TrainingError(f"the checkpoint of step {resumed.step} in {self.checkpoint_dir} is past "
                                    f"this job's stop at step {stop_step(spec)}")
            net.params[:] = resumed.params
            start = job.reporter.reported = resumed.step
            self.on_event(Resumed(start))
        try:
            if start == 0:
                job.reporter.checkpoint(0, ServerState(net.params, {}, 0))
            job.servers.start(ServerState(net.params, resumed.optimizer if resumed else {}, start))
            job.pool.start(self._target_workers)
            job.membership.advance("start", start)
            job.reporter.restart_clock("startup")
            # the watchdog's thread at normal priority, the sync loop's waiting at the lowest
            with job.watchdog.running():
                if spec.training.mode == "sync":
                    self._loop = SyncLoop(job)
                    final = run_at_low_priority(self._loop.run, start)
                else:
                    self._loop = AsyncLoop(job, self.applied_batches)
                    final = self._loop.run(start, resumed)
            job.membership.collect()
            net.params[:] = job.servers.fetch(final)
            job.reporter.final_checkpoint(job.servers.state())
            return net
        finally:
            job.pool.shutdown()
            job.servers.kill()
            job.files.remove()

    def _parts(self, net: MLP, data: ShardedData, clock: GoodputClock) -> JobParts:
        spec, counters = self.spec, self.counters
        # the servers' parameters and one row per shard, twice over for workers replaced after a failure
        size = net.params.size * np.dtype(spec.training.dtype).itemsize
        files = shared.JobFiles(size * (1 + 2 * spec.data.shards), self.shared_root)
        pool = WorkerPool(spec, self.data_roots, self.data_limits, self._cancelled, files, self.on_event,
                          self.start_worker)
        servers = ServerGroup(spec, net.layer_bounds())
        checkpoints = JobCheckpoints(self.checkpoint_dir, self._spec_key(), _stored_spec_key,
                                     self._written, self._damaged)
        reporter = Reporter(spec, net, Evaluation(pool, data.dataset), checkpoints, counters, self.on_step, clock)
        policy = FailurePolicy(spec.resources.worker_timeout_s, counters)
        recovery = Recovery(pool, servers, reporter.latest_checkpoint, policy, counters, self.on_event)
        watchdog = Watchdog(policy.limit, policy, pool.kill, self.on_event)
        counters.nodes = pool.nodes
        membership = Membership(servers, pool, counters, self.on_event)
        return JobParts(spec, self.job_id, pool, servers, files, reporter, recovery, watchdog, self._cancelled,
                        membership, self._target, self.on_event, self.pipeline_depth)

    def _spec_key(self) -> str:
        """The spec as checkpoints name it: less its `resources` (core.spec.checkpoint_key)."""
        return checkpoint_key(self.spec.model_dump(mode="json"))

    def _written(self, step: int, path: Path) -> None:
        self.on_event(CheckpointWritten(step, str(path)))

    def _damaged(self, path: Path, err: Exception) -> None:
        self.counters.damaged_checkpoints += 1
        self.on_event(CheckpointDamaged(str(path), str(err)))


def _stored_spec_key(spec_json: str) -> str:
    """A checkpoint's spec key, read again by today's rule (a checkpoint
    written before `resources` existed names its fields in `training`)."""
    try:
        raw = json.loads(spec_json)
    except ValueError:
        return spec_json
    return checkpoint_key(raw) if isinstance(raw, dict) else spec_json
