"""A sync step as a graph of actor calls, and its three executors.

One description (`describe_step`): the servers publish the parameters, every
worker computes its shards from them, the servers reduce and apply (for k
servers, each reduces its slice, then each commits if every slice was
finite). Three executors of it, behind one interface (`execute`, `result`,
`hung`, `close`):

- `CompiledStep`: compiled to Ray's shared-memory channels, with no task
  submission per step and never through the driver; the parameters and
  gradients themselves go through shared files (workers.shared), only
  handles through the channels (measured here: a 2-worker step's overhead
  over its compute fell from ~9 ms to ~1.8 ms).
- `DirectStep`: ordinary actor calls that depend on nothing (but k > 1
  servers' `commit`, on their `reduce`s' finite flags): the driver names
  the arrays each actor will offer, and the actors wait for each other
  over their own array services (workers.transport), zero-copy through
  shared files between those on the driver's node. No step waits for the
  driver or for Ray to resolve a dependency.
- `InterpretedStep`: the calls chained by object refs, when the job cannot
  have the array transport; Ray hands each call its inputs once they
  exist, so a step still needs no driver round trip. The arrays go through
  shared files on one node, else through Ray's object store.

`workers.sync_loop` compiles only when every actor of the job is on one node
of the private Ray instance this process started (a local run, the embedded
service), and takes the direct graph everywhere else. Ray 2.60's compiled
graphs are experimental, and only in instances of our own have they held:
across nodes their channels crashed a raylet on teardown here, and a service
attached to a one-node `ray start` cluster failed two CI runs out of three,
the last with its compiled step waiting for good (cause not found). A
channel to a reader on another node is a second buffer on that node, each
write copied into it by a raylet RPC.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable, Protocol

import ray
from ray.dag import InputNode, MultiOutputNode
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from workers import transport
from workers.pool import JobCancelled
from workers.protocol import ResultAt, SharedAt, StepPlan, StepStats, WorkerResult

HUNG_PROBE_TIMEOUT_S = 5.0  # how long a worker may take to say whether it is computing
RESULT_POLL_S = 0.5
FIRST_FAILURE_WAIT_S = 5.0  # how long a failed direct step's other calls may take to fail in turn


def describe_step(servers: list, workers: list, plan, call: Callable, worker_calls: list | None = None) -> list:
    """One step's actor calls, made through `call(method, *args)` (`bind` to
    describe a graph to compile, `remote` to make the calls). Returns one
    output per server, in slice order; the workers' calls are added to
    `worker_calls` when given."""
    params = [call(s.publish_step, plan) for s in servers]
    results = [call(w.step, plan, *params) for w in workers]
    if worker_calls is not None:
        worker_calls.extend(results)
    if len(servers) == 1:
        return [call(servers[0].apply, plan, *results)]
    finite = [call(s.reduce, plan, *results) for s in servers]
    return [call(s.commit, plan, *finite) for s in servers]


class StepGraph(Protocol):
    transport: str

    def execute(self, plan: StepPlan) -> list: ...
    def result(self, outputs: list, cancelled: threading.Event) -> StepStats: ...
    def hung(self, step: int, limit: float) -> list[int]: ...
    def close(self) -> None: ...


class CompiledStep:
    """The step compiled to shared-memory channels (actors on one node).

    Waiting for a result polls shared memory, so the job's loop waits in a
    thread at the lowest priority (workers.runtime.run_at_low_priority)."""

    transport = "shared memory"

    def __init__(self, servers: list, workers: list, max_inflight: int):
        with InputNode() as plan:
            out = MultiOutputNode(describe_step(servers, workers, plan, lambda method, *args: method.bind(*args)))
        self.compiled = out.experimental_compile(_max_inflight_executions=max_inflight)
        self.workers = workers

    def execute(self, plan: StepPlan) -> list:
        return self.compiled.execute(plan)

    def result(self, outputs: list, cancelled: threading.Event) -> StepStats:
        """The step's statistics, every array in them copied out of the channel.

        Ray deserializes a channel's arrays without copying them, and the
        channel's buffer cannot be written again while any such array lives:
        holding the parameters of three evaluated steps stopped a graph for
        good here. A copy (only evaluation and checkpoint steps carry arrays)
        leaves what the coordinator and its callers keep independent of the
        graph."""
        return StepStats.join([_owned(ref.get(timeout=-1)) for ref in outputs])

    def hung(self, step: int, limit: float) -> list[int]:
        """Positions of the workers computing for over limit / 2, or not
        answering within HUNG_PROBE_TIMEOUT_S. Each answers on a thread of its own
        (GradientWorker.computing_for), and the driver makes no other calls to
        them while the graph runs, so an answer waits for nothing else."""
        refs = [w.computing_for.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=HUNG_PROBE_TIMEOUT_S)
        hung = []
        for i, ref in enumerate(refs):
            try:
                seconds = ray.get(ref) if ref in ready else None
                stuck = ref not in ready or (seconds is not None and seconds > limit / 2)
            except (RayActorError, RayTaskError):
                stuck = True
            if stuck:
                hung.append(i)
        return hung

    def close(self) -> None:
        try:
            self.compiled.teardown()
        except Exception:  # an actor of the graph already died
            pass


def _owned(stats: StepStats) -> StepStats:
    """`stats` with its arrays replaced by copies that own their memory."""
    def own(a):
        return a if a.flags.owndata else a.copy()

    states = tuple(replace(s, params=own(s.params), optimizer={k: own(v) for k, v in s.optimizer.items()})
                   for s in stats.states)
    return replace(stats, params=own(stats.params) if stats.params is not None else None, states=states)


class InterpretedStep:
    """The same step as ordinary actor calls chained by object refs: each
    actor runs its calls in the order they were made."""

    transport = "object store"

    def __init__(self, servers: list, workers: list):
        self.servers, self.workers = servers, workers
        self._worker_calls: dict[int, list] = {}  # step -> each worker's call, for hung()

    def execute(self, plan: StepPlan) -> list:
        calls: list = []
        out = describe_step(self.servers, self.workers, plan, lambda method, *args: method.remote(*args), calls)
        self._worker_calls[plan.step] = calls
        self._worker_calls.pop(plan.step - 8, None)  # a few steps back is plenty
        return out

    def result(self, outputs: list, cancelled: threading.Event) -> StepStats:
        while True:  # polling, so that a cancel is seen promptly
            if cancelled.is_set():
                raise JobCancelled("cancelled")
            try:
                return StepStats.join(ray.get(outputs, timeout=RESULT_POLL_S))
            except GetTimeoutError:
                continue

    def hung(self, step: int, limit: float) -> list[int]:
        """Positions (in `workers`) of the workers whose part of `step` has
        not finished."""
        calls = self._worker_calls.get(step, [])
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=0) if calls else ([], [])
        return [i for i, ref in enumerate(calls) if ref not in done]

    def close(self) -> None:
        pass


class DirectStep(InterpretedStep):
    """The step as actor calls that depend on nothing (with k > 1 servers,
    `commit` on the `reduce`s' finite flags, through the driver): the actors
    wait for each other over their array services (workers.transport), so
    no step waits for the driver, and Ray only carries the calls.

    The driver names every array before it exists: a server's parameters of
    step n, each worker's result of step n (its summary and gradient rows).
    A worker's `step` pulls the parameters as soon as they are offered, a
    server's `apply` (or `reduce`) pulls the results the same way, and each
    call is submitted the moment the plan is made. When an actor's part of
    a step fails, its service refuses every reader of that step or later
    (transport.Aborted), so the actors waiting for it fail at once in turn,
    and `result` names the first failure among the calls in flight rather
    than the refusals that followed it."""

    transport = "tcp"

    def __init__(self, servers: list, workers: list, indices: list[int], opened: transport.Opened,
                 on_shared_node: list[bool] | None = None, shared_params: list | None = None):
        super().__init__(servers, workers)
        self.indices, self.opened = list(indices), opened
        self.on_shared_node = on_shared_node or [False] * len(workers)
        self.shared_params = shared_params or [None] * len(servers)  # SharedArray of a server on the shared node
        self._published: dict[int, list] = {}  # step -> the servers' publish_step calls
        self._server_calls: dict[int, list] = {}  # step -> the servers' reduce, commit or apply calls

    def execute(self, plan: StepPlan) -> list:
        if not self._published:  # later steps' parameters are offered by the commit of the step before
            self._published[plan.step] = [s.publish_step.remote(plan) for s in self.servers]
        over_tcp = [replace(h, step=plan.step, wait=True) for h in self.opened.servers]
        in_files = [p if f is None else SharedAt(p, f) for p, f in zip(over_tcp, self.shared_params)]
        calls = [w.step.remote(plan, *(in_files if local else over_tcp))
                 for w, local in zip(self.workers, self.on_shared_node)]
        places = [ResultAt(i, replace(h, key="summary", step=plan.step, dtype="<f8", wait=True,
                                      length=WorkerResult.summary_size(len(plan.assignment[i]))), local)
                  for i, h, local in zip(self.indices, self.opened.workers, self.on_shared_node)]
        finite = []
        if len(self.servers) == 1:
            out = [self.servers[0].apply.remote(plan, *places)]
        else:
            finite = [s.reduce.remote(plan, *places) for s in self.servers]
            out = [s.commit.remote(plan, *finite) for s in self.servers]
        self._worker_calls[plan.step], self._server_calls[plan.step] = calls, finite + out
        for kept in (self._worker_calls, self._server_calls):
            kept.pop(plan.step - 8, None)
        return out

    def result(self, outputs: list, cancelled: threading.Event) -> StepStats:
        try:
            return super().result(outputs, cancelled)
        except RayTaskError as err:
            if isinstance(err.cause, (transport.Refused, transport.Aborted)):
                raise self._first_failure() or err from None
            raise

    def _first_failure(self) -> Exception | None:
        """What failed first when a server was refused or its peer aborted,
        among every call of the graph still kept (the steps in flight): an
        actor's death, else an error of an actor's own, else a lost peer,
        else an aborted one."""
        kept = (*self._worker_calls.values(), *self._published.values(), *self._server_calls.values())
        calls = [ref for refs in kept for ref in refs]
        done, _ = ray.wait(calls, num_returns=len(calls), timeout=FIRST_FAILURE_WAIT_S) if calls else ([], [])
        failures = []
        for ref in done:
            try:
                ray.get(ref)
            except RayActorError as err:
                return err
            except RayTaskError as err:
                failures.append(err)
        rank = {transport.PeerLost: 1, transport.Aborted: 2, transport.Refused: 3}
        failures.sort(key=lambda e: next((r for t, r in rank.items() if isinstance(e.cause, t)), 0))
        return failures[0] if failures else None


def build_step_graph(servers: list, workers: list, indices: list[int], compiled: bool, max_inflight: int,
                     opened: transport.Opened | None, on_shared_node: list[bool] | None = None,
                     shared_params: list | None = None) -> StepGraph:
    """The compiled graph when asked (every actor of the job and this driver
    on one node of a Ray instance this process started), else the direct
    one when the job has the array transport (zero-copy between the actors
    on the shared node), else the interpreted one."""
    if compiled:
        return CompiledStep(servers, workers, max_inflight)
    if opened is not None:
        return DirectStep(servers, workers, indices, opened, on_shared_node, shared_params)
    return InterpretedStep(servers, workers)
