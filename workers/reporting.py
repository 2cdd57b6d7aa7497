"""Finishing a step: the one routine both modes end every step or update with.

It feeds the non-finite guard (which fails the job after K skipped steps in
a row), skips what was already reported (steps made again after a
recovery), makes the step's history record, evaluates on the validation
split when the step brought parameters, writes a checkpoint when it brought
the servers' state, and hands the record on. It also owns the job's
checkpoints, whose counters are the guard's.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from core.data import Dataset
from core.mlp import MLP
from core.provenance import params_sha256, records_params
from core.spec import JobSpec, stop_step
from core.trainer import NonFiniteGuard, evaluate, should_evaluate, step_record
from workers.checkpoint import Checkpoint, JobCheckpoints
from workers.protocol import Counters, ServerState


@dataclass(frozen=True)
class Outcome:
    """A step or update as made, whichever the mode."""

    step: int  # 0-based: the update from version `step` to `step + 1`
    loss: float | None
    count: int
    applied: bool
    version: int
    workers: int
    phases: Mapping[str, float]
    staleness: int | None = None  # async only
    params: np.ndarray | None = None  # to evaluate
    state: ServerState | None = None  # to checkpoint
    counters: Mapping = field(default_factory=dict)  # more for the checkpoint (async: each shard's position)


class Reporter:
    def __init__(self, spec: JobSpec, net: MLP, validation: Dataset, checkpoints: JobCheckpoints,
                 counters: Counters, on_step: Callable[[dict], None]):
        self.spec, self.net, self.validation = spec, net, validation
        self.checkpoints, self.counters, self.on_step = checkpoints, counters, on_step
        self.guard = NonFiniteGuard(spec.training.max_nonfinite_steps)
        self.reported = 0  # steps reported; never goes backwards
        self._arrivals: deque = deque(maxlen=9)  # arrival times of the last results
        self._last = time.perf_counter()

    def should_evaluate(self, step: int) -> bool:
        return should_evaluate(self.spec, step)

    def should_checkpoint(self, step: int) -> bool:
        every, steps = self.spec.training.checkpoint_every, stop_step(self.spec)
        return every > 0 and (step + 1) % every == 0 and step + 1 < steps

    def restart_clock(self) -> None:
        """After a pause (start-up, a recovery): samples/s starts afresh."""
        self._last = time.perf_counter()
        self._arrivals.clear()

    def _seconds_per_step(self) -> float:
        # Results of pipelined steps arrive in bursts, so samples/s is taken
        # over the last few arrivals rather than from one gap.
        now = time.perf_counter()
        if not self._arrivals:
            self._arrivals.append(self._last)
        self._arrivals.append(now)
        self._last = now
        return (now - self._arrivals[0]) / (len(self._arrivals) - 1)

    def finish(self, o: Outcome) -> None:
        seconds = self._seconds_per_step()
        try:
            self.guard.record(o.step, o.applied, o.loss)
        finally:
            self.counters.nonfinite_skipped = self.guard.skipped
        if o.step + 1 <= self.reported:
            return  # made again after a recovery: already reported, and its numbers are the same
        extra = {} if o.staleness is None else {"staleness": o.staleness}
        if o.staleness is not None:
            self.counters.staleness.append(o.staleness)
        record = step_record(self.spec, o.step, o.loss, o.count, seconds, o.applied, workers=o.workers,
                             version=o.version, **extra, phases=dict(o.phases))
        if o.params is not None:
            # The coordinator holds the validation split; workers hold only training shards' work.
            record["val_loss"], record["val_accuracy"] = evaluate(self.net.bind(o.params), self.validation.X_val,
                                                                  self.validation.y_val)
        if o.state is not None:
            self.checkpoint(o.step + 1, o.state, o.counters)
        after = o.params if o.params is not None else o.state.params if o.state is not None else None
        if after is not None and records_params(self.spec, o.step):
            record["params_sha256"] = params_sha256(after)  # comparable with the reference trainer's
        self.reported = o.step + 1
        self.on_step(record)

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, state: ServerState, counters: Mapping = {}) -> None:
        self.checkpoints.write(step, state.params, state.optimizer, {
            "nonfinite_streak": self.guard.streak, "nonfinite_skipped": self.guard.skipped, **counters})

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest good checkpoint, with the guard set back to its counters."""
        ckpt = self.checkpoints.latest()
        if ckpt is not None:
            self.guard.streak = ckpt.counters.get("nonfinite_streak", 0)
            self.guard.skipped = ckpt.counters.get("nonfinite_skipped", 0)
        return ckpt
