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
refuses every plan and worker result of another epoch (`StaleEpoch`),
before it touches anything; each refusal is kept for the coordinator to
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
from workers.protocol import (ServerLocation, ServerState, StaleEpoch, StaleRefused, StepPlan, StepStats,
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

    def publish_step(self, plan: StepPlan) -> np.ndarray | shared.SharedArray:
        """Sync mode, the first node of a step's graph: the parameters of
        version `plan.step`, refusing a step that is not the next one. When
        the plan names a shared directory, a handle to this server's
        parameter file there instead (made on first use; from then on the
        optimizer updates the file in place)."""
        self._refuse_other_epochs(plan.step, plan)
        self._expect(plan.step, "asked for")
        if plan.net_token:  # served over TCP until this step's commit
            return self._offer(plan.net_token, plan.step, {"params": self.params})["params"]
        if not plan.shared_dir:
            return self.params
        # A server started after a failure makes a new file; the dead one's goes.
        got = self._params_file.get(plan.shared_dir, 1, self.params.size, self.params.dtype)
        if got is None:  # no space: send the array through the channel
            return self.params
        rows, new = got
        if new:
            rows[0] = self.params
            self.params = rows[0]  # updated in place from now on
        return shared.SharedArray(self._params_file.path, self.params.dtype.str, self.params.size)

    def reduce(self, plan: StepPlan, *results: WorkerResult) -> bool:
        """Reduce every worker's shard gradients of this step over this slice,
        in shard order; True if the mean is finite."""
        step = plan.step
        self._refuse_other_epochs(step, plan, results)
        self._expect(step, "got gradients for")
        began = time.perf_counter()
        grads = sorted((g for r in results for g in r.grads), key=lambda g: g.shard)
        shards = tuple(g.shard for g in grads)
        if list(shards) != sorted(set(shards)) or any(g.step != step for g in grads):
            raise StaleStep(f"parameter server {self.index}: step {step + 1} got shards {list(shards)} "
                            f"of steps {sorted({g.step + 1 for g in grads})}")
        sliced = [ShardGradient(g.shard, g.step, part, g.count, g.loss_sum)
                  for g, part in zip(grads, self._gradient_slices(grads))]
        mean, loss, count = reduce_gradients(sliced)
        finite = bool(np.isfinite(mean).all())
        slowest = max(results, key=lambda r: r.compute_s)
        stats = StepStats(step, loss, count, False, self.version, 0.0, slowest.compute_s, slowest.idle_s,
                          slowest.compute_s - min(r.compute_s for r in results), shards,
                          tuple(r.compute_s for r in results), tuple(r.idle_s for r in results))
        self.pending = _Reduced(stats, mean, finite, time.perf_counter() - began)
        return finite

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
        return replace(pending.stats, applied=applied, version=self.version, health=health,
                       reduce_apply_s=pending.reduce_s + time.perf_counter() - began,
                       params=self.params.copy() if plan.want_params else None,
                       states=(self.state(),) if plan.want_state else ())

    def apply(self, plan: StepPlan, *results: WorkerResult) -> StepStats:
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
