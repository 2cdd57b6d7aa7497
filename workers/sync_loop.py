"""Sync mode: every step through the job's step graph, pipelined.

Up to `pipeline_depth` steps are in flight, so no driver round trip sits on
the critical path; their results are read in order and each is finished by
the reporter. A cancel or a resize waits for a step boundary: the steps in
flight are finished first. When a result fails, the graph is torn down,
what died is found, and the job recovers (workers.recovery) and goes on from
the step it names, with a new graph over the actors it has then.

The graph is compiled when the job and its driver share one node of the
Ray instance this process started, the arrays (parameters out, gradients
back) through shared files (workers.shared). Anywhere else it is direct:
the actors exchange the arrays over their own TCP services
(workers.transport), zero-copy between those on the driver's node; and
interpreted, the arrays through Ray itself, when the services cannot be had.
"""

from __future__ import annotations

import os
from collections import deque

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayTaskError

from core.spec import stop_step
from core.trainer import TrainingError
from workers import transport
from workers.job import JobParts
from workers.pool import JobCancelled
from workers.protocol import GraphBuilt, ServerState, StepPlan, StepStats
from workers.recovery import ActorLost, Loss, Work, job_error
from workers.reporting import Outcome
from workers.runtime import ALIVE_TIMEOUT_S, started_here
from workers.step_graph import StepGraph, build_step_graph

STEP_GRAPH_ENV = "SHARDPROP_STEP_GRAPH"  # "direct": the direct graph across nodes too


class SyncLoop:
    def __init__(self, job: JobParts):
        self.job = job
        job.watchdog.find_hung = self.find_hung
        self.graph: StepGraph | None = None
        self.shared_dir: str | None = None  # the current graph's (None: arrays go through it)
        self.net_token: str | None = None  # the current graph's, when arrays go over TCP
        self.shared_node: str | None = None  # with a token: the node whose actors use shared_dir
        self.first_step = 0  # the first step the current graph makes

    def run(self, start: int) -> list:
        """Make steps `start`... to the job's stop; returns refs to the final parameters."""
        try:
            self._steps(start)
        finally:
            self.close()
        return self.job.servers.publish()

    def _steps(self, step: int) -> None:
        job, steps = self.job, stop_step(self.job.spec)
        while step < steps:
            job.check_going_on()
            change = job.wanted_workers()
            if change is not None:
                self.close()
                job.resize(change)
                continue
            pending: deque = deque()
            try:
                graph = self.graph or self._build(step)
                while step < steps or pending:
                    while step < steps and len(pending) < job.pipeline_depth:
                        plan = self._plan(step)
                        pending.append((plan, graph.execute(plan)))
                        step += 1
                    stats = self._result(*pending[0])
                    pending.popleft()
                    self._finish(stats)
                    if job.cancelled.is_set() or (step < steps and job.wanted_workers() is not None):
                        self._drain(pending)  # then `step` is the next to run
                        break
            except ActorLost as lost:
                step = job.recover(lost.loss, pending[0][0].step if pending else step).step

    def _drain(self, pending: deque) -> None:
        """Finish the steps in flight (a cancel or a resize waits for a step boundary)."""
        self.job.check_going_on()
        while pending:
            stats = self._result(*pending[0])  # on a failure the step stays pending: see _steps
            pending.popleft()
            self._finish(stats)

    def _plan(self, step: int) -> StepPlan:
        reporter = self.job.reporter
        return StepPlan(step, self.job.pool.assignment(), reporter.should_evaluate(step),
                        reporter.should_checkpoint(step), self.shared_dir, net_token=self.net_token,
                        epoch=self.job.membership.epoch, shared_node=self.shared_node)

    def _build(self, step: int) -> StepGraph:
        job, self.first_step = self.job, step
        # Each worker checks and reads its shards before the graph's first step.
        dead = job.pool.distribute(job.membership.epoch)
        if dead:
            raise ActorLost(Loss(Work(("step", step + 1), f"step {step + 1}", step + 1), dead, servers=False))
        nodes = job.servers.node_ids() | {job.pool.locations[i].node_id for i in job.pool.indices}
        nodes.add(ray.get_runtime_context().get_node_id())  # the driver reads and writes channels too
        # Compiled (Ray's channels, the arrays in the job's files on
        # /dev/shm) when every actor and the driver share one node of a Ray
        # instance this process started; else direct, the actors exchanging
        # the arrays over their own TCP services when they all start and
        # reach each other; else interpreted, the arrays through Ray's object
        # store (or the job's files, on one node).
        compiled = len(nodes) == 1 and started_here()
        opened, fallback = None, None
        if not compiled:
            try:
                opened = transport.open_transport(job.servers.actors, job.pool.actors, ALIVE_TIMEOUT_S)
            except transport.Unavailable as why:
                fallback = str(why)
            except ValueError as err:  # a node's SHARDPROP_DATA_PORTS is malformed
                if len(nodes) > 1:  # across nodes the job needs it: say so, naming the value
                    raise TrainingError(f"the array transport cannot start: {err}") from None
                fallback = str(err)  # on one node the job's files serve as well
        self.net_token = opened.token if opened is not None else None
        self.shared_dir, self.shared_node, local, shared_params = None, None, None, None
        if opened is None:
            self.shared_dir = job.files.directory() if len(nodes) == 1 else None
        else:  # zero-copy between the actors on the driver's node, if any
            here = ray.get_runtime_context().get_node_id()
            local = [job.pool.locations[i].node_id == here for i in job.pool.indices]
            servers_here = [loc.node_id == here for loc in job.servers.locations]
            if any(local) and any(servers_here):
                self.shared_dir = job.files.directory()
            if self.shared_dir is not None:
                self.shared_node = here
                shared_params = self._share_params(servers_here)
        # Across nodes the direct graph is opt-in for now (docs/distributed.md):
        # with it, a cut host that rejoined was seen to lose its new Ray node
        # as the job placed a worker there, in 2 of 2 CI runs (cause not found).
        direct = len(nodes) == 1 or os.environ.get(STEP_GRAPH_ENV) == "direct"
        self.graph = build_step_graph(job.servers.actors, job.pool.actors, job.pool.indices, compiled,
                                      job.pipeline_depth + 1, opened if direct else None, local, shared_params)
        job.on_event(GraphBuilt("tcp" if self.net_token else self.graph.transport, len(nodes), job.reporter.reported,
                                self.shared_dir is not None, fallback))
        job.reporter.restart_clock()  # the build is the work of the pause that needed it
        return self.graph

    def _share_params(self, servers_here: list[bool]) -> list | None:
        """Each server's parameter file on the shared node (None for a
        server elsewhere, or one without room); None when a server does not
        answer (the first step finds out why)."""
        servers = self.job.servers.actors
        refs = [s.share.remote(self.shared_dir) if here else None for s, here in zip(servers, servers_here)]
        try:
            got = ray.get([r for r in refs if r is not None], timeout=ALIVE_TIMEOUT_S)
        except (RayActorError, RayTaskError, GetTimeoutError):
            return None
        it = iter(got)
        return [next(it) if r is not None else None for r in refs]

    @property
    def computing(self) -> bool:
        """Whether a step graph is up (a step may be under way)."""
        return self.graph is not None

    def close(self) -> None:
        """Tear the step graph down, leaving its actors alive and callable."""
        graph, self.graph = self.graph, None
        if graph is not None:
            graph.close()

    def find_hung(self, works: list[Work]) -> list[int]:
        """For the watchdog: the workers that hang in the awaited step, every
        worker when none does (the servers or the transfers hang)."""
        indices = self.job.pool.indices
        positions = self.graph.hung(works[0].step - 1, self.job.watchdog.limit) if self.graph is not None else []
        return [indices[i] for i in positions if i < len(indices)] or indices

    def _finish(self, s: StepStats) -> None:
        # Phases of the step's critical path, from its slowest worker:
        # computing, then moving gradients to the servers and the new
        # parameters back (its idle time less the servers' reduce and apply),
        # and how long the fastest worker waited for it.
        phases = {"compute": s.compute_s, "transfer": max(0.0, s.idle_s - s.reduce_apply_s),
                  "reduce_apply": s.reduce_apply_s, "wait": s.straggler_wait_s}
        # A worker's wait is its idle time before the step: since it returned
        # the step before, none on a graph's first step (the pause before is
        # start-up, a recovery or a resize, accounted as such by goodput).
        waits = s.worker_wait_s if s.step != self.first_step else (0.0,) * len(s.worker_wait_s)
        self.job.reporter.finish(Outcome(s.step, s.loss, s.count, s.applied, s.version, len(self.job.pool), phases,
                                         health=s.health, worker_compute_s=s.worker_compute_s, worker_wait_s=waits,
                                         params=s.params, state=ServerState.join(s.states) if s.states else None))

    def _result(self, plan: StepPlan, outputs: list) -> StepStats:
        """A step's statistics. A worker's or server's error ends the job with
        its message; dead actors are an ActorLost to recover from."""
        job = self.job
        work = Work(("step", plan.step + 1), f"step {plan.step + 1}", plan.step + 1)
        try:
            with job.watchdog.waiting(work):
                return self.graph.result(outputs, job.cancelled)
        except JobCancelled:
            job.check_going_on()
            raise
        except RayTaskError as err:
            cause = err.cause if err.cause is not None else err
            if not isinstance(cause, (RayActorError, RayChannelError, transport.PeerLost, transport.Aborted)):
                raise job_error(cause) from None
            raise self._lost(work, err) from None
        except (RayActorError, RayChannelError, ValueError) as err:
            raise self._lost(work, err) from None

    def _lost(self, work: Work, err: Exception) -> Exception:
        """After a failed step: tear the graph down and find what died."""
        self.close()
        job = self.job
        job.check_going_on()
        servers = not job.servers.alive()
        dead = job.pool.dead()
        # A peer's array service that stopped answering while every actor
        # still answers Ray (a link cut and back, say) is a loss too: the
        # step is made again, up to the policy's limit.
        if servers or dead or isinstance(getattr(err, "cause", err), (transport.PeerLost, transport.Aborted)):
            return ActorLost(Loss(work, dead, servers))
        return TrainingError(f"{work.name} failed: {err}")
