"""Goodput: how much of a job's wall time went to steps that count.

The job's time since its run began is cut into intervals, each ended by the
reporter (workers.reporting): a step reported for the first time ends one
(its time is a step's), a step made again after a recovery ends one (replay),
and a pause ends one: start-up (loading the data, starting the servers and
the workers, building the step graph; also the workers a resize adds),
recovery (from the failure's detection through the restart, with the work
the failure lost). Evaluation and checkpoint writing are timed inside the
interval they happen in and taken out of it. So every second of the wall
time is given to exactly one of: steps, or a cause in CAUSES.

    goodput = step seconds / wall seconds
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

CAUSES = ("startup", "recovery", "replay", "checkpoint", "evaluation")
STEP = "step"


class GoodputClock:
    """Where a job's wall time went, interval by interval (one thread's calls)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self.began = self._mark = now()
        self.step_s = 0.0
        self.lost_s = dict.fromkeys(CAUSES, 0.0)
        self._claimed = 0.0  # seconds of the open interval already given to a cause
        self.paused_for = "startup"  # the last pause's cause

    @contextmanager
    def timing(self, cause: str) -> Iterator[None]:
        """Give the time of the block to `cause` (inside an open interval)."""
        began = self._now()
        try:
            yield
        finally:
            seconds = self._now() - began
            self.lost_s[cause] += seconds
            self._claimed += seconds

    def close(self, cause: str | None = None) -> None:
        """End the open interval: what is not claimed yet goes to `cause`
        (STEP, or one of CAUSES; None: the last pause's, for work a pause
        left to do, like a step graph to build)."""
        now = self._now()
        cause = self.paused_for if cause is None else cause
        rest = now - self._mark - self._claimed
        if cause == STEP:
            self.step_s += rest
        else:
            self.lost_s[cause] += rest
            if cause in ("startup", "recovery"):
                self.paused_for = cause
        self._mark, self._claimed = now, 0.0

    def snapshot(self) -> dict:
        """The accounting so far, as plain data: wall_s = step_s + sum(lost_s)."""
        wall = self._mark - self.began + self._claimed
        return {"ratio": self.step_s / wall if wall > 0 else None, "wall_s": wall, "step_s": self.step_s,
                "lost_s": dict(self.lost_s)}
