"""Async mode: shard gradients applied as they arrive.

Each worker computes one shard batch at a time on the newest parameters it
was given, and the server applies each shard gradient as it arrives,
refusing any computed more than `max_staleness` versions ago. Not
bit-reproducible with several workers: the order of updates follows timing.
With one worker the order is fixed, so a failure changes no bit.

No shard batch is ever applied twice or skipped: a batch is marked taken
only when its update is accepted, and a shard is never given to two workers
at once (shards move between workers when workers come and go). A lost
worker's batch is computed again on the newest parameters; after the server
is restored from a checkpoint, the updates since are made again, and
computations made for the old server are dropped as they end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from workers.checkpoint import Checkpoint
from workers.job import JobParts
from workers.protocol import UpdateStats
from workers.recovery import Loss, Work, job_error
from workers.reporting import Outcome

WAIT_S = 0.5  # how long one wait for a result lasts, so that a cancel or a resize is seen


@dataclass(frozen=True)
class Computation:
    """One worker's computation in flight."""

    work: Work
    shard: int
    batch: int
    version: int  # of the parameters it is computed on
    generation: int  # of the server it is for (AsyncRun.generation)
    token: int  # the watchdog's
    epoch: int  # the job's membership epoch it was made in (workers.fencing)

    @property
    def index(self) -> int:
        return self.work.workers[0]


@dataclass
class AsyncRun:
    """Where the job is."""

    params_ref: object  # the newest parameters
    version: int
    taken: list[int]  # per shard: batches applied so far
    start: int  # the version the run began at (applied_batches[i] is update start + i + 1)
    turns: dict = field(default_factory=dict)  # worker index -> updates it made (where it is in its shards)
    inflight: dict = field(default_factory=dict)  # result ref -> Computation
    generation: int = 0  # bumped when the server is restored


def async_position(version: int, shards: int) -> list[int]:
    """How many batches each shard has contributed after `version` updates,
    were the shards taken in turn (exact with one worker, whose turns go
    round its shards in order)."""
    return [version // shards + (1 if s < version % shards else 0) for s in range(shards)]


class AsyncLoop:
    computing = False  # it sees a cancel within WAIT_S: never a step to end by killing its workers

    def __init__(self, job: JobParts, applied_batches: list[tuple[int, int]]):
        self.job = job
        self.server = None  # async mode has one parameter server
        self.applied_batches = applied_batches  # (shard, batch) of every applied update, in order

    def run(self, start: int, resumed: Checkpoint | None) -> list:
        """Make updates `start`... to the end; returns refs to the final parameters."""
        job = self.job
        self.server = job.servers.actors[0]
        run = AsyncRun(self.server.publish.remote(), start, self._taken(resumed, start), start)
        self._submit(run)
        self._updates(run)
        return [run.params_ref]

    def _updates(self, run: AsyncRun) -> None:
        job, t = self.job, self.job.spec.training
        while run.version < t.steps:
            job.check_going_on()
            change = job.wanted_workers()
            if change is not None:
                job.resize(change)
                self._submit(run)
            ready, _ = ray.wait(list(run.inflight), num_returns=1, timeout=WAIT_S)
            if ready:
                self._arrived(run, ready[0])
                self._submit(run)

    def _arrived(self, run: AsyncRun, ref) -> None:
        job, t = self.job, self.job.spec.training
        c = run.inflight.pop(ref)
        job.watchdog.finished(c.token)
        if c.generation != run.generation or c.epoch != job.membership.epoch:
            return  # computed for a server since replaced, or by a former membership: the server would refuse it
        new_params, stats_ref = self.server.push.remote(c.version, t.max_staleness, [ref])
        try:
            stats: UpdateStats = ray.get(stats_ref)
            if not stats.accepted:
                if not stats.fenced:  # a fenced one is reported with the server's refusals (workers.fencing)
                    job.reporter.counters.stale_rejected += 1
                return
            run.params_ref, run.version = new_params, stats.version
            run.taken[c.shard] += 1
            run.turns[c.index] = run.turns.get(c.index, 0) + 1
            self.applied_batches.append((c.shard, c.batch))
            self._finish(run, stats)
        # The order matters: a RayTaskError caused by a dead worker is also a
        # RayActorError (Ray's as_instanceof_cause), a dead server's is not.
        except RayTaskError as err:  # the worker's computation failed
            cause = err.cause if err.cause is not None else err
            if isinstance(cause, RayActorError) or (isinstance(cause, ObjectLostError) and
                                                    not job.pool.alive(c.index)):
                if c.index in job.pool.indices:  # else: dropped already
                    self._recover(run, Loss(c.work, (c.index,), servers=False))
            elif not isinstance(cause, ObjectLostError):  # else: its result was lost, not it: made again
                raise job_error(cause) from None
        except (RayActorError, ObjectLostError):  # the server died: in push, evaluation or checkpoint
            making = run.version + 1
            self._recover(run, Loss(Work(("update", making), f"update {making}", making), (), servers=True))

    def _finish(self, run: AsyncRun, stats: UpdateStats) -> None:
        reporter, step = self.job.reporter, run.version - 1
        fresh = step + 1 > reporter.reported  # else made again after a restore: already reported
        params = state = None
        if fresh and reporter.should_evaluate(step):
            with reporter.goodput.timing("evaluation"):
                params = self.job.servers.fetch([run.params_ref])
        if fresh and reporter.should_checkpoint(step):
            with reporter.goodput.timing("checkpoint"):
                state = self.job.servers.state()  # pushes are serial: its version is step + 1
        # An update is one worker's: the others' times are None in it.
        slots = self.job.pool.indices
        compute, wait = [None] * len(slots), [None] * len(slots)
        if stats.worker in slots:
            compute[slots.index(stats.worker)], wait[slots.index(stats.worker)] = stats.compute_s, stats.wait_s
        reporter.finish(Outcome(step, stats.loss, stats.count, stats.skipped == 0, stats.version,
                                len(self.job.pool), {"compute": stats.compute_s, "reduce_apply": stats.reduce_apply_s},
                                staleness=stats.staleness, health=stats.health, worker_compute_s=tuple(compute),
                                worker_wait_s=tuple(wait), params=params, state=state,
                                counters={"async_taken": list(run.taken)}))

    def _recover(self, run: AsyncRun, loss: Loss) -> None:
        resumption = self.job.recover(loss, run.version)
        ckpt = resumption.checkpoint
        if ckpt is not None:
            self.server = self.job.servers.actors[0]
            # the updates after the checkpoint are made again, and recorded again
            del self.applied_batches[max(0, ckpt.step - run.start):]
            run.params_ref, run.version, run.taken, run.turns = self.server.publish.remote(), ckpt.step, \
                self._taken(ckpt, ckpt.step), {}
            run.generation += 1  # computations in flight stay, to be dropped as they end

    def _taken(self, ckpt: Checkpoint | None, version: int) -> list[int]:
        """Per shard, the batches applied by `version`: as the checkpoint
        recorded them, else as if the shards had been taken in turn (right
        for one worker, and for version 0)."""
        S = self.job.spec.data.shards
        recorded = ckpt.counters.get("async_taken") if ckpt is not None else None
        if isinstance(recorded, list) and len(recorded) == S and all(isinstance(n, int) for n in recorded):
            return list(recorded)
        return async_position(version, S)

    def _submit(self, run: AsyncRun) -> None:
        """Give a computation to every worker that has none in flight: the next
        of its shards in turn that no other worker is computing (a worker all
        of whose shards are taken waits for the next arrival)."""
        job = self.job
        live = set(job.pool.indices)
        for ref in [r for r, c in run.inflight.items() if c.index not in live]:
            job.watchdog.finished(run.inflight.pop(ref).token)  # a dropped worker's
        busy = {c.index for c in run.inflight.values()}
        computing = {c.shard for c in run.inflight.values() if c.generation == run.generation}
        assignment = job.pool.assignment()
        for member in job.pool.members:
            if member.index in busy:
                continue
            own = assignment[member.index]
            first = run.turns.setdefault(member.index, run.version)
            free = [s for s in (own[(first + j) % len(own)] for j in range(len(own))) if s not in computing]
            if not free:
                continue
            shard, batch = free[0], run.taken[free[0]]
            work = Work(("batch", shard, batch), f"shard {shard}'s batch {batch}", run.version + 1, (member.index,))
            epoch = job.membership.epoch
            ref = member.actor.compute.remote(batch, (shard,), [run.params_ref], epoch)
            run.inflight[ref] = Computation(work, shard, batch, run.version, run.generation,
                                            job.watchdog.started(work, ref), epoch)
            computing.add(shard)
