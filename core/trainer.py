"""The single-process reference trainer, and the one definition of a step.

A step is: each logical shard's gradient SUM at the current parameters, added
in shard order, divided by the total sample count, checked for finiteness,
and handed to the optimizer. `shard_gradient`, `reduce_gradients` and
`apply_gradient` are that definition; the distributed trainer calls these same
functions, which is why its weights match `train`'s bit for bit.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from core.data import load_dataset
from core.datafiles import DataError, DataLimits
from core.health import StepHealth
from core.mlp import MLP
from core.optim import Optimizer, learning_rate, make_optimizer
from core.provenance import params_sha256, records_params
from core.rows import PreparedRows, RowSource
from core.shards import Shard, make_shards, shard_range
from core.spec import JobSpec, load_spec, stop_step


class TrainingError(RuntimeError):
    """A job that cannot go on; the message says which step and why."""


class DataFault(TrainingError):
    """The job's data failed a check where it was read (a prepared set's file
    missing, truncated or altered, say): an error of the job, never retried
    as a worker's fault. The message names the file."""


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Pin BLAS to one thread: its results depend on its thread count (OpenBLAS
    gives other bits with 1 and 2 threads), so shard gradients always use one
    and parallelism comes from computing shards concurrently."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass
class ShardGradient:
    """One shard's contribution to one step: the SUM of per-sample gradients."""

    shard: int
    step: int
    grad_sum: np.ndarray
    count: int
    loss_sum: float


@dataclass
class ShardedData:
    """A job's row source and its logical shards: what a trainer reads from."""

    dataset: RowSource
    shards: list[Shard]

    @classmethod
    def from_spec(cls, spec: JobSpec, data_roots: Sequence[str | Path] | None = None,
                  limits: DataLimits = DataLimits()) -> "ShardedData":
        from core.data_source import resolve  # it builds on core.data, as this module does

        prepared = resolve(spec.data, dtype=spec.training.dtype, data_roots=data_roots, limits=limits)
        if prepared is not None:
            if prepared.n_train < spec.data.shards:
                raise DataError(f"data.shards ({spec.data.shards}) exceeds the training rows "
                                f"({prepared.n_train}) of {spec.data.source!r}")
            rows = PreparedRows(prepared, spec.training.dtype, spec.data.standardize)
        else:
            rows = load_dataset(spec.data, spec.seed, spec.training.dtype, data_roots, limits)
        return cls(rows, make_shards(rows.n_train, spec.data.shards, spec.training.batch_size, spec.seed))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The stored training rows [start, stop) shard `shard` owns."""
        return shard_range(self.dataset.n_train, len(self.shards), shard)

    def own(self, shards: Sequence[int]) -> None:
        """Hold the rows of `shards` (a prepared set's: checked, then read)."""
        self.dataset.own([self.shard_range(s) for s in shards])

    def batch(self, shard: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of shard `shard`'s mini-batch for step `step`."""
        return self.dataset.take(self.shards[shard].batch(step))


def output_units(spec: JobSpec, dataset: RowSource) -> int:
    """Output width: one unit per class, except one sigmoid unit for a binary
    classifier trained with cross-entropy (its 0/1 labels are the targets)."""
    if dataset.n_classes is None:
        return dataset.n_targets
    if spec.model.output == "sigmoid" and spec.model.loss == "cross_entropy" and dataset.n_classes == 2:
        return 1
    return dataset.n_classes


def build_network(spec: JobSpec, dataset: RowSource) -> MLP:
    """The job's network at step 0, deterministic in the spec's seed."""
    m = spec.model
    net = MLP(
        [dataset.n_features, *m.hidden, output_units(spec, dataset)],
        activation=m.activation, output=m.output, loss=m.loss, bias=m.bias,
        init=m.init, seed=spec.seed, dtype=spec.training.dtype,
    )
    if dataset.mean is not None:
        net.normalizer = (dataset.mean, dataset.scale)
    return net


def shard_gradient(net: MLP, data: ShardedData, shard: int, step: int, out: np.ndarray | None = None) -> ShardGradient:
    """Shard `shard`'s gradient sum at the parameters of version `step`
    (written into `out` when given: a flat buffer shaped like the parameters).

    The caller pins BLAS to one thread (`one_blas_thread`)."""
    return batch_gradient(net, *data.batch(shard, step), shard, step, out)


def batch_gradient(net: MLP, X: np.ndarray, y: np.ndarray, shard: int, step: int,
                   out: np.ndarray | None = None) -> ShardGradient:
    """The gradient sum of one shard's batch rows (X, y) for step `step`."""
    loss_sum, grad_sum, count = net.grad_sum(X, y, out=out)
    return ShardGradient(shard, step, grad_sum, count, float(loss_sum))


def reduce_gradients(grads: Sequence[ShardGradient]) -> tuple[np.ndarray, float, int]:
    """Mean gradient, mean loss and sample count of one step.

    Gradients are added in shard order, ((g0 + g1) + g2) + ..., then divided
    by the total count: float addition is not associative, so the order is
    part of the definition."""
    assert [g.shard for g in grads] == sorted(g.shard for g in grads), "gradients must come in shard order"
    total = grads[0].grad_sum.copy()
    for g in grads[1:]:
        total += g.grad_sum
    count = sum(g.count for g in grads)
    np.divide(total, total.dtype.type(count), out=total)
    loss = sum(g.loss_sum for g in grads) / count
    return total, loss, count


def apply_gradient(params: np.ndarray, optimizer: Optimizer, grad: np.ndarray, step: int) -> bool:
    """Apply the optimizer in place if the gradient is finite; False if skipped."""
    if not np.isfinite(grad).all():
        return False
    optimizer.apply(params, grad, step)
    return True


def evaluate(net: MLP, X: np.ndarray, y: np.ndarray, chunk: int = 4096) -> tuple[float | None, float | None]:
    """Mean loss and accuracy (None for regression) over a held-out set."""
    blocks = [eval_block(net, X[a:a + chunk], y[a:a + chunk]) for a in range(0, len(X), chunk)]
    return combine_evaluation(blocks, len(X), y.ndim == 1)


def eval_block(net: MLP, X: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """One evaluation block's loss sum and correct count (0 for regression)."""
    correct = int(np.sum(predicted_labels(net.forward(X)) == y)) if y.ndim == 1 else 0
    return net.loss_sum(X, y), correct


def combine_evaluation(blocks: Sequence[tuple[float, int]], rows: int,
                       classification: bool) -> tuple[float | None, float | None]:
    """Mean loss and accuracy from the blocks' sums, added in block order
    (that order is part of the definition: whoever evaluated each block,
    the result has the same bits)."""
    if rows == 0:
        return None, None
    loss_sum, correct = 0.0, 0
    for block_loss, block_correct in blocks:
        loss_sum += block_loss
        correct += block_correct
    return loss_sum / rows, (correct / rows if classification else None)


def evaluate_source(net: MLP, rows: RowSource) -> tuple[float | None, float | None]:
    """`evaluate` over a row source's validation rows, block by block."""
    blocks = [eval_block(net, *rows.val_block(k)) for k in range(rows.n_val_blocks)]
    return combine_evaluation(blocks, rows.n_val, rows.n_classes is not None)


def predicted_labels(outputs: np.ndarray) -> np.ndarray:
    """Class labels from output activations: argmax, or p > 0.5 for one sigmoid unit."""
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0.5).astype(np.int64)
    return np.argmax(outputs, axis=1)


def step_record(spec: JobSpec, step: int, loss: float, count: int, seconds: float,
                applied: bool, **extra) -> dict:
    """One row of a job's history: the same fields for every trainer."""
    return {
        "step": step + 1,
        "loss": loss,
        "samples": count,
        "samples_per_s": count / seconds if seconds > 0 else None,
        "lr": learning_rate(spec.training.optimizer, step, spec.training.steps),
        "skipped": not applied,
        "val_loss": None,
        "val_accuracy": None,
        **extra,
    }


def should_evaluate(spec: JobSpec, step: int) -> bool:
    """Evaluate after update `step` (0-based) every eval_every steps and at
    the job's stop (`training.stop_at`, else the end): a sweep ranks its
    trials by the metrics found there."""
    done = step + 1
    every = spec.training.eval_every
    return done == stop_step(spec) or (every > 0 and done % every == 0)


class NonFiniteGuard:
    """Counts skipped non-finite steps and fails the job after K in a row."""

    def __init__(self, limit: int, streak: int = 0, skipped: int = 0):
        self.limit, self.streak, self.skipped = limit, streak, skipped

    def record(self, step: int, applied: bool, loss: float) -> None:
        if applied:
            self.streak = 0
            return
        self.streak += 1
        self.skipped += 1
        if self.streak >= self.limit:
            raise TrainingError(
                f"step {step + 1}: {self.streak} non-finite steps in a row "
                f"(training.max_nonfinite_steps is {self.limit}; last loss {loss}); "
                "try a smaller learning rate"
            )


@dataclass
class TrainState:
    """Where a job stands after `step` updates: what a continuation needs
    (the data position is a function of the step, see core.shards)."""

    step: int
    params: np.ndarray
    optimizer: dict[str, np.ndarray]
    nonfinite_streak: int = 0
    nonfinite_skipped: int = 0


def train(
    spec: JobSpec | dict | str | Path,
    *,
    data_roots: Sequence[str | Path] | None = None,
    threads: int | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> tuple[MLP, list[dict]]:
    """Train a job in this process; returns the network and its history.

    Shards run concurrently on a pool of `threads` (default: every core),
    each with one BLAS thread, so the bits do not depend on `threads`."""
    net, history, _ = train_from(spec, None, data_roots=data_roots, threads=threads, on_step=on_step)
    return net, history


def train_from(
    spec: JobSpec | dict | str | Path,
    start: TrainState | None,
    *,
    data_roots: Sequence[str | Path] | None = None,
    threads: int | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> tuple[MLP, list[dict], TrainState]:
    """Train from `start` (None: step 0) to the job's stop (`training.stop_at`,
    else `training.steps`); returns the network, the history of the steps
    made here and the state to continue from. Stopping at k and continuing
    gives the bits of an uninterrupted run: the schedule always follows
    `training.steps`, and the batches and updates depend only on the step."""
    spec = load_spec(spec)
    data = ShardedData.from_spec(spec, data_roots)
    net = build_network(spec, data.dataset)
    t = spec.training
    optimizer = make_optimizer(t.optimizer, net.params.size, net.params.dtype, t.steps)
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    first = 0
    if start is not None:
        if start.step > stop_step(spec):
            raise TrainingError(f"cannot continue from step {start.step}: past this job's stop at step "
                                f"{stop_step(spec)}")
        net.params[:] = start.params
        optimizer.load_state_dict(start.optimizer)
        guard.streak, guard.skipped, first = start.nonfinite_streak, start.nonfinite_skipped, start.step
    history: list[dict] = []
    S = len(data.shards)
    layers = net.layer_bounds()
    with one_blas_thread(), ThreadPoolExecutor(max_workers=min(S, threads or os.cpu_count() or 1)) as pool:
        for step in range(first, stop_step(spec)):
            began = time.perf_counter()
            grads = list(pool.map(lambda s: shard_gradient(net, data, s, step), range(S)))
            grad, loss, count = reduce_gradients(grads)
            before = net.params.copy()
            applied = apply_gradient(net.params, optimizer, grad, step)
            guard.record(step, applied, loss)
            health = StepHealth.measure(grad, before, net.params, layers)
            record = step_record(spec, step, loss, count, time.perf_counter() - began, applied, **health.fields(),
                                 finished_at=time.time())
            if should_evaluate(spec, step):
                record["val_loss"], record["val_accuracy"] = evaluate_source(net, data.dataset)
            if records_params(spec, step):
                record["params_sha256"] = params_sha256(net.params)
            history.append(record)
            if on_step is not None:
                on_step(record)
    end = TrainState(stop_step(spec), net.params.copy(), optimizer.state_dict(),
                     guard.streak, guard.skipped)
    return net, history, end
