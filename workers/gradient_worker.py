"""The gradient worker: a Ray actor that turns parameters into shard gradients.

Each worker reads the job's data itself (the driver never ships it): an
in-memory source whole, a prepared set only the shards it is given
(`own`: each file checked against the manifest first, core.rows), and the
validation blocks it is asked to evaluate. For a step it computes through core's `shard_gradient` the gradient sum and sample
count of every logical shard it is given, at the published parameters. A
worker with c CPUs computes up to c shards at once, each with one BLAS thread,
so the bits never depend on where or how widely a shard ran.

A worker remembers the newest membership epoch it has been told
(workers.fencing: by `own`, or by a plan), refuses a plan or computation of
an older one (`StaleEpoch`), and stamps each result with its plan's epoch,
which the servers check in turn.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from core.datafiles import DataLimits
from core.mlp import MLP
from core.spec import JobSpec
from core.trainer import ShardGradient, ShardedData, batch_gradient, build_network, eval_block
from workers import shared, transport
from workers.cores import claim_cores
from workers.protocol import SharedAt, StaleEpoch, StepPlan, WorkerLocation, WorkerResult


def fetch_params(param_refs: list) -> tuple[np.ndarray, float, float]:
    """The full parameter vector from the server slices' object refs, with the
    seconds spent waiting for it to be published and transferring it."""
    began = time.perf_counter()
    ray.wait(param_refs, num_returns=len(param_refs), fetch_local=False)
    ready = time.perf_counter()
    slices = ray.get(param_refs)
    flat = slices[0] if len(slices) == 1 else np.concatenate(slices)
    return flat, ready - began, time.perf_counter() - ready


@ray.remote(concurrency_groups={"probe": 1})
class GradientWorker(transport.ArrayPeer):
    def __init__(self, spec: JobSpec, index: int, data_roots: list[str] | None = None, threads: int = 1,
                 limits: DataLimits = DataLimits()):
        # One BLAS thread for the life of the process: see core.trainer.one_blas_thread.
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        self.index = index
        self.data = ShardedData.from_spec(spec, [Path(r) for r in data_roots] if data_roots else None, limits)
        self.net = build_network(spec, self.data.dataset)
        self._owned: tuple[int, ...] = ()  # the shards whose rows it holds (every row, in memory)
        self.threads = max(1, threads)
        self._returned_at: float | None = None  # when `step` last returned (sync mode)
        self._computing_since: float | None = None  # time.monotonic() when the current computation began
        self.pool = ThreadPoolExecutor(max_workers=self.threads)
        # Cores of its own while the machine has free ones: see workers.cores.
        self._pin = spec.resources.pin_cores
        self._cores = claim_cores(self.threads) if self._pin else None
        self._next_claim_at = time.monotonic() + 1.0
        self._views = shared.SharedViews()  # the servers' parameter files
        self._grads_file = shared.OwnedFile(shared.worker_stem(index), "grads")  # this worker's gradient rows
        self._epoch = 0  # the newest membership epoch it has been told (workers.fencing)
        self._node_id: str | None = None

    def _node(self) -> str:
        if self._node_id is None:
            self._node_id = ray.get_runtime_context().get_node_id()
        return self._node_id

    def location(self) -> WorkerLocation:
        return WorkerLocation(self.index, ray.get_runtime_context().get_node_id(), os.getpid(),
                              tuple(self._cores.cores) if self._cores else None)

    def own(self, shards: tuple[int, ...], epoch: int | None = None) -> None:
        """Hold the rows of `shards` and no others, checking every file of a
        prepared set's new ones before they are read (a DataError names the
        file). The pool calls this before a step graph is built, with the
        job's membership epoch; a shard that arrives in a plan unannounced
        is taken on there."""
        if epoch is not None:
            self._see_epoch(epoch, "an assignment", 0)
        self._owned = tuple(shards)
        self.data.own(shards)

    def _see_epoch(self, epoch: int, what: str, step: int) -> None:
        """Refuse `what` (for 1-based `step`) if of an epoch older than the newest seen."""
        if epoch < self._epoch:
            raise StaleEpoch(f"worker {self.index}: refused {what} of membership epoch {epoch} for step {step}; "
                             f"it has seen epoch {self._epoch}")
        self._epoch = epoch

    def _take_on(self, shards: tuple[int, ...]) -> None:
        if not set(shards) <= set(self._owned):
            self.own(tuple(sorted(set(self._owned) | set(shards))))

    def evaluate(self, params: np.ndarray, blocks: tuple[int, ...]) -> list[tuple[int, float, int]]:
        """(block, loss sum, correct count) of validation blocks `blocks` at `params`."""
        net = self.net.bind(params)
        return [(k, *eval_block(net, *self.data.dataset.val_block(k))) for k in blocks]

    def _shard_gradient(self, net: MLP, shard: int, step: int, out: np.ndarray | None) -> ShardGradient:
        X, y = self.data.batch(shard, step)
        # Rows were checked when the data was read; a cheap second look per
        # batch turns data that went bad into a clear error, not a skipped step.
        if not np.isfinite(X).all():
            raise ValueError(f"worker {self.index}, shard {shard}, step {step + 1}: "
                             "the shard's input rows hold non-finite values")
        return batch_gradient(net, X, y, shard, step, out=out)

    def _gradients(self, step: int, shards: tuple[int, ...], params: np.ndarray,
                   rows: np.ndarray | None) -> list[ShardGradient]:
        """Shard gradient sums at `params`: shard i's into `rows[i]` when rows
        are given (this worker's shared file), else into new arrays."""
        net = self.net.bind(params)
        outs = [None] * len(shards) if rows is None else list(rows[:len(shards)])
        if self.threads == 1:  # no hand-off to a pool thread and back
            return [self._shard_gradient(net, s, step, out) for s, out in zip(shards, outs)]
        return list(self.pool.map(lambda s, out: self._shard_gradient(net, s, step, out), shards, outs))

    def _timed(self, step: int, shards: tuple[int, ...], params: np.ndarray,
               rows: np.ndarray | None = None) -> tuple[list[ShardGradient], float]:
        began = time.perf_counter()
        self._computing_since = time.monotonic()
        try:
            grads = self._gradients(step, shards, params, rows)
        finally:
            self._computing_since = None
        return grads, time.perf_counter() - began

    @ray.method(concurrency_group="probe")
    def computing_for(self) -> float | None:
        """Seconds the current computation has run (None: idle). Answered on
        a thread of its own, so a worker stuck in a step still answers, unless
        it is stuck holding the interpreter's lock."""
        since = self._computing_since
        return None if since is None else time.monotonic() - since

    def compute(self, step: int, shards: tuple[int, ...], param_refs: list, epoch: int = 0) -> WorkerResult:
        """Async mode: gradient sums of `shards` at the parameters in
        `param_refs`, for membership epoch `epoch`."""
        self._see_epoch(epoch, "a computation", step + 1)
        params, wait_s, transfer_s = fetch_params(param_refs)
        self._take_on(shards)
        grads, compute_s = self._timed(step, shards, params)
        return WorkerResult(self.index, tuple(grads), compute_s, wait_s=wait_s, transfer_s=transfer_s, epoch=epoch)

    def _grad_rows(self, directory: str | None, count: int, params: np.ndarray) -> np.ndarray | None:
        """Rows of this worker's shared file for `count` shard gradients
        (workers.shared), which the servers reduce from in place; None when the
        job shares no files or this one cannot be made (no room: the
        gradients go through the channels)."""
        if not directory or count == 0:
            return None
        got = self._grads_file.get(directory, count, params.size, params.dtype)
        return None if got is None else got[0]

    def _handles(self, grads: list[ShardGradient], dtype: np.dtype) -> list[ShardGradient]:
        """The shard gradients as handles to their rows of the shared file."""
        return [ShardGradient(g.shard, g.step, shared.SharedArray(self._grads_file.path, dtype.str, g.grad_sum.size, i),
                              g.count, g.loss_sum) for i, g in enumerate(grads)]

    def _parameters(self, param_slices: tuple) -> np.ndarray:
        """The whole vector from the servers' slices as sent: arrays, views
        of their shared files, handles to pull from their array services
        (straight into one vector), or (SharedAt) a shared file to view once
        its server's service says the step's parameters are there."""
        if param_slices and all(isinstance(p, transport.NetArray) for p in param_slices):
            flat = np.empty(sum(p.length for p in param_slices), np.dtype(param_slices[0].dtype))
            cuts = np.cumsum([0] + [p.length for p in param_slices])
            self._pulls().pull([(p, flat[a:b], 0) for p, a, b in zip(param_slices, cuts[:-1], cuts[1:])])
            return flat
        pulls, slices = [], []
        for p in param_slices:
            if isinstance(p, SharedAt):  # nothing read: the pull returns once the step is offered
                pulls.append((p.ready, np.empty(0, np.dtype(p.ready.dtype)), 0))
                p = p.array
            elif isinstance(p, transport.NetArray):
                out = np.empty(p.length, np.dtype(p.dtype))
                pulls.append((p, out, 0))
                p = out
            slices.append(p)
        if pulls:
            self._pulls().pull(pulls)
        slices = [shared.resolve(p, self._views) for p in slices]
        self._views.forget_except({p.path for p in param_slices if isinstance(p, shared.SharedArray)}
                                  | {p.array.path for p in param_slices if isinstance(p, SharedAt)})
        return slices[0] if len(slices) == 1 else np.concatenate(slices)

    def _offered(self, plan: StepPlan, grads: list[ShardGradient], result: WorkerResult,
                 rows_file: int = 0) -> list[ShardGradient]:
        """The shard gradients as handles to this worker's array service,
        which serves them, and the result's summary (WorkerResult.summary,
        naming the shared file that also holds them, if any), until its next
        step."""
        arrays = {f"shard-{g.shard}": g.grad_sum for g in grads}
        arrays["summary"] = result.summary(grads[0].grad_sum.size if grads else 0, rows_file)
        handles = self._offer(plan.net_token, plan.step, arrays)
        return [ShardGradient(g.shard, g.step, handles[f"shard-{g.shard}"], g.count, g.loss_sum) for g in grads]

    def step(self, plan: StepPlan, *param_slices) -> WorkerResult:
        """Sync mode, a node of the job's step graph: the gradient sums of
        this worker's shards for `plan.step`, at the parameters the servers
        publish (one slice per server, in order: arrays, views of shared
        files, or handles to pull, which on the direct graph name a step the
        servers may not have reached yet: the pull waits for it).

        `idle_s` is the time from this worker's return of its previous step
        to its parameters for this one arriving: its gradients going to the
        servers, their reduce and apply, and the new parameters coming back.
        If the step fails, this worker's array service refuses every reader
        (the servers waiting for its gradients learn at once)."""
        with self._aborting(f"worker {self.index}'s step {plan.step + 1}", plan.step, plan.net_token):
            return self._step(plan, param_slices)

    def _step(self, plan: StepPlan, param_slices: tuple) -> WorkerResult:
        self._see_epoch(plan.epoch, "a plan", plan.step + 1)
        if self._cores is None and self._pin and time.monotonic() >= self._next_claim_at:
            # A core may have come free since this worker started (a killed
            # worker's process can outlive its replacement's start by a moment).
            self._cores = claim_cores(self.threads)
            self._next_claim_at = time.monotonic() + 1.0
        params = self._parameters(param_slices)
        arrived = time.perf_counter()
        idle = arrived - self._returned_at if self._returned_at is not None else 0.0
        shards = plan.assignment[self.index]
        if shards != self._owned:
            self.own(shards)
        # The servers read the previous step's rows before publishing this
        # step's parameters, so the rows are free to be written again here.
        shares = plan.shared_dir if plan.shared_node in (None, self._node()) else None
        rows = self._grad_rows(shares, len(shards), params)
        grads, compute_s = self._timed(plan.step, shards, params, rows)
        result = WorkerResult(self.index, tuple(grads), compute_s, idle_s=idle, epoch=plan.epoch)
        if plan.net_token:  # rows over TCP too, for servers on other nodes
            made = self._grads_file.made if rows is not None else 0
            result = replace(result, grads=tuple(self._offered(plan, grads, result, made)))
        elif rows is not None:
            result = replace(result, grads=tuple(self._handles(grads, params.dtype)))
        self._returned_at = time.perf_counter()
        return result
