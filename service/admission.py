"""Admission: what a job will need, computed before it is stored, and held
against the service's limits.

From the spec and its data's metadata (`core.metadata.describe`, a
bounded-memory pass that never loads the set) `job_cost` counts the network's
parameters over all its layers, the optimizer's state, the bytes each worker,
the parameter servers and the service's coordinator will hold (of a prepared
set, a worker holds only its shards' rows and the coordinator none), the
CPUs, and how often the job evaluates and checkpoints. `admit` refuses, naming the
figure and the limit, a job past any limit in `Settings`; the loader enforces
the data limits again where the data is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.data import DataError
from core.data_source import NotPrepared
from core.metadata import DataMetadata, describe
from core.prepared_manifest import EVAL_BLOCK_ROWS
from core.spec import JobSpec, validation_rows
from core.trainer import output_units
from service.settings import Settings


class Refused(ValueError):
    """A job the service will not take; the message names the figure and the limit."""


@dataclass(frozen=True)
class JobCost:
    """What a job needs. Bytes are estimates of peak memory: the data as
    loaded (float64) and its standardized copy, and vectors of `parameters`
    values in the training dtype."""

    sizes: list[int]  # layer widths, inputs first
    parameters: int
    optimizer_state: int  # vectors of `parameters` values the optimizer keeps (momentum 1, adam 2)
    train_rows: int
    worker_bytes: int  # each gradient worker
    server_bytes: int  # all parameter-server slices together
    service_bytes: int  # the job's coordinator, in the service process
    job_bytes: int  # all of it
    cpus: int
    evaluations: int
    checkpoints: int


def parameter_count(sizes: list[int], bias: bool) -> int:
    """Weights of every layer, inputs to outputs, and a bias per unit past the inputs."""
    return sum(a * b + (b if bias else 0) for a, b in zip(sizes, sizes[1:]))


def optimizer_state(spec: JobSpec) -> int:
    opt = spec.training.optimizer
    return 2 if opt.name == "adam" else int(opt.momentum > 0)


def _occasions(steps: int, every: int) -> int:
    """How many times something done every `every` steps (0: only at the end) happens in a job."""
    return 1 if every == 0 else steps // every + 1


def job_cost(spec: JobSpec, meta: DataMetadata) -> JobCost:
    t, r = spec.training, spec.resources
    sizes = [meta.n_features, *spec.model.hidden, output_units(spec, meta)]
    n = parameter_count(sizes, spec.model.bias)
    value = 4 if t.dtype == "float32" else 8
    vector = n * value
    val_rows = validation_rows(meta.rows, spec.data.validation_split)
    shard_batch = math.ceil(t.batch_size / spec.data.shards)
    if meta.prepared:
        # a worker holds its shards' rows, standardized (at most ceil(S/W) shards of ceil(n/S) rows),
        # and evaluates one block of validation rows at a time; the coordinator holds no rows
        S, W = spec.data.shards, r.workers
        held = math.ceil(S / W) * math.ceil((meta.rows - val_rows) / S)
        labels = 8 * (1 if meta.n_classes is not None else meta.n_targets)  # int64 classes, float64 targets
        data = held * (meta.n_features * value + labels)
        evaluation = min(val_rows, EVAL_BLOCK_ROWS) * sum(sizes) * value
        service_data = service_evaluation = 0
    else:
        data = meta.bytes + meta.rows * meta.n_features * value  # as read, then standardized
        evaluation, service_data = 0, data  # the coordinator checks and splits the data first
        service_evaluation = val_rows * sum(sizes) * value
    # each CPU of a worker computes one shard at a time: a gradient sum, and activations and deltas
    worker = data + evaluation + vector + r.cpus_per_worker * (vector + 2 * shard_batch * sum(sizes) * value)
    state = optimizer_state(spec)
    # parameters, the reduced gradient, the optimizer's state and its one or two work buffers
    server = vector * (2 + state + (2 if t.optimizer.name == "adam" or t.optimizer.nesterov else 1))
    # the data, the network, a checkpoint's copy, evaluation
    service = service_data + vector * (2 + state) + service_evaluation
    return JobCost(
        sizes=sizes, parameters=n, optimizer_state=state, train_rows=meta.rows - val_rows,
        worker_bytes=worker, server_bytes=server, service_bytes=service,
        job_bytes=r.workers * worker + server + service, cpus=r.workers * r.cpus_per_worker,
        evaluations=_occasions(t.steps, t.eval_every), checkpoints=_occasions(t.steps, t.checkpoint_every),
    )


def admit(spec: JobSpec, settings: Settings) -> JobCost | None:
    """The job's cost, or Refused naming the first figure past its limit.
    A large raw source not prepared yet has no metadata to judge: only the
    limits that do not depend on the data are checked (None), and the job
    is admitted again once its data is prepared (service/job_runner.py)."""
    try:
        meta = describe(spec.data, [str(r) for r in settings.data_roots], settings.data_limits(),
                        spec.training.dtype)
    except NotPrepared:
        _refuse_first(_spec_problems(spec, settings))
        return None
    except DataError as err:
        raise Refused(str(err)) from None
    cost = job_cost(spec, meta)
    _refuse_first(_problems(spec, cost, settings))
    return cost


def _refuse_first(problems) -> None:
    problem = next(problems, None)
    if problem is not None:
        raise Refused(problem)


def _spec_problems(spec: JobSpec, s: Settings):
    """Each limit the spec alone passes, as a message."""
    t = spec.training
    if t.steps > s.max_steps:
        yield f"training.steps ({t.steps}) is more than the limit of {s.max_steps} (max_steps)"
    for field, every, limit, name in (("eval_every", t.eval_every, s.max_evaluations, "evaluations"),
                                      ("checkpoint_every", t.checkpoint_every, s.max_checkpoints, "checkpoints")):
        count = _occasions(t.steps, every)
        if count > limit:
            yield (f"training.{field} ({every}) with {t.steps} steps makes {count} {name}, more than the limit "
                   f"of {limit} per job (max_{name}); use {field} >= {math.ceil(t.steps / (limit - 1))}")


def _problems(spec: JobSpec, cost: JobCost, s: Settings):
    """Each limit the job passes, as a message, in the order they are checked."""
    t, source = spec.training, spec.data.source
    yield from _spec_problems(spec, s)
    if spec.data.shards > cost.train_rows:
        yield (f"data.shards ({spec.data.shards}) exceeds the training rows ({cost.train_rows}) of {source!r}")
    if t.batch_size > cost.train_rows:
        yield (f"training.batch_size ({t.batch_size}) exceeds the training rows ({cost.train_rows}) of "
               f"{source!r}: a step would use rows more than once")
    if spec.model.output == "softmax" and cost.sizes[-1] < 2:
        yield (f"model.output 'softmax' needs at least 2 output units, and {source!r} has one regression target "
               "(its labels are not all integers): use output 'identity' with loss 'squared_error'")
    if cost.parameters > s.max_parameters:
        yield (f"the network {' -> '.join(map(str, cost.sizes))} has {cost.parameters} parameters, "
               f"more than the limit of {s.max_parameters} (max_parameters)")
    for what, figure, limit, name in (
            ("each worker", cost.worker_bytes, s.max_worker_bytes, "max_worker_bytes"),
            ("the service's coordinator", cost.service_bytes, s.max_service_bytes, "max_service_bytes"),
            ("the job", cost.job_bytes, s.max_job_bytes, "max_job_bytes")):
        if figure > limit:
            yield f"{what} would need about {figure} bytes, more than the limit of {limit} ({name})"
