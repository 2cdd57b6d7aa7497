"""Membership epochs: what fences a job off from its own former actors.

The job's membership epoch is a number the coordinator advances on every
change of the job's actor set: when it starts, after each recovery (workers
dropped or replaced, servers restored) and at each resize. Every sync plan
and async computation carries the epoch it was made in, and every worker
result the epoch of its plan. The servers are told the epoch when they are
started and at each change, and refuse any plan or result of another
(`StaleEpoch`): never applied, kept, and reported here as a `StaleRefused`
event. A worker refuses a plan older than the newest epoch it has seen.

So whatever a host cut off from the job still sends once its link heals —
a result of a step of a torn-down graph, a plan of one — is refused by
rule, whatever Ray has or has not yet declared about its node.
"""

from __future__ import annotations

from typing import Callable

from workers.pool import WorkerPool
from workers.protocol import Counters, EpochAdvanced, StaleRefused
from workers.servers import ServerGroup


class Membership:
    def __init__(self, servers: ServerGroup, pool: WorkerPool, counters: Counters, on_event: Callable):
        self.servers, self.pool, self.counters, self.on_event = servers, pool, counters, on_event
        self.epoch = 0

    def advance(self, reason: str, step: int) -> int:
        """A new epoch for the job's actors as they are now (`reason`:
        "start", "recovery", "restore", "resize"; `step`: steps reported).
        The servers are told it before any plan of it is made (an actor runs
        one caller's calls in order), and hand over what they refused."""
        self.epoch += 1
        self.counters.epoch = self.epoch
        self.report(self.servers.fence(self.epoch))
        self.on_event(EpochAdvanced(self.epoch, step, reason, tuple(self.pool.indices)))
        return self.epoch

    def collect(self) -> None:
        """Report what the servers refused since they were last asked."""
        self.report(self.servers.refusals())

    def report(self, refused: list[StaleRefused]) -> None:
        for event in refused:
            self.counters.fenced += 1
            self.on_event(event)
