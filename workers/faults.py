"""Fault injection for tests, benchmarks and chaos runs — never in production paths.

A `FaultPlan` maps worker indices to the faults their workers suffer, and is
passed to the coordinator as the way to start workers
(`Coordinator(..., start_worker=FaultPlan({1: Faults(fail_at=(3, 5))}))`):
the workers it names are FaultyGradientWorkers (their process title), a subclass that misbehaves
as told; every other worker is a plain GradientWorker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from core.datafiles import DataLimits

from workers.gradient_worker import GradientWorker
from workers.pool import start_gradient_worker


class WorkerFault(RuntimeError):
    """Raised on purpose by a `fail_at` fault."""


@dataclass(frozen=True)
class Faults:
    fail_at: tuple[int, int] | None = None  # (shard, step): raise while computing it
    nan_rows_at: tuple[int, int] | None = None  # (shard, step): the loaded rows go bad under the running job
    delay_s: float = 0.0  # sleep in every computation: a straggler, or with a long delay a hung worker
    cut_arrays_at: int | None = None  # step: once its gradients are offered, close the worker's array
    # service (workers.transport) and its connections, as a cut link would, the worker alive


class FaultyGradientWorker(GradientWorker.__ray_actor_class__):
    """A GradientWorker that suffers `faults`."""

    def __init__(self, spec, index, data_roots=None, threads=1, limits=DataLimits(), faults: Faults = Faults()):
        super().__init__(spec, index, data_roots, threads, limits)
        self.faults = faults
        self._cut = False

    def _shard_gradient(self, net, shard, step, out):
        if self.faults.fail_at == (shard, step):
            raise WorkerFault(f"worker {self.index}, shard {shard}, step {step + 1}: injected failure")
        if self.faults.nan_rows_at == (shard, step):
            self.data.dataset.X_train[self.data.shards[shard].batch(step)[0], 0] = np.nan
        return super()._shard_gradient(net, shard, step, out)

    def _offered(self, plan, grads, result, rows_file=0):
        handles = super()._offered(plan, grads, result, rows_file)
        if self.faults.cut_arrays_at == plan.step and not self._cut:
            self._cut = True
            self._array_service.close()
        return handles

    def _gradients(self, step, shards, params, rows):
        grads = super()._gradients(step, shards, params, rows)
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)
        return grads


FaultyWorkerActor = ray.remote(concurrency_groups={"probe": 1})(FaultyGradientWorker)


@dataclass(frozen=True)
class FaultPlan:
    """Worker index -> its faults; called as the coordinator's `start_worker`."""

    faults: dict[int, Faults]

    def __call__(self, spec, index: int, data_roots, cpus: int, limits: DataLimits):
        faults = self.faults.get(index)
        if faults is None:
            return start_gradient_worker(spec, index, data_roots, cpus, limits)
        return start_gradient_worker(spec, index, data_roots, cpus, limits, FaultyWorkerActor, faults)
