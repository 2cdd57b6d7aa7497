"""The queue: runs stored jobs on Ray, oldest first, with backfill.

A job waits while the concurrency limit is reached (0 pauses execution), while
Ray cannot be reached, or while the cluster lacks the CPUs it asks for; which
waiting job starts next, and which can never fit and fails at once, is
service.queue_policy's decision. Each running job is one Coordinator driven
from a thread of this process (service.job_runner). Jobs found `running` when
the scheduler starts (the service was killed) resume from their latest
checkpoint, each at most `max_resumes` times, so that a job that kills the
service cannot crash-loop it. Sweeps add their trial jobs to the queue
before each decision (service.sweep_runner). Ray is connected when the first job is about to
run (service.ray_connection), with a bounded wait.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from core.spec import JobSpec, SpecError, parse_stored_spec
from service import job_runner
from service.job_runner import Active
from service.metrics import ServiceMetrics
from service.queue_policy import Waiting, choose
from service.ray_connection import RayConnection
from service.settings import Settings
from service.states import TERMINAL
from service.store import IllegalTransition, NotFound, Store, StoreError, StoreUnavailable
from service.sweep_runner import SweepRunner
from workers.protocol import CheckpointWritten, Event, Recovered, Resized, WorkersHung

log = logging.getLogger("shardprop.scheduler")

QUEUE_WINDOW = 64  # queued jobs looked at for one decision: backfill reaches this far back
RESIZE_WAIT_S = 2.0  # a resize happens at the next step boundary; clients time out after 5 s or more


class NotRunning(Exception):
    pass


class Scheduler:
    def __init__(self, settings: Settings, store: Store, metrics: ServiceMetrics, *, start_worker=None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        # How each job's workers are started: None is the production way. Tests
        # pass a fault plan (workers.faults) here, in code; HTTP cannot reach it.
        self.start_worker = start_worker
        self._lock = threading.Lock()
        self._active: dict[str, Active] = {}
        self._resume: list[str] = []  # jobs found running at start, oldest first
        self._overtakes: dict[str, int] = {}  # waiting job -> how many later jobs started ahead of it
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        # its on_connected is called once Ray is connected (create_app hands back the stop signals there)
        self.ray = RayConnection(settings.ray_address, settings.ray_connect_timeout_s, settings.ray_retry_s)
        self.waiting_for: str | None = None  # why the head of the queue is not running yet
        self.max_concurrent_jobs = settings.max_concurrent_jobs
        self._store_error: str | None = None  # the last store failure the loop logged
        self.sweeps = SweepRunner(settings, store, self.cancel, metrics.sweeps)  # submits sweeps' trial jobs

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._resume = [j["id"] for j in self.store.jobs_in_state("running")]
        self._stop.clear()
        self._loop = threading.Thread(target=self._run_loop, name="shardprop-scheduler", daemon=True)
        self._loop.start()

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Stop scheduling; running jobs are interrupted but stay `running`
        in the store, so that the next start resumes them. Returns the ids of
        the jobs left `running` (also those found running at start and not
        restarted yet)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            active = list(self._active.values())
        for a in active:
            a.coordinator.cancel()
        for a in active:
            if a.thread is not None:
                a.thread.join(timeout)
        if self._loop is not None:
            self._loop.join(timeout)
        with self._lock:
            waiting = list(self._resume)  # found running at start, not restarted yet
        return [job_id for job_id in dict.fromkeys([a.job_id for a in active] + waiting)
                if self._state(job_id) == "running"]

    def _state(self, job_id: str) -> str | None:
        try:
            return self.store.get_job(job_id)["state"]
        except NotFound:
            return None

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ control

    def cancel(self, job_id: str, wait_s: float = 0.0) -> dict:
        """Cancel a queued job at once, or stop a running one; waits up to
        `wait_s` for a running job to end (its actors killed, CPUs freed)."""
        job = self.store.get_job(job_id)
        if job["state"] == "cancelled":
            return job
        if job["state"] in TERMINAL:
            raise IllegalTransition(f"job {job_id} is {job['state']}; only queued or running jobs can be cancelled")
        # Under the lock, the scheduler cannot start the job between the
        # look at _active and the store's move to cancelled (see _start).
        with self._lock:
            active = self._active.get(job_id)
            if active is None:
                if job_id in self._resume:
                    self._resume.remove(job_id)
                try:
                    job = self.store.transition(job_id, "cancelled", "cancelled by request")
                except IllegalTransition:  # it ended meanwhile
                    return self.store.get_job(job_id)
            else:
                active.cancel_requested = True
                active.coordinator.cancel()
        if active is not None:
            if active.thread is not None and wait_s > 0:
                active.thread.join(wait_s)
            return self.store.get_job(job_id)
        self._finished(job_id)
        self.wake()
        return job

    def resize(self, job_id: str, workers: int, wait_s: float = RESIZE_WAIT_S) -> dict:
        """Ask a running job for `workers` workers from its next step boundary
        on, and wait up to `wait_s` for that. The store's worker count is
        what runs: it changes when the coordinator reports the resize done (a
        Resized event), not before. A count the cluster can never hold is
        refused (ValueError naming the figures)."""
        job = self.store.get_job(job_id)
        with self._lock:
            active = self._active.get(job_id)
        if active is None or job["state"] != "running":
            raise NotRunning(f"job {job_id} is {job['state']}; only running jobs can be resized")
        per_worker = active.coordinator.spec.resources.cpus_per_worker
        _, total = self._cpus()
        if workers * per_worker > total:
            raise ValueError(f"{workers} workers need {workers * per_worker} CPUs (workers {workers} × "
                             f"cpus_per_worker {per_worker}); the cluster has {total:g} in all")
        active.resized.clear()
        active.coordinator.resize(workers)  # ValueError names the bounds
        if workers != job["workers"]:
            active.resized.wait(wait_s)
        return self.store.get_job(job_id)

    def phase(self, job_id: str) -> str | None:
        """What a running job does before its first step ("preparing data: ..."), or None."""
        with self._lock:
            active = self._active.get(job_id)
        return active.phase if active is not None else None

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def ray_status(self) -> str:
        return self.ray.status()

    # ------------------------------------------------------------ the loop

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.metrics.set_job_states(self.store.counts())
                self.sweeps.advance()  # never raises
                started = self._schedule_one()
                self._store_error = None
            except StoreUnavailable as err:  # a full disk: say it once, try again at the next poll
                if str(err) != self._store_error:
                    log.error("scheduler: %s; trying again", err)
                self._store_error, started = str(err), False
            except Exception:  # never let the loop die
                log.exception("scheduler loop")
                started = False
            if not started:
                self._wake.wait(self.settings.poll_interval_s)
                self._wake.clear()

    def _queue(self) -> list[tuple[Waiting, JobSpec]]:
        """The jobs waiting to run, oldest first: those to resume, then the
        queued. Jobs whose spec no longer parses, and jobs resumed too often,
        are failed on the way."""
        with self._lock:
            resume = set(self._resume)
        running = [j for j in self.store.jobs_in_state("running") if j["id"] in resume]
        queue = []
        for job, resumed in [(j, True) for j in running] + \
                            [(j, False) for j in self.store.jobs_in_state("queued", QUEUE_WINDOW)]:
            if resumed and job["resumes"] >= self.settings.max_resumes:
                self._fail(job["id"], f"the service stopped {job['resumes'] + 1} times while running this job "
                                      f"(it was resumed {job['resumes']} times; max_resumes is "
                                      f"{self.settings.max_resumes})")
                continue
            try:
                spec = parse_stored_spec(job["spec"])
                if job["workers"] != spec.resources.workers:
                    spec = spec.with_workers(job["workers"])
            except SpecError as err:
                self._fail(job["id"], f"spec no longer valid: {err}")
                continue
            waiting = Waiting(job["id"], spec.resources.workers, spec.resources.cpus_per_worker, resumed)
            queue.append((waiting, spec))
        return queue

    def _cpus(self) -> tuple[float, float]:
        """The cluster's free CPUs, as far as the queue may use them, and its total."""
        import ray

        from workers.runtime import cluster_cpus

        total, available = cluster_cpus(), ray.available_resources().get("CPU", 0.0)
        with self._lock:
            ours = sum(a.cpus for a in self._active.values())
        # Actors of a job just started may not hold their CPUs yet.
        return min(available, total - ours), total

    def _schedule_one(self) -> bool:
        with self._lock:
            if len(self._active) >= self.max_concurrent_jobs:
                self.waiting_for = (
                    "execution is paused (max_concurrent_jobs is 0)" if self.max_concurrent_jobs == 0 else
                    f"{len(self._active)} job(s) running, the limit (max_concurrent_jobs) is {self.max_concurrent_jobs}")
                return False
        queue = self._queue()
        if not queue:
            self.waiting_for = None
            return False
        if not self.ray.connected and self.ray.error is None:
            self.waiting_for = f"connecting to Ray at {self.ray.where}"
        if not self.ray.ensure():
            self.waiting_for = (f"cannot connect to Ray at {self.ray.where}: {self.ray.error}; "
                                f"retrying every {self.settings.ray_retry_s:g} s")
            return False
        choice = choose([w for w, _ in queue], *self._cpus(), self._overtakes,
                        self.settings.max_overtakes)
        for waiting, reason in choice.never_fit:
            self._fail(waiting.job_id, reason)
        self.waiting_for = choice.waiting_for
        if choice.start is None:
            return bool(choice.never_fit)
        for job_id in choice.overtaken:
            self._overtakes[job_id] = self._overtakes.get(job_id, 0) + 1
        self._overtakes.pop(choice.start.job_id, None)
        self._start(choice.start, next(spec for waiting, spec in queue if waiting is choice.start))
        return True

    def _start(self, waiting: Waiting, spec: JobSpec) -> None:
        from workers.coordinator import Coordinator
        from workers.pool import start_gradient_worker

        job_id = waiting.job_id
        coordinator = Coordinator(
            spec, self.settings.checkpoint_dir(job_id), data_roots=[str(r) for r in self.settings.data_roots],
            job_id=job_id, data_limits=self.settings.data_limits(), on_step=lambda record: self._on_step(job_id, record),
            on_event=lambda event: self._on_event(job_id, event),
            start_worker=self.start_worker or start_gradient_worker)
        active = Active(job_id, coordinator, cpus=waiting.cpus)
        with self._lock:  # with cancel's look at _active: a job is cancelled, or started, never both
            if waiting.resume:
                if job_id not in self._resume:
                    return  # cancelled meanwhile
                self.store.count_resume(job_id)  # first: a store that refuses it leaves the job to resume
                self._resume.remove(job_id)
            else:
                try:
                    self.store.transition(job_id, "running", "started", allowed_from={"queued"})
                except IllegalTransition:
                    return  # cancelled meanwhile
            self._active[job_id] = active
        self.metrics.job_started(job_id)
        thread = threading.Thread(target=self._run_job, args=(active, waiting.resume),
                                  name=f"shardprop-job-{job_id}", daemon=True)
        thread.start()
        active.thread = thread  # only once started: a cancel that sees it may join it

    def _run_job(self, active: Active, resume: bool) -> None:
        job_id = active.job_id
        try:
            outcome = job_runner.run_to_end(
                active, resume, self.settings.model_path(job_id), self._stop,
                before=lambda: job_runner.prepare_data(active, self.settings, self.store, self._stop),
                prepare=lambda: self.sweeps.seed_continuation(job_id))
        finally:
            self.metrics.observe_counters(job_id, active.coordinator.counters)
            self.metrics.job_stopped(job_id)
            with self._lock:  # its actors are gone: its CPUs are free for the next job
                self._active.pop(job_id, None)
            self.wake()
        self._observe_history(job_id)
        if outcome is not None:
            job_runner.record(self.store, job_id, outcome, self._stop)
            self._finished(job_id)

    # ------------------------------------------------------------ callbacks

    def _fail(self, job_id: str, error: str) -> None:
        """Fail a job that is not running (from the loop: a store that
        refuses the write raises, and the loop tries again at its next poll)."""
        try:
            self.store.transition(job_id, "failed", "error", error=error)
        except (IllegalTransition, NotFound) as err:
            log.warning("%s", err)
        with self._lock:
            if job_id in self._resume:
                self._resume.remove(job_id)
        self._finished(job_id)

    def _finished(self, job_id: str) -> None:
        self._overtakes.pop(job_id, None)
        self.metrics.job_finished(job_id)

    def _observe_history(self, job_id: str) -> None:
        """Export the steps missing from the job's stored history (after a
        recovery, and at its end: where steps could be lost)."""
        try:
            self.metrics.observe_steps_lost(job_id, self.store.missing_steps(job_id))
        except (StoreError, sqlite3.Error) as err:  # the job's end must still be recorded
            log.warning("job %s: steps lost not counted: %s", job_id, err)

    def _on_step(self, job_id: str, record: dict) -> None:
        self.store.record_metric(job_id, record)
        self.metrics.observe_step(job_id, record)

    def _on_event(self, job_id: str, event: Event) -> None:
        # every event goes on the job's timeline (GET /v1/jobs/{id}/events), with the step it names
        self.store.record_event(job_id, event.kind, getattr(event, "step", None), event.detail())
        match event:
            case CheckpointWritten(step=step):
                self.store.set_checkpoint(job_id, step)
            case Resized(after=workers):
                self.store.set_workers(job_id, workers)
                with self._lock:
                    active = self._active.get(job_id)
                if active is not None:
                    active.resized.set()
            case WorkersHung(step=step, seconds=seconds, workers=workers):
                log.warning("job %s: no result for step %s within %g s (resources.worker_timeout_s); workers %s "
                            "killed, to be replaced unless that step has hung 3 times",
                            job_id, step, seconds, list(workers))
        if isinstance(event, (Recovered, WorkersHung)):
            with self._lock:
                active = self._active.get(job_id)
            if active is not None:
                self.metrics.observe_counters(job_id, active.coordinator.counters)
            self._observe_history(job_id)
