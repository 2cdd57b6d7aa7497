"""Finishing a step: the one routine both modes end every step or update with.

It feeds the non-finite guard (which fails the job after K skipped steps in
a row), skips what was already reported (steps made again after a
recovery), makes the step's history record (with its health, each worker's
compute and wait seconds, and the job's goodput so far), has the validation
split evaluated (by the workers: workers.evaluation) when the step brought
parameters, writes a checkpoint when it brought the servers' state, and hands
the record on. It also owns the job's checkpoints, whose counters are the
guard's, and its goodput clock (workers.goodput), which it tells where each
interval of time went.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from core.health import StepHealth
from core.mlp import MLP
from core.provenance import params_sha256, records_params
from core.spec import JobSpec, stop_step
from core.trainer import NonFiniteGuard, should_evaluate, step_record
from workers.checkpoint import Checkpoint, JobCheckpoints
from workers.goodput import GoodputClock
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
    health: StepHealth | None = None
    worker_compute_s: tuple = ()  # per worker, in the pool's order (None: not in this update)
    worker_wait_s: tuple = ()
    params: np.ndarray | None = None  # to evaluate
    state: ServerState | None = None  # to checkpoint
    counters: Mapping = field(default_factory=dict)  # more for the checkpoint (async: each shard's position)


class Reporter:
    def __init__(self, spec: JobSpec, net: MLP, evaluate: Callable[[np.ndarray], tuple], checkpoints: JobCheckpoints,
                 counters: Counters, on_step: Callable[[dict], None], goodput: GoodputClock):
        self.spec, self.net, self.evaluate = spec, net, evaluate
        self.checkpoints, self.counters, self.on_step = checkpoints, counters, on_step
        self.goodput = goodput
        self.guard = NonFiniteGuard(spec.training.max_nonfinite_steps)
        self.reported = 0  # steps reported; never goes backwards
        self._arrivals: deque = deque(maxlen=9)  # arrival times of the last results
        self._last = time.perf_counter()

    def should_evaluate(self, step: int) -> bool:
        return should_evaluate(self.spec, step)

    def should_checkpoint(self, step: int) -> bool:
        every, steps = self.spec.training.checkpoint_every, stop_step(self.spec)
        return every > 0 and (step + 1) % every == 0 and step + 1 < steps

    def restart_clock(self, cause: str | None = None) -> None:
        """After a pause (start-up, a recovery, a resize; None: more of the
        last one's work): its time goes to `cause`, samples/s starts afresh."""
        self._account(cause)
        self._last = time.perf_counter()
        self._arrivals.clear()

    def _account(self, cause: str | None) -> None:
        self.goodput.close(cause)
        self.counters.goodput = self.goodput.snapshot()

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
        seconds, finished_at = self._seconds_per_step(), time.time()
        try:
            self.guard.record(o.step, o.applied, o.loss)
        finally:
            self.counters.nonfinite_skipped = self.guard.skipped
        if o.step + 1 <= self.reported:
            self._account("replay")
            return  # made again after a recovery: already reported, and its numbers are the same
        extra = {} if o.staleness is None else {"staleness": o.staleness}
        if o.staleness is not None:
            self.counters.staleness.append(o.staleness)
        if o.health is not None:
            extra.update(o.health.fields())
        record = step_record(self.spec, o.step, o.loss, o.count, seconds, o.applied, workers=o.workers,
                             version=o.version, **extra, phases=dict(o.phases),
                             worker_compute_s=list(o.worker_compute_s), worker_wait_s=list(o.worker_wait_s),
                             finished_at=finished_at)
        if o.params is not None:
            with self.goodput.timing("evaluation"):
                record["val_loss"], record["val_accuracy"] = self.evaluate(o.params)
        if o.state is not None:
            self.checkpoint(o.step + 1, o.state, o.counters)
        after = o.params if o.params is not None else o.state.params if o.state is not None else None
        if after is not None and records_params(self.spec, o.step):
            record["params_sha256"] = params_sha256(after)  # comparable with the reference trainer's
        self.reported = o.step + 1
        self._account("step")
        record["goodput"] = self.counters.goodput
        self.on_step(record)

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int, state: ServerState, counters: Mapping = {}) -> None:
        with self.goodput.timing("checkpoint"):
            self.checkpoints.write(step, state.params, state.optimizer, {
                "nonfinite_streak": self.guard.streak, "nonfinite_skipped": self.guard.skipped, **counters})

    def final_checkpoint(self, state: ServerState) -> None:
        """The trained state's checkpoint, after the last step: the time since
        that step (fetching the state, writing it) is the checkpoint's."""
        self.checkpoint(stop_step(self.spec), state)
        self._account("checkpoint")

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest good checkpoint, with the guard set back to its counters."""
        ckpt = self.checkpoints.latest()
        if ckpt is not None:
            self.guard.streak = ckpt.counters.get("nonfinite_streak", 0)
            self.guard.skipped = ckpt.counters.get("nonfinite_skipped", 0)
        return ckpt
