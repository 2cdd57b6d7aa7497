"""A running job's parts, as the coordinator wires them for its loop.

The sync and async loops (workers.sync_loop, workers.async_loop) drive a job
through these: the worker pool and the server group that execute, the
reporter that finishes each step, the recovery routine and the watchdog that
handle failures, the membership epoch that fences off former actors
(workers.fencing), and the few decisions both loops take the same way
(cancel, resize, recover: each a new epoch).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from core.spec import JobSpec
from workers.fencing import Membership
from workers.pool import JobCancelled, WorkerPool
from workers.protocol import Resized
from workers.recovery import Loss, Recovery, Resumption
from workers.reporting import Reporter
from workers.servers import ServerGroup
from workers.shared import JobFiles
from workers.watchdog import Watchdog


@dataclass
class JobParts:
    spec: JobSpec
    job_id: str
    pool: WorkerPool
    servers: ServerGroup
    files: JobFiles
    reporter: Reporter
    recovery: Recovery
    watchdog: Watchdog
    cancelled: threading.Event
    membership: Membership  # the job's membership epoch
    target_workers: Callable[[], int]  # what a resize asked for last
    on_event: Callable
    pipeline_depth: int

    def check_going_on(self) -> None:
        """Raise if the job is cancelled, or the watchdog gave it up."""
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled at step {self.reporter.reported}")
        self.recovery.policy.check()

    def wanted_workers(self) -> int | None:
        """The worker count to change to at this step boundary, if any."""
        return self.pool.wanted(self.target_workers())

    def resize(self, workers: int) -> None:
        before = len(self.pool)
        self.pool.resize(workers)
        self.reporter.restart_clock("startup")  # of the workers added (or stopped)
        self.on_event(Resized(before, workers, self.reporter.reported))
        self.membership.advance("resize", self.reporter.reported)

    def recover(self, loss: Loss, resume_at: int) -> Resumption:
        self.check_going_on()
        resumption = self.recovery.recover(loss, resume_at, self.reporter.reported, self.target_workers())
        self.membership.advance("restore" if resumption.checkpoint is not None else "recovery",
                                self.reporter.reported)
        self.reporter.restart_clock("recovery")
        return resumption
