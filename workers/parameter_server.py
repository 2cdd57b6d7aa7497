"""The parameter server: a Ray actor holding the parameters and applying steps.

It receives the shard gradients of a step as object references (straight
from the workers, never through the coordinator), reduces them in shard order
and averages by sample count through core's `reduce_gradients`, and applies
the optimizer through core's `apply_gradient`. Its return value, the new
parameters, is published once per step in the object store.

`training.parameter_servers: k` splits the vector into k contiguous slices,
one actor each. Every optimizer rule is elementwise, so k slices give the same
bits as one. Whether a step is applied must still be decided for the whole
vector (a non-finite value in any slice skips the step everywhere), so a step
is two calls: `reduce` (each slice reports whether its mean gradient is
finite) then `commit` (each slice applies only if all slices were finite).
A single server does both in one call, `apply`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from core.optim import make_optimizer
from core.spec import JobSpec
from core.trainer import ShardGradient, reduce_gradients


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

    def location(self) -> dict:
        return {"index": self.index, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def publish(self) -> np.ndarray:
        """The current parameters (returned, hence placed in the object store)."""
        return self.params

    def reduce(self, step: int, result_refs: list) -> bool:
        """Fetch every worker's result for `step`, reduce this slice; True if finite."""
        if step != self.version:
            raise StaleStep(f"parameter server {self.index}: got gradients for step {step + 1}, "
                            f"expected step {self.version + 1}")
        began = time.perf_counter()
        ray.wait(result_refs, num_returns=len(result_refs), fetch_local=True)
        fetched = time.perf_counter()
        results = ray.get(result_refs)
        got = time.perf_counter()
        grads = sorted((g for r in results for g in r["grads"]), key=lambda g: g.shard)
        sliced = [ShardGradient(g.shard, g.step, g.grad_sum[self.start:self.stop], g.count, g.loss_sum)
                  for g in grads]
        mean, loss, count = reduce_gradients(sliced)
        finite = bool(np.isfinite(mean).all())
        self.pending = {
            "step": step, "mean": mean, "loss": loss, "count": count, "finite": finite,
            "gradient_wait_s": fetched - began, "gradient_transfer_s": got - fetched,
            "reduce_s": time.perf_counter() - got,
            "compute_s": max(r["compute_s"] for r in results),
            "wait_s": max(r["wait_s"] for r in results),
            "transfer_s": max(r["transfer_s"] for r in results),
            "shards": [g.shard for g in grads],
        }
        return finite

    @ray.method(num_returns=2)
    def commit(self, step: int, finite_refs: list):
        """Apply the reduced step if every slice was finite; returns the new
        parameters and the step's statistics."""
        pending = self.pending
        if pending is None or pending["step"] != step:
            raise StaleStep(f"parameter server {self.index}: commit for step {step + 1} without its reduce")
        all_finite = pending["finite"] and all(ray.get(finite_refs))
        began = time.perf_counter()
        if all_finite:
            self.optimizer.apply(self.params, pending["mean"], step)
        self.version = step + 1
        self.pending = None
        stats = {k: v for k, v in pending.items() if k != "mean"}
        stats["applied"] = all_finite
        stats["reduce_apply_s"] = pending["reduce_s"] + time.perf_counter() - began
        stats["version"] = self.version
        return self.params, stats

    @ray.method(num_returns=2)
    def apply(self, step: int, result_refs: list):
        """`reduce` then `commit` in one call, for a server that holds the whole
        vector: one actor hop less on every step's critical path."""
        self.reduce(step, result_refs)
        return self.commit(step, [])

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
