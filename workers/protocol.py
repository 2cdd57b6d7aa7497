"""The step protocol: every message that crosses an actor or thread boundary.

A step's plan goes from the coordinator to the servers and the workers; a
worker's result goes to the servers; a server's statistics (and, when asked,
its parameters and state) come back to the coordinator; the coordinator
reports typed events to whoever drives it (the service's scheduler, the
`shardprop train` command, tests). Each is a frozen dataclass, so a reader
sees every field in one place and nothing can be added on the way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar, Mapping

import numpy as np

from core.health import StepHealth
from core.trainer import ShardGradient


@dataclass(frozen=True)
class StepPlan:
    """What one sync step is: its number (0-based: the parameters of version
    `step` become version `step + 1`), which shards each worker computes, and
    whether the servers return parameters (to evaluate) or their state (to
    checkpoint) with the step's statistics. `shared_dir` names the job's
    directory for zero-copy arrays (workers.shared), `net_token` the job's
    token for arrays over TCP (workers.transport); both None: send arrays.
    `epoch` is the job's membership epoch the plan was made in
    (workers.fencing): servers and workers refuse a plan of another. With
    both a directory and a token (the direct graph), only the actors on
    node `shared_node` (the driver's) use the files, and the others TCP."""

    step: int
    assignment: Mapping[int, tuple[int, ...]]  # worker index -> its shards, in order
    want_params: bool = False
    want_state: bool = False
    shared_dir: str | None = None
    net_token: str | None = None
    epoch: int = 0
    shared_node: str | None = None


@dataclass(frozen=True)
class WorkerResult:
    """One worker's part of a step (or of an async update): the gradient
    sums of its shards and how its time went, stamped with the membership
    epoch of the plan (or async computation) it was made for."""

    worker: int
    grads: tuple[ShardGradient, ...]
    compute_s: float
    idle_s: float = 0.0  # sync: since the worker returned its previous step
    wait_s: float = 0.0  # async: waiting for the parameters to be published
    transfer_s: float = 0.0  # async: fetching them
    epoch: int = 0

    # A sync result as a float64 vector, for a server to read over TCP
    # beside the gradient rows (workers.transport): the worker, its epoch,
    # compute and idle seconds, the gradients' length, which of the worker's
    # shared files holds its rows (workers.shared.OwnedFile.made; 0: none),
    # the shard count, then each shard's number, sample count and loss sum.
    # Every integer is far below 2**53 and every float is a float64: the
    # vector carries them exactly.
    HEAD: ClassVar[int] = 7

    @staticmethod
    def summary_size(shards: int) -> int:
        return WorkerResult.HEAD + 3 * shards

    def summary(self, length: int, rows_file: int = 0) -> np.ndarray:
        head = [self.worker, self.epoch, self.compute_s, self.idle_s, length, rows_file, len(self.grads)]
        return np.array(head + [x for g in self.grads for x in (g.shard, g.count, g.loss_sum)], np.float64)

    @staticmethod
    def summary_rows_file(values: np.ndarray) -> int:
        return int(values[5])

    @staticmethod
    def from_summary(values: np.ndarray, step: int, grads: list) -> "WorkerResult":
        """The result a summary describes, its gradient sums `grads` (one per
        shard, in the summary's order: arrays or handles)."""
        worker, epoch, compute_s, idle_s, _, _, n = values[:WorkerResult.HEAD].tolist()
        rows = values[WorkerResult.HEAD:].reshape(-1, 3).tolist()
        if int(n) != len(rows) or len(rows) != len(grads):
            raise ValueError(f"a worker's summary names {int(n)} shards in {len(rows)} rows for {len(grads)} gradients")
        return WorkerResult(int(worker), tuple(ShardGradient(int(shard), step, g, int(count), loss)
                                               for (shard, count, loss), g in zip(rows, grads)),
                            compute_s, idle_s=idle_s, epoch=int(epoch))


@dataclass(frozen=True)
class ResultAt:
    """Where worker `worker`'s result of a step will be (the direct step
    graph): `summary` is a handle (workers.transport.NetArray) to its
    WorkerResult.summary on the worker's array service, the gradient rows
    beside it."""

    worker: int
    summary: object
    on_shared_node: bool = False  # the worker is on the plan's shared_node: its rows are in its shared file


@dataclass(frozen=True)
class SharedAt:
    """A server's parameters of a step for a worker on its node (the direct
    step graph): wait until `ready` (a handle to the server's array service,
    of which nothing is read) is offered, then read `array` (a
    workers.shared.SharedArray) in place."""

    ready: object
    array: object


@dataclass(frozen=True)
class ServerState:
    """A parameter server's parameters, optimizer state and version: what a
    checkpoint holds. For k servers, `join` makes the state of the whole
    vector from the slices' (every optimizer rule is elementwise)."""

    params: np.ndarray
    optimizer: Mapping[str, np.ndarray]
    version: int

    @staticmethod
    def join(states: tuple["ServerState", ...]) -> "ServerState":
        """One state from the slices', in slice order: per-element arrays
        joined, scalars (step counts, the same on every slice) kept once."""
        if len(states) == 1:
            return states[0]
        sizes = [s.params.size for s in states]
        optimizer = {}
        for key, first in states[0].optimizer.items():
            parts = [s.optimizer[key] for s in states]
            per_element = first.ndim == 1 and [p.size for p in parts] == sizes
            optimizer[key] = np.concatenate(parts) if per_element else first
        return ServerState(np.concatenate([s.params for s in states]), optimizer, states[0].version)

    def slice(self, start: int, stop: int) -> "ServerState":
        """The state of parameters [start, stop): the inverse of `join`."""
        size = self.params.size
        optimizer = {k: (v[start:stop] if v.ndim == 1 and v.size == size else v) for k, v in self.optimizer.items()}
        return ServerState(self.params[start:stop], optimizer, self.version)


@dataclass(frozen=True)
class StepStats:
    """A sync step as the servers made it: its loss and count, whether it
    was applied (a non-finite mean gradient skips it), the new version, the
    time of each phase of its critical path, each worker's compute and wait
    seconds, the step's health (core.health), and — when the plan asked —
    the new parameters and the servers' states (one per slice)."""

    step: int
    loss: float
    count: int
    applied: bool
    version: int
    reduce_apply_s: float
    compute_s: float  # of the slowest worker
    idle_s: float  # of the slowest worker: its gradients out, the new parameters back
    straggler_wait_s: float  # how long the fastest worker waited for the slowest
    shards: tuple[int, ...]
    worker_compute_s: tuple[float, ...] = ()  # each worker's, in the order of the step's workers
    worker_wait_s: tuple[float, ...] = ()  # each worker's idle_s
    health: StepHealth | None = None  # this slice's (joined: the whole vector's)
    params: np.ndarray | None = None
    states: tuple[ServerState, ...] = ()

    @staticmethod
    def join(outs: list["StepStats"]) -> "StepStats":
        """One step's statistics from every server's, in slice order."""
        if len(outs) == 1:
            return outs[0]
        first = outs[0]
        params = np.concatenate([o.params for o in outs]) if first.params is not None else None
        return replace(first, params=params, states=tuple(s for o in outs for s in o.states),
                       reduce_apply_s=max(o.reduce_apply_s for o in outs),
                       health=StepHealth.join([o.health for o in outs]) if first.health is not None else None)


@dataclass(frozen=True)
class UpdateStats:
    """Async mode: what the server did with one worker's gradients."""

    accepted: bool  # False: refused as more than max_staleness versions old
    staleness: int
    version: int
    loss: float | None = None
    count: int = 0
    skipped: int = 0  # non-finite shard gradients not applied
    reduce_apply_s: float = 0.0
    compute_s: float = 0.0
    wait_s: float = 0.0  # the worker's: waiting for the parameters and fetching them
    health: StepHealth | None = None
    worker: int | None = None  # the index of the worker whose gradients these were
    fenced: bool = False  # refused (accepted False) as of another membership epoch, not for staleness


@dataclass(frozen=True)
class WorkerLocation:
    index: int
    node_id: str
    pid: int
    cores: tuple[int, ...] | None  # pinned cores; None: not pinned


@dataclass(frozen=True)
class ServerLocation:
    index: int
    node_id: str
    pid: int
    version: int


@dataclass
class Counters:
    """Failure and recovery accounting that the service exports as metrics
    (read from other threads: each field is replaced or appended to whole)."""

    worker_failures: int = 0
    server_failures: int = 0
    recoveries: int = 0
    steps_replayed: int = 0
    recovery_seconds: float = 0.0
    nonfinite_skipped: int = 0
    damaged_checkpoints: int = 0
    hung_workers: int = 0  # workers killed for exceeding resources.worker_timeout_s (also in worker_failures)
    stale_rejected: int = 0  # async: gradients refused for exceeding max_staleness
    fenced: int = 0  # plans and results refused as of another membership epoch (workers.fencing)
    epoch: int = 0  # the job's membership epoch now
    staleness: list = field(default_factory=list)  # async: staleness of each applied update
    goodput: dict = field(default_factory=dict)  # where the run's wall time went (workers.goodput.snapshot)
    nodes: set = field(default_factory=set)


class StaleEpoch(RuntimeError):
    """A plan or result of another membership epoch than the receiver's:
    refused, never applied (workers.fencing)."""


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """Something that happened to a job, reported to whoever drives it."""

    kind: ClassVar[str]

    def detail(self) -> dict:
        """The event's fields as JSON data (as the job's timeline stores them)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Resumed(Event):
    kind = "resumed"
    step: int


@dataclass(frozen=True)
class WorkersStarted(Event):
    kind = "workers"
    count: int  # workers the job has now
    nodes: tuple[str, ...]  # where the new ones are


@dataclass(frozen=True)
class GraphBuilt(Event):
    kind = "graph"
    transport: str  # "shared memory" (compiled), "object store" or "tcp" (arrays over workers.transport)
    nodes: int
    step: int
    zero_copy: bool
    fallback: str | None = None  # across nodes and not over tcp: why not (workers.transport.Unavailable)


@dataclass(frozen=True)
class CheckpointWritten(Event):
    kind = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class CheckpointDamaged(Event):
    kind = "checkpoint_damaged"
    path: str
    error: str


@dataclass(frozen=True)
class Recovered(Event):
    kind = "recovery"
    step: int  # where the job goes on from
    steps_replayed: int
    seconds: float
    servers: bool  # a parameter server died (servers that ran ahead are restored too, with this False)
    workers: int  # workers the job has now


@dataclass(frozen=True)
class Resized(Event):
    kind = "resize"
    before: int
    after: int
    step: int

    def detail(self) -> dict:
        return {"from": self.before, "to": self.after, "step": self.step}


@dataclass(frozen=True)
class WorkersHung(Event):
    kind = "hung"
    step: int  # the (1-based) step or update being made
    seconds: float  # resources.worker_timeout_s
    workers: tuple[int, ...]  # indices of the workers killed


@dataclass(frozen=True)
class EpochAdvanced(Event):
    """The job's actor set changed: from now on only plans and results of
    `epoch` are accepted (workers.fencing)."""

    kind = "epoch"
    epoch: int
    step: int  # steps reported when it changed
    reason: str  # "start", "recovery", "restore" (a recovery that restored the servers) or "resize"
    workers: tuple[int, ...]  # the indices of the job's workers in it


@dataclass(frozen=True)
class StaleRefused(Event):
    """A plan or result of another membership epoch, refused by the actor
    that got it (the parameters untouched)."""

    kind = "stale_refused"
    what: str  # "result" (a worker's gradients) or "plan"
    by: str  # who refused it: "server 0", "worker 3"
    worker: int | None  # whose result it was (None: a plan)
    epoch: int  # of the plan or result refused
    current: int  # the receiver's epoch
    step: int  # the (1-based) step or update it was for
