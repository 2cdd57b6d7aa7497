"""The parameter server: a Ray actor holding the parameters and applying steps.

In sync mode it is part of the job's step graph (workers.step_graph): it
publishes the parameters of a step once, receives the workers' shard
gradients straight from them (never through the coordinator; on a compiled
graph as handles to shared files, see workers.shared), reduces them in shard
order and averages by sample count through core's `reduce_gradients`, and
applies the optimizer. In async mode it is called with object references and
returns the new parameters to the object store.

`resources.parameter_servers: k` splits the vector into k contiguous slices,
one actor each. Every optimizer rule is elementwise, so k slices give the same
bits as one. Whether a step is applied must still be decided for the whole
vector (a non-finite value in any slice skips the step everywhere), so a step
is two graph nodes: `reduce` (each slice reports whether its mean gradient is
finite) then `commit` (each slice applies only if all slices were finite).
A single server does both in one node, `apply`.

Each server holds the job's membership epoch (workers.fencing), given when
it is started and whenever the job's actor set changes (`fence`), and
refuses every plan and worker result of another epoch (`StaleEpoch`)
before it changes anything (on the direct graph a result's epoch is in the
summary it pulls first); each refusal is kept for the coordinator to
report (`refusals`).
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np
import ray

from core.health import Bounds, StepHealth
from core.optim import make_optimizer
from core.spec import JobSpec
from core.trainer import ShardGradient, reduce_gradients
from workers import shared, transport
from workers.protocol import (ResultAt, ServerLocation, ServerState, StaleEpoch, StaleRefused, StepPlan, StepStats,
                              UpdateStats, WorkerResult)


class StaleStep(RuntimeError):
    """A step that is not the next one: a duplicate or late gradient."""


def slice_bounds(size: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of a vector of `size` over `servers`."""
    cuts = np.linspace(0, size, servers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


@dataclass(frozen=True)
class _Reduced:
    """A step reduced over this slice and not yet committed."""

    stats: StepStats  # with applied=False until committed
    mean: np.ndarray
    finite: bool
    reduce_s: float


@ray.remote(num_cpus=0)
class ParameterServer(transport.ArrayPeer):
    def __init__(self, spec: JobSpec, index: int, params: np.ndarray, start: int, stop: int,
                 version: int, optimizer_state: dict | None = None, layers: Bounds = (), epoch: int = 0):
        t = spec.training
        self.index, self.start, self.stop = index, start, stop
        self.layers = tuple(layers)  # the network's layers in the whole vector (MLP.layer_bounds)
        self.params = np.array(params, copy=True)  # writable: the object store's copy is read-only
        self.optimizer = make_optimizer(t.optimizer, self.params.size, self.params.dtype, t.steps)
        if optimizer_state:
            self.optimizer.load_state_dict(dict(optimizer_state))
        self.version = version
        self.epoch = epoch  # the job's membership epoch (workers.fencing)
        self._refused: list[StaleRefused] = []  # since the coordinator last asked
        self.pending: _Reduced | None = None
        # Where self.params lives when shared; a restarted server's file has a new name.
        self._params_file = shared.OwnedFile(f"server-{index}-{uuid.uuid4().hex[:8]}", "params",
                                             family=f"server-{index}")
        self._views = shared.SharedViews()  # the workers' gradient files

    def location(self) -> ServerLocation:
        return ServerLocation(self.index, ray.get_runtime_context().get_node_id(), os.getpid(), self.version)

    def publish(self) -> np.ndarray:
        """The current parameters (returned, hence placed in the object store)."""
        return self.params

    def fence(self, epoch: int) -> list[StaleRefused]:
        """From now on accept only plans and results of `epoch`; returns
        (and forgets) what was refused before."""
        self.epoch = epoch
        return self.refusals()

    def refusals(self) -> list[StaleRefused]:
        """The plans and results refused since the last call."""
        refused, self._refused = self._refused, []
        return refused

    def _refuse_other_epochs(self, step: int, plan: StepPlan | None, results=()) -> None:
        """Raise StaleEpoch (keeping a record of it) if the plan or any
        result is of another membership epoch than this server's."""
        stale = [("plan", None, plan.epoch)] if plan is not None and plan.epoch != self.epoch else []
        stale += [("result", r.worker, r.epoch) for r in results if r.epoch != self.epoch]
        if not stale:
            return
        self._refused.extend(StaleRefused(what, f"server {self.index}", worker, epoch, self.epoch, step + 1)
                             for what, worker, epoch in stale)
        what, worker, epoch = stale[0]
        whose = f"worker {worker}'s result" if worker is not None else "a plan"
        raise StaleEpoch(f"parameter server {self.index}: refused {whose} of membership epoch {epoch} "
                         f"for step {step + 1}; the job is at epoch {self.epoch}")

    def _expect(self, step: int, what: str) -> None:
        if step != self.version:
            raise StaleStep(f"parameter server {self.index}: {what} step {step + 1}, "
                            f"expected step {self.version + 1}")

    def open_arrays(self, token: str) -> transport.NetArray | str:
        """transport.ArrayPeer.open_arrays, the handle naming this server's
        parameter slice (`step` left to whoever pulls a step's)."""
        opened = super().open_arrays(token)
        if isinstance(opened, str):
            return opened
        return replace(opened, key="params", dtype=self.params.dtype.str, length=self.params.size)

    def publish_step(self, plan: StepPlan) -> np.ndarray | shared.SharedArray | transport.NetArray:
        """Sync mode, the first node of a step's graph: the parameters of
        version `plan.step`, refusing a step that is not the next one. When
        the plan names a shared directory, a handle to this server's
        parameter file there instead (made on first use; from then on the
        optimizer updates the file in place); with a TCP token, a handle to
        this server's array service, which serves them until the step's
        commit."""
        with self._aborting(f"parameter server {self.index}'s step {plan.step + 1}", plan.step, plan.net_token):
            self._refuse_other_epochs(plan.step, plan)
            self._expect(plan.step, "asked for")
            if plan.net_token:  # served until this step's commit, which offers the next step's
                return self._offer(plan.net_token, plan.step, {"params": self.params})["params"]
            if not plan.shared_dir:
                return self.params
            return self.share(plan.shared_dir) or self.params  # no space: the array through the channel

    def share(self, directory: str) -> shared.SharedArray | None:
        """A handle to this server's parameter file in the job's shared
        `directory`, made on first use (from then on the optimizer updates
        the file in place); None when it cannot be made (no room). A server
        started after a failure makes a new file; the dead one's goes."""
        got = self._params_file.get(directory, 1, self.params.size, self.params.dtype)
        if got is None:
            return None
        rows, new = got
        if new:
            rows[0] = self.params
            self.params = rows[0]
        return shared.SharedArray(self._params_file.path, self.params.dtype.str, self.params.size)

    def reduce(self, plan: StepPlan, *results: WorkerResult | ResultAt) -> bool:
        """Reduce every worker's shard gradients of this step over this slice,
        in shard order; True if the mean is finite. The results are the
        workers' own, or (the direct graph) where they will be: this server
        pulls them, waiting for the step."""
        with self._aborting(f"parameter server {self.index}'s step {plan.step + 1}", plan.step, plan.net_token):
            return self._reduce(plan, results)

    def _reduce(self, plan: StepPlan, results: tuple) -> bool:
        step = plan.step
        direct = bool(results) and all(isinstance(r, ResultAt) for r in results)
        self._refuse_other_epochs(step, plan, () if direct else results)
        self._expect(step, "got gradients for")
        if direct:
            results = self._pull_results(plan, results)
            self._refuse_other_epochs(step, None, results)
        began = time.perf_counter()
        grads = sorted((g for r in results for g in r.grads), key=lambda g: g.shard)
        shards = tuple(g.shard for g in grads)
        if list(shards) != sorted(set(shards)) or any(g.step != step for g in grads):
            raise StaleStep(f"parameter server {self.index}: step {step + 1} got shards {list(shards)} "
                            f"of steps {sorted({g.step + 1 for g in grads})}")
        parts = [g.grad_sum for g in grads] if direct else self._gradient_slices(grads)
        sliced = [ShardGradient(g.shard, g.step, part, g.count, g.loss_sum) for g, part in zip(grads, parts)]
        mean, loss, count = reduce_gradients(sliced)
        finite = bool(np.isfinite(mean).all())
        slowest = max(results, key=lambda r: r.compute_s)
        stats = StepStats(step, loss, count, False, self.version, 0.0, slowest.compute_s, slowest.idle_s,
                          slowest.compute_s - min(r.compute_s for r in results), shards,
                          tuple(r.compute_s for r in results), tuple(r.idle_s for r in results))
        self.pending = _Reduced(stats, mean, finite, time.perf_counter() - began)
        return finite

    def _pull_results(self, plan: StepPlan, places: tuple[ResultAt, ...]) -> list[WorkerResult]:
        """Each worker's result of `plan.step` from its array service: its
        summary and this slice of each of its shard rows (the shards
        `plan.assignment` gives it), in one pull that waits for the step;
        the rows of a worker on this server's node, when that is the plan's
        shared node, straight from the worker's shared file instead."""
        dtype = self.params.dtype
        here = plan.shared_dir is not None and plan.shared_node == ray.get_runtime_context().get_node_id()
        parts, received = [], []
        for place in places:
            h = place.summary
            summary = np.empty(h.length, np.float64)
            parts.append((h, summary, 0))
            shards = plan.assignment[place.worker]
            in_file = here and place.on_shared_node
            mine = [] if in_file else [np.empty(self.stop - self.start, dtype) for _ in shards]
            # A row's whole length is in the summary, read in the same pull:
            # `stop` is the bound the client checks, the service the real one.
            parts += [(replace(h, key=f"shard-{shard}", dtype=dtype.str, length=self.stop), out, self.start)
                      for shard, out in zip(shards, mine)]
            received.append((place, summary, mine))
        self._pulls().pull(parts)
        results, files = [], set()
        for place, summary, mine in received:
            shards = plan.assignment[place.worker]
            if not mine and shards:
                mine = self._rows_in_file(plan, place, summary, shards, files)
            result = WorkerResult.from_summary(summary, plan.step, mine)
            if result.worker != place.worker or tuple(g.shard for g in result.grads) != shards:
                raise StaleStep(f"parameter server {self.index}: step {plan.step + 1}'s result from worker "
                                f"{place.worker} is worker {result.worker}'s of shards "
                                f"{[g.shard for g in result.grads]}")
            results.append(result)
        self._views.forget_except(files)
        return results

    def _rows_in_file(self, plan: StepPlan, place: ResultAt, summary: np.ndarray, shards: tuple,
                      files: set) -> list[np.ndarray]:
        """This slice of a co-located worker's rows, viewed in its shared
        file, or pulled from its service when it had no file (no room)."""
        made = WorkerResult.summary_rows_file(summary)
        length = int(summary[4])
        if made <= 0:
            mine = [np.empty(self.stop - self.start, self.params.dtype) for _ in shards]
            self._pulls().pull([(replace(place.summary, key=f"shard-{shard}", dtype=self.params.dtype.str,
                                         length=length), out, self.start) for shard, out in zip(shards, mine)])
            return mine
        path = shared.OwnedFile.path_in(plan.shared_dir, shared.worker_stem(place.worker), made, "grads")
        files.add(path)
        return [self._views.view(shared.SharedArray(path, self.params.dtype.str, length, i))[self.start:self.stop]
                for i in range(len(shards))]

    def _gradient_slices(self, grads: list[ShardGradient]) -> list[np.ndarray]:
        """This slice of each shard gradient as sent: an array, a view of a
        worker's shared file, or pulled from the worker's array service."""
        parts = [shared.resolve(g.grad_sum, self._views)[self.start:self.stop]
                 if not isinstance(g.grad_sum, transport.NetArray) else None for g in grads]
        self._views.forget_except({g.grad_sum.path for g in grads if isinstance(g.grad_sum, shared.SharedArray)})
        pulls = [(g.grad_sum, np.empty(self.stop - self.start, np.dtype(g.grad_sum.dtype)), self.start)
                 for g in grads if isinstance(g.grad_sum, transport.NetArray)]
        if pulls:
            self._pulls().pull(pulls)
            pulled = iter(out for _, out, _ in pulls)
            parts = [p if p is not None else next(pulled) for p in parts]
        return parts

    def commit(self, plan: StepPlan, *finite: bool) -> StepStats:
        """Apply the reduced step if every slice was finite. Returns the step's
        statistics, with this slice's new parameters if the plan asks for them
        (to evaluate) and its whole state if it asks for a checkpoint."""
        with self._aborting(f"parameter server {self.index}'s step {plan.step + 1}", plan.step, plan.net_token):
            return self._commit(plan, finite)

    def _commit(self, plan: StepPlan, finite: tuple) -> StepStats:
        step = plan.step
        self._refuse_other_epochs(step, plan)
        pending = self.pending
        if pending is None or pending.stats.step != step:
            raise StaleStep(f"parameter server {self.index}: commit for step {step + 1} without its reduce")
        applied = pending.finite and all(finite)
        self._withdraw()  # the parameters change in place below: no worker may read them now
        began = time.perf_counter()
        before = self.params.copy() if applied else self.params
        if applied:
            self.optimizer.apply(self.params, pending.mean, step)
        health = StepHealth.measure(pending.mean, before, self.params, self.layers, self.start)
        self.version = step + 1
        self.pending = None
        if plan.net_token:  # the next step's parameters, served from now on
            self._offer(plan.net_token, step + 1, {"params": self.params})
        return replace(pending.stats, applied=applied, version=self.version, health=health,
                       reduce_apply_s=pending.reduce_s + time.perf_counter() - began,
                       params=self.params.copy() if plan.want_params else None,
                       states=(self.state(),) if plan.want_state else ())

    def apply(self, plan: StepPlan, *results: WorkerResult | ResultAt) -> StepStats:
        """`reduce` then `commit` in one call, for a server that holds the whole
        vector: one hop less on every step's critical path."""
        self.reduce(plan, *results)
        return self.commit(plan)

    @ray.method(num_returns=2)
    def push(self, computed_at: int, max_staleness: int, result_refs: list):
        """Async mode: apply one worker's shard gradients as they arrive.

        `computed_at` is the parameter version the worker computed on; a
        gradient more than `max_staleness` versions old is refused, and so is
        one of another membership epoch (`fenced`). Each shard's mean
        gradient is one update. Returns the parameters and the statistics."""
        staleness = self.version - computed_at
        if staleness > max_staleness:
            return self.params, UpdateStats(False, staleness, self.version)
        began = time.perf_counter()
        result: WorkerResult = ray.get(result_refs)[0]
        try:
            self._refuse_other_epochs(self.version, None, (result,))
        except StaleEpoch:
            return self.params, UpdateStats(False, staleness, self.version, worker=result.worker, fenced=True)
        skipped, count, loss, before, mean = 0, 0, None, self.params.copy(), None
        for g in result.grads:  # one shard per update (AsyncLoop): its health is the update's
            mean = g.grad_sum[self.start:self.stop] / g.grad_sum.dtype.type(g.count)
            if np.isfinite(mean).all():
                self.optimizer.apply(self.params, mean, self.version)
            else:
                skipped += 1
            self.version += 1
            count += g.count
            loss = g.loss_sum / g.count
        health = StepHealth.measure(mean, before, self.params, self.layers, self.start) if mean is not None else None
        return self.params, UpdateStats(True, staleness, self.version, loss, count, skipped,
                                        time.perf_counter() - began, result.compute_s,
                                        result.wait_s + result.transfer_s, health, result.worker)

    def state(self) -> ServerState:
        """Parameters, optimizer state and version, for a checkpoint."""
        return ServerState(self.params, self.optimizer.state_dict(), self.version)
