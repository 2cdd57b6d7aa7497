"""The worker pool: a job's gradient workers, and which shards each owns.

It starts workers and waits for Ray to place them (seeing a cancel while it
waits), finds and drops the dead, kills the hung, shrinks and grows to a
target, and grows back when capacity lost with a node returns. Shards go
round-robin over the live workers in the order they joined: shard s to
worker s mod W. Each worker has an index that is never reused in the job, so
a worker's name in errors, its fault plan in tests and its shared files are
its own.

How a worker is started is a plug-in (`start_worker`): production starts a
GradientWorker; tests and chaos runs pass a fault plan (workers.faults).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from core.datafiles import DataLimits
from core.spec import JobSpec
from core.trainer import TrainingError
from workers.gradient_worker import GradientWorker
from workers.protocol import WorkerLocation, WorkersStarted
from workers.runtime import ALIVE_TIMEOUT_S, kill_actor
from workers.shared import JobFiles

START_TIMEOUT_S = 300.0
STARTS_IF_NONE_LIVE = 3  # tries at starting workers when every one dies starting
CAPACITY_RECHECK_S = 1.0  # asking the cluster for free CPUs costs a round trip


class JobCancelled(Exception):
    """The job was cancelled; its actors are gone and its CPUs free."""


class StartWorker(Protocol):
    def __call__(self, spec: JobSpec, index: int, data_roots: list[str] | None, cpus: int, limits: DataLimits): ...


def start_gradient_worker(spec: JobSpec, index: int, data_roots: list[str] | None, cpus: int, limits: DataLimits,
                          actor_class=GradientWorker, *more):
    """A GradientWorker actor (or one of `actor_class`, given `more`
    arguments) reserving `cpus` CPUs, spread over the nodes, reading its
    data within `limits`."""
    return actor_class.options(num_cpus=cpus, scheduling_strategy="SPREAD").remote(
        spec, index, data_roots, cpus, limits, *more)


@dataclass(frozen=True)
class Member:
    index: int
    actor: object
    location: WorkerLocation


class WorkerPool:
    def __init__(self, spec: JobSpec, data_roots: list[str] | None, limits: DataLimits, cancelled: threading.Event,
                 files: JobFiles, on_event: Callable, start_worker: StartWorker = start_gradient_worker):
        self.spec, self.data_roots, self.limits, self.cancelled, self.files = spec, data_roots, limits, cancelled, files
        self.on_event, self.start_worker = on_event, start_worker
        self.members: list[Member] = []
        self.locations: dict[int, WorkerLocation] = {}  # every worker the job started, by index
        self.nodes: set[str] = set()  # every node a worker of the job ran on
        self._next_index = 0
        self._no_capacity_at = 0.0
        self._lock = threading.Lock()  # members change in the job's thread, are killed from others

    def __len__(self) -> int:
        return len(self.members)

    @property
    def actors(self) -> list:
        return [m.actor for m in self.members]

    @property
    def indices(self) -> list[int]:
        return [m.index for m in self.members]

    def assignment(self) -> dict[int, tuple[int, ...]]:
        """Worker index -> its shards: shard s to the (s mod W)-th live worker."""
        W, S = len(self.members), self.spec.data.shards
        return {m.index: tuple(range(w, S, W)) for w, m in enumerate(self.members)}

    def distribute(self, epoch: int | None = None) -> tuple[int, ...]:
        """Give each live worker its shards (and the job's membership epoch,
        workers.fencing) and wait until it holds their rows (a prepared
        set's files checked against the manifest, then read:
        GradientWorker.own). Returns the workers found dead meanwhile; a
        worker's error ends the job (a DataFault names the bad file)."""
        from workers.recovery import job_error  # workers.recovery builds on this module

        assignment = self.assignment()
        calls = [(m.index, m.actor.own.remote(assignment[m.index], epoch)) for m in self.members]
        dead = []
        for index, call in calls:
            try:
                self._wait(call)
            except RayActorError:
                dead.append(index)
            except RayTaskError as err:
                raise job_error(err.cause if err.cause is not None else err, f"worker {index}: ") from None
        return tuple(dead)

    def _wait(self, ref) -> None:
        """ray.get(ref), seeing a cancel promptly."""
        while not ray.wait([ref], timeout=0.5)[0]:
            if self.cancelled.is_set():
                raise JobCancelled("cancelled while its workers were reading their shards")
        ray.get(ref)

    # ------------------------------------------------------------ starting

    def start(self, count: int) -> None:
        """Start `count` workers and wait until each is placed and running.
        Those lost while starting (their node cut off, say) are not retried
        here: the capacity that is left takes their shards, and the pool grows
        back when it can (see `wanted`); only if none started is the start
        tried again, up to STARTS_IF_NONE_LIVE times."""
        for _ in range(STARTS_IF_NONE_LIVE):
            if self._start_once(count) or self.members:
                return
        raise TrainingError(f"{count} worker(s) died while starting, {STARTS_IF_NONE_LIVE} times over "
                            "(their nodes lost, or their processes killed); cluster resources: "
                            f"{ray.available_resources()}")

    def _start_once(self, count: int) -> int:
        """One try at starting `count` workers; how many started."""
        cpus = self.spec.resources.cpus_per_worker
        new = []
        for _ in range(count):
            new.append((self._next_index, self.start_worker(self.spec, self._next_index, self.data_roots, cpus,
                                                            self.limits)))
            self._next_index += 1
        try:
            where = self._placed([actor for _, actor in new])
        except GetTimeoutError:
            self._kill([actor for _, actor in new])
            raise TrainingError(
                f"{count} worker(s) of {cpus} CPU(s) could not be placed within {START_TIMEOUT_S:.0f} s; "
                f"cluster resources: {ray.available_resources()}") from None
        except RayTaskError as err:
            self._kill([actor for _, actor in new])
            raise TrainingError(f"a worker could not start: {err.cause or err}") from None
        except RayActorError as err:  # its constructor raised (bad data, say)
            self._kill([actor for _, actor in new])
            raise TrainingError(f"a worker could not start: {_last_line(err)}") from None
        self._kill([actor for (_, actor), loc in zip(new, where) if loc is None])
        started = [(i, actor, loc) for (i, actor), loc in zip(new, where) if loc is not None]
        with self._lock:
            self.members.extend(Member(i, actor, loc) for i, actor, loc in started)
        self.locations.update((loc.index, loc) for _, _, loc in started)
        self.nodes.update(loc.node_id for _, _, loc in started)
        if started:
            self.on_event(WorkersStarted(len(self.members), tuple(sorted({loc.node_id for _, _, loc in started}))))
        return len(started)

    def _placed(self, actors: list) -> list[WorkerLocation | None]:
        """Wait for new workers to be placed and started, seeing a cancel
        promptly; each one's location, None for those that died with their
        process or node (a constructor that raised is raised)."""
        refs = [a.location.remote() for a in actors]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.5)
            if len(ready) == len(refs):
                return [_started(ref) for ref in refs]
            if self.cancelled.is_set():
                self._kill(actors)
                raise JobCancelled("cancelled while its workers were starting")
            if time.monotonic() > deadline:
                raise GetTimeoutError("workers not placed in time")

    def placeable(self) -> int:
        """How many more workers the cluster's free CPUs hold now."""
        free = ray.available_resources().get("CPU", 0.0)
        return int(free // self.spec.resources.cpus_per_worker)

    def wanted(self, target: int) -> int | None:
        """The worker count to change to at the next step boundary, if any:
        down to `target`, or up towards it as far as capacity allows."""
        have = len(self.members)
        if target <= have:
            return target if target < have else None
        now = time.monotonic()
        if now - self._no_capacity_at < CAPACITY_RECHECK_S:
            return None
        placeable = self.placeable()
        if placeable <= 0:
            self._no_capacity_at = now
            return None
        return have + min(placeable, target - have)

    def resize(self, target: int) -> None:
        if target > len(self.members):
            self.start(target - len(self.members))
        else:
            self.drop([m.index for m in self.members[target:]])

    def refill(self, target: int) -> None:
        """After a loss: start the missing workers that fit now; the rest come
        back when capacity does (see `wanted`), the survivors taking over the
        lost shards meanwhile. With no worker left, wait for room for one."""
        missing = target - len(self.members)
        placeable = min(missing, self.placeable())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.members and placeable < 1:
            if self.cancelled.is_set():
                raise JobCancelled("cancelled while waiting for capacity")
            if time.monotonic() > deadline:
                raise TrainingError("every worker was lost and no capacity came back to restart one")
            time.sleep(0.5)
            placeable = min(missing, self.placeable())
        if placeable > 0:
            self.start(placeable)

    # ------------------------------------------------------------ losing

    def alive(self, index: int) -> bool:
        return any(m.index == index and _alive(m.actor) for m in self.members)

    def dead(self) -> tuple[int, ...]:
        """Indices of the workers that do not answer."""
        return tuple(m.index for m in self.members if not _alive(m.actor))

    def drop(self, indices) -> list[int]:
        """Kill these workers, forget them and remove their shared files; returns
        those that were members."""
        wanted = set(indices)
        with self._lock:
            dropped = [m for m in self.members if m.index in wanted]
            self.members = [m for m in self.members if m.index not in wanted]
        self._kill([m.actor for m in dropped])
        for m in dropped:
            self.files.drop_worker(m.index)
        return [m.index for m in dropped]

    def kill(self, indices=None) -> None:
        """Kill workers (every one by default) but keep them as members: the
        job notices them dead, and recovers, where it waits for them."""
        with self._lock:
            actors = [m.actor for m in self.members if indices is None or m.index in indices]
        self._kill(actors)

    def shutdown(self) -> None:
        self.drop(self.indices)

    @staticmethod
    def _kill(actors: list) -> None:
        for actor in actors:
            kill_actor(actor)


def _last_line(err: Exception) -> str:
    """What an actor's failed start says in the end: the exception raised in
    its constructor (`module.Class: message` as `Class: message`), without
    Ray's traceback around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[-1]) if lines else type(err).__name__


def _started(ref) -> WorkerLocation | None:
    """A new worker's location, or None if it died with its process or node
    before answering; an error raised in its constructor is raised."""
    try:
        return ray.get(ref)
    except RayActorError as err:
        if err.actor_init_failed:
            raise
        return None


def _alive(actor) -> bool:
    try:
        ray.get(actor.location.remote(), timeout=ALIVE_TIMEOUT_S)
        return True
    except (RayActorError, GetTimeoutError):
        return False
