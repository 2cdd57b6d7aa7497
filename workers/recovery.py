"""Failures: one policy and one recovery routine for sync and async jobs.

A loss names the piece of work that was being made when actors died (a sync
step, an async shard batch or update), the workers found dead and whether a
parameter server died. Recovery drops the dead workers, restores the servers
from the latest checkpoint when they died or ran ahead of the results
received, starts replacements that fit, and says where the job goes on from.
The arithmetic of every step is fixed by the step and its shards, so the job
ends with the same bits.

An exception raised by a worker's own code (not its death) is an error of
the job, never retried: `job_error` makes it one, a `DataFault` when the
data failed a check (a prepared set's file missing, truncated or altered).

The policy decides when to give up: a piece of work whose actors die
LOSSES_PER_WORK times (something in it kills them: memory, say), or that
hangs HANGS_PER_WORK times (see workers.watchdog), fails the job.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from core.datafiles import DataError
from core.trainer import DataFault, TrainingError
from workers.checkpoint import Checkpoint
from workers.pool import WorkerPool
from workers.protocol import Counters, Recovered
from workers.servers import ServerGroup

HANGS_PER_WORK = 3
LOSSES_PER_WORK = 5


@dataclass(frozen=True)
class Work:
    """A piece of work the job waits for: a sync step or an async batch."""

    key: tuple  # ("step", n) or ("batch", shard, batch) or ("update", n)
    name: str  # for errors: "step 3", "shard 2's batch 5"
    step: int  # the (1-based) step or update it makes
    workers: tuple[int, ...] | None = None  # who makes it; None: the step graph knows


@dataclass(frozen=True)
class Loss:
    work: Work
    workers: tuple[int, ...]  # indices of the workers lost
    servers: bool  # a parameter server died


def job_error(cause: BaseException, where: str = "") -> TrainingError:
    """The error a worker's exception ends the job with: its message (after
    `where`, e.g. "worker 2: "), a DataFault for bad data."""
    message = f"{where}{str(cause).strip()}"
    return DataFault(message) if isinstance(cause, DataError) else TrainingError(message)


class ActorLost(Exception):
    def __init__(self, loss: Loss):
        super().__init__(f"{len(loss.workers)} worker(s) lost{' and a parameter server' if loss.servers else ''} "
                         f"making {loss.work.name}")
        self.loss = loss


@dataclass(frozen=True)
class Resumption:
    step: int  # the next step (sync) or version (async) to make
    checkpoint: Checkpoint | None  # the servers were restored from it


class FailurePolicy:
    def __init__(self, worker_timeout_s: float, counters: Counters):
        self.limit, self.counters = worker_timeout_s, counters
        self._hangs: dict[tuple, int] = {}
        self._losses: dict[tuple, int] = {}
        self._killed_for_hang: set[int] = set()
        self._lock = threading.Lock()  # hangs are counted in the watchdog's thread, losses in the loop's
        self.given_up: TrainingError | None = None  # set (from the watchdog's thread) at a last hang

    def hung(self, works: list[Work], workers: list[int]) -> None:
        """Count a hang of each of `works`, whose `workers` are about to be killed."""
        with self._lock:
            self._count_hang(works, workers)

    def _count_hang(self, works: list[Work], workers: list[int]) -> None:
        self.counters.hung_workers += len(workers)
        self._killed_for_hang.update(workers)
        for w in works:
            count = self._hangs[w.key] = self._hangs.get(w.key, 0) + 1
            if count >= HANGS_PER_WORK:
                self.given_up = TrainingError(
                    f"{w.name} hung {count} times: no result within resources.worker_timeout_s "
                    f"({self.limit:g} s) with workers started afresh each time; if this job's steps are that "
                    "slow, raise it")

    def check(self) -> None:
        """Raise the reason the job gives up, if the watchdog found one."""
        if self.given_up is not None:
            raise self.given_up

    def lost(self, loss: Loss) -> None:
        """Count a loss of actors making `loss.work`, unless it is workers the
        watchdog killed (a hang, counted as one); raise at the last."""
        self.check()
        with self._lock:
            killed = self._killed_for_hang.intersection(loss.workers)
            self._killed_for_hang.difference_update(loss.workers)
        if killed:
            return
        key = loss.work.key
        count = self._losses[key] = self._losses.get(key, 0) + 1
        if count >= LOSSES_PER_WORK:
            raise TrainingError(f"{loss.work.name}: actors of the job died {count} times while making it; "
                                "giving up (their logs say why; a batch too large for a worker's memory, say)")


class Recovery:
    def __init__(self, pool: WorkerPool, servers: ServerGroup, latest_checkpoint: Callable[[], Checkpoint | None],
                 policy: FailurePolicy, counters: Counters, on_event: Callable):
        self.pool, self.servers, self.latest_checkpoint = pool, servers, latest_checkpoint
        self.policy, self.counters, self.on_event = policy, counters, on_event

    def recover(self, loss: Loss, resume_at: int, reported: int, target_workers: int) -> Resumption:
        """Heal the job after `loss`; `resume_at` is the oldest step (or
        version) whose result was not received, `reported` the steps already
        reported (those made again count as replayed)."""
        began = time.perf_counter()
        self.policy.check()
        self.counters.worker_failures += len(self.pool.drop(loss.workers))
        if loss.servers:
            self.counters.server_failures += 1
        # The servers may have applied steps whose results were lost with the
        # graph; going back to a checkpoint keeps every step reported once.
        ckpt = self.restore_servers() if loss.servers or self.servers.ahead_of(resume_at) else None
        self.policy.lost(loss)
        self.pool.refill(target_workers)
        step = ckpt.step if ckpt is not None else resume_at
        seconds = time.perf_counter() - began
        # steps made again that had been reported (those of an earlier replay are counted there)
        replayed = max(0, min(reported, resume_at) - step)
        self.counters.recoveries += 1
        self.counters.steps_replayed += replayed
        self.counters.recovery_seconds += seconds
        self.on_event(Recovered(step, replayed, seconds, loss.servers, len(self.pool)))
        return Resumption(step, ckpt)

    def restore_servers(self) -> Checkpoint:
        """Replace the parameter servers by ones started from the latest
        checkpoint, which it returns."""
        self.servers.kill()
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise TrainingError("a parameter server died and no checkpoint is left to restore it from")
        self.servers.restore(ckpt)
        return ckpt
