"""Which waiting job runs next: first in first out, with backfill.

The queue is the jobs to resume (found `running` at start) and then the
queued ones, oldest first. A job that can never fit the cluster (it needs
more CPUs than the cluster has in all) is failed at once, with both figures.
The first job that fits the free CPUs starts, even if older jobs wait for
more CPUs than are free (backfill); each older job it passes is *overtaken*
once. A job overtaken `max_overtakes` times is not passed again: nothing
behind it starts until it has started itself, so it gets the next CPUs that
free up and cannot starve. `max_overtakes` 0 is strict FIFO.

A pure function of the queue, the free and total CPUs and the overtake
counts, so the rule is tested as a table (tests/test_queue_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Waiting:
    """A job waiting to run, as far as the queue cares."""

    job_id: str
    workers: int
    cpus_per_worker: int
    resume: bool = False  # found running at start: resumed from its latest checkpoint

    @property
    def cpus(self) -> int:
        return self.workers * self.cpus_per_worker


@dataclass(frozen=True)
class Choice:
    start: Waiting | None  # the job to start now, if any
    never_fit: list[tuple[Waiting, str]] = field(default_factory=list)  # jobs to fail, with the reason
    overtaken: list[str] = field(default_factory=list)  # older jobs `start` passes
    waiting_for: str | None = None  # why the oldest waiting job is not running


def never_fits(job: Waiting, total: float) -> str | None:
    """Why `job` can never run on a cluster of `total` CPUs, or None."""
    if total <= 0 or job.cpus <= total:
        return None  # a cluster with no CPUs yet is one whose nodes have not joined: wait
    return (f"needs {job.cpus} CPUs (resources.workers {job.workers} × cpus_per_worker {job.cpus_per_worker}); "
            f"the cluster has {total:g} in all")


def choose(queue: Sequence[Waiting], free: float, total: float, overtakes: Mapping[str, int],
           max_overtakes: int) -> Choice:
    """The job to start among `queue` (oldest first) given `free` of `total`
    CPUs, and the never-fitting jobs to fail on the way."""
    never_fit, blocked, head_reason = [], [], None
    for job in queue:
        reason = never_fits(job, total)
        if reason is not None:
            never_fit.append((job, reason))
            continue
        if job.cpus <= free:
            return Choice(job, never_fit, [b.job_id for b in blocked], head_reason)
        if head_reason is None:
            head_reason = f"job {job.job_id} needs {job.cpus} CPU(s); the cluster has {max(free, 0):g} free"
        blocked.append(job)
        times = overtakes.get(job.job_id, 0)
        if times >= max_overtakes:
            if max_overtakes > 0:
                head_reason += (f"; job {job.job_id} was overtaken {times} time(s) (max_overtakes), "
                                "so nothing behind it starts before it")
            break
    return Choice(None, never_fit, [], head_reason)
