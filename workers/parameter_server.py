"""The parameter server: a Ray actor holding the parameters and applying steps.

In sync mode it is part of the job's step graph (see the coordinator): it
publishes the parameters of a step once, receives the workers' shard
gradients straight from them (never through the coordinator; on a compiled
graph as handles to shared files, see workers.shared),
reduces them in shard order and averages by sample count through core's
`reduce_gradients`, and applies the optimizer. In async mode it is called
with object references and returns the new parameters to the object store.

`resources.parameter_servers: k` splits the vector into k contiguous slices,
one actor each. Every optimizer rule is elementwise, so k slices give the same
bits as one. Whether a step is applied must still be decided for the whole
vector (a non-finite value in any slice skips the step everywhere), so a step
is two graph nodes: `reduce` (each slice reports whether its mean gradient is
finite) then `commit` (each slice applies only if all slices were finite).
A single server does both in one node, `apply`.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import ray

from core.optim import make_optimizer
from core.spec import JobSpec
from core.trainer import ShardGradient, reduce_gradients
from workers import shared


class StaleStep(RuntimeError):
    """A step that is not the next one: a duplicate or late gradient."""


def slice_bounds(size: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of a vector of `size` over `servers`."""
    cuts = np.linspace(0, size, servers + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


@ray.remote(num_cpus=0)
class ParameterServer:
    def __init__(self, spec: JobSpec, index: int, params: np.ndarray, start: int, stop: int,
                 version: int, optimizer_state: dict | None = None):
        t = spec.training
        self.index, self.start, self.stop = index, start, stop
        self.params = np.array(params, copy=True)  # writable: the object store's copy is read-only
        self.optimizer = make_optimizer(t.optimizer, self.params.size, self.params.dtype, t.steps)
        if optimizer_state:
            self.optimizer.load_state_dict(optimizer_state)
        self.version = version
        self.pending: dict | None = None  # the step reduced but not yet committed
        # Where self.params lives when shared; a restarted server's file has a new name.
        self._params_file = shared.OwnedFile(f"server-{index}-{uuid.uuid4().hex[:8]}", "params",
                                             family=f"server-{index}")
        self._views = shared.SharedViews()  # the workers' gradient files

    def location(self) -> dict:
        return {"index": self.index, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "version": self.version}

    def publish(self) -> np.ndarray:
        """The current parameters (returned, hence placed in the object store)."""
        return self.params

    def publish_step(self, job: dict) -> np.ndarray | shared.SharedArray:
        """Sync mode, the first node of a step's graph: the parameters of
        version `job["step"]`, refusing a step that is not the next one. When
        the job names a shared directory, a handle to this server's parameter
        file there instead (made on first use; from then on the optimizer
        updates the file in place)."""
        if job["step"] != self.version:
            raise StaleStep(f"parameter server {self.index}: asked for step {job['step'] + 1}, "
                            f"expected step {self.version + 1}")
        directory = job.get("shared_dir")
        if not directory:
            return self.params
        # A server started after a failure makes a new file; the dead one's goes.
        got = self._params_file.get(directory, 1, self.params.size, self.params.dtype)
        if got is None:  # no space: send the array through the channel
            return self.params
        rows, new = got
        if new:
            rows[0] = self.params
            self.params = rows[0]  # updated in place from now on
        return shared.SharedArray(self._params_file.path, self.params.dtype.str, self.params.size)

    def reduce(self, job: dict, *results: dict) -> bool:
        """Reduce every worker's shard gradients of this step over this slice,
        in shard order; True if the mean is finite."""
        step = job["step"]
        if step != self.version:
            raise StaleStep(f"parameter server {self.index}: got gradients for step {step + 1}, "
                            f"expected step {self.version + 1}")
        began = time.perf_counter()
        grads = sorted((g for r in results for g in r["grads"]), key=lambda g: g.shard)
        shards = [g.shard for g in grads]
        if shards != sorted(set(shards)) or any(g.step != step for g in grads):
            raise StaleStep(f"parameter server {self.index}: step {step + 1} got shards {shards} "
                            f"of steps {sorted({g.step + 1 for g in grads})}")
        sliced = [ShardGradient(g.shard, g.step, shared.resolve(g.grad_sum, self._views)[self.start:self.stop],
                                g.count, g.loss_sum) for g in grads]
        self._views.forget_except({g.grad_sum.path for g in grads if isinstance(g.grad_sum, shared.SharedArray)})
        mean, loss, count = reduce_gradients(sliced)
        finite = bool(np.isfinite(mean).all())
        slowest = max(results, key=lambda r: r["compute_s"])
        self.pending = {
            "step": step, "mean": mean, "loss": loss, "count": count, "finite": finite,
            "reduce_s": time.perf_counter() - began,
            "compute_s": slowest["compute_s"],
            "idle_s": slowest["idle_s"],
            "straggler_wait_s": slowest["compute_s"] - min(r["compute_s"] for r in results),
            "shards": shards,
        }
        return finite

    def commit(self, job: dict, *finite: bool) -> dict:
        """Apply the reduced step if every slice was finite. Returns the step's
        statistics, with this slice's new parameters if the job asks for them
        (to evaluate) and its whole state if it asks for a checkpoint."""
        step = job["step"]
        pending = self.pending
        if pending is None or pending["step"] != step:
            raise StaleStep(f"parameter server {self.index}: commit for step {step + 1} without its reduce")
        all_finite = pending["finite"] and all(finite)
        began = time.perf_counter()
        if all_finite:
            self.optimizer.apply(self.params, pending["mean"], step)
        self.version = step + 1
        self.pending = None
        stats = {k: v for k, v in pending.items() if k != "mean"}
        stats["applied"] = all_finite
        stats["reduce_apply_s"] = pending["reduce_s"] + time.perf_counter() - began
        stats["version"] = self.version
        if job.get("params"):
            stats["params"] = self.params.copy()
        if job.get("state"):
            stats["state"] = self.state()
        return stats

    def apply(self, job: dict, *results: dict) -> dict:
        """`reduce` then `commit` in one call, for a server that holds the whole
        vector: one hop less on every step's critical path."""
        self.reduce(job, *results)
        return self.commit(job)

    @ray.method(num_returns=2)
    def push(self, computed_at: int, max_staleness: int, result_refs: list):
        """Async mode: apply one worker's shard gradients as they arrive.

        `computed_at` is the parameter version the worker computed on; a
        gradient more than `max_staleness` versions old is refused. Each shard's
        mean gradient is one update. Returns the parameters and the statistics."""
        staleness = self.version - computed_at
        stats = {"staleness": staleness, "accepted": staleness <= max_staleness, "updates": 0,
                 "loss": None, "count": 0, "skipped": 0}
        if stats["accepted"]:
            began = time.perf_counter()
            result = ray.get(result_refs)[0]
            for g in result["grads"]:
                mean = g.grad_sum[self.start:self.stop] / g.grad_sum.dtype.type(g.count)
                if np.isfinite(mean).all():
                    self.optimizer.apply(self.params, mean, self.version)
                else:
                    stats["skipped"] += 1
                self.version += 1
                stats["updates"] += 1
                stats["count"] += g.count
                stats["loss"] = g.loss_sum / g.count
            stats["reduce_apply_s"] = time.perf_counter() - began
            stats["compute_s"] = result["compute_s"]
        stats["version"] = self.version
        return self.params, stats

    def state(self) -> dict:
        """Parameters, optimizer state and version, for a checkpoint."""
        return {"params": self.params, "optimizer": self.optimizer.state_dict(), "version": self.version}
