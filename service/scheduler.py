"""The queue: runs stored jobs on Ray, first in first out.

A job waits while the concurrency limit is reached (0 pauses execution) or
while the cluster lacks the CPUs it asks for. Each running job is one
Coordinator driven from a thread of this process. Jobs found `running` when
the scheduler starts (the service was killed) resume from their latest
checkpoint. Ray is connected lazily, when the first job is about to run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from core.spec import SpecError, parse_stored_spec
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.states import TERMINAL
from service.store import IllegalTransition, NotFound, Store
from workers.protocol import CheckpointWritten, Event, Recovered, Resized, WorkersHung

log = logging.getLogger("shardprop.scheduler")


class NotRunning(Exception):
    pass


@dataclass
class Active:
    job_id: str
    coordinator: object
    thread: threading.Thread | None = None
    cpus: int = 0
    cancel_requested: bool = False


class Scheduler:
    def __init__(self, settings: Settings, store: Store, metrics: ServiceMetrics):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._lock = threading.Lock()
        self._active: dict[str, Active] = {}
        self._resume: list[str] = []  # jobs found running at start, oldest first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None
        self._ray_connected = False
        self.ray_error: str | None = None  # why connecting to Ray failed, if it did
        self.waiting_for: str | None = None  # why the head of the queue is not running yet
        self.max_concurrent_jobs = settings.max_concurrent_jobs
        self.on_ray_connected = None  # called once Ray is connected (create_app hands back the stop signals)

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
        with self._lock:
            active = self._active.get(job_id)
            if active is not None:
                active.cancel_requested = True
                active.coordinator.cancel()
        if active is not None:
            if active.thread is not None and wait_s > 0:
                active.thread.join(wait_s)
            return self.store.get_job(job_id)
        with self._lock:
            if job_id in self._resume:
                self._resume.remove(job_id)
        try:
            job = self.store.transition(job_id, "cancelled", "cancelled by request")
        except IllegalTransition:
            job = self.store.get_job(job_id)  # it started (or ended) meanwhile
            with self._lock:
                active = self._active.get(job_id)
                if active is not None:
                    active.cancel_requested = True
                    active.coordinator.cancel()
        self._finished(job_id)
        self.wake()
        return job

    def resize(self, job_id: str, workers: int) -> dict:
        job = self.store.get_job(job_id)
        with self._lock:
            active = self._active.get(job_id)
        if active is None or job["state"] != "running":
            raise NotRunning(f"job {job_id} is {job['state']}; only running jobs can be resized")
        active.coordinator.resize(workers)  # ValueError names the bounds
        self.store.set_workers(job_id, workers)
        return self.store.get_job(job_id)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._active)

    def ray_status(self) -> str:
        if self.ray_error is not None:
            return f"unreachable: {self.ray_error}"
        return "connected" if self._ray_connected else "not connected yet (connects when a job is about to run)"

    # ------------------------------------------------------------ the loop

    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.metrics.set_job_states(self.store.counts())
                started = self._schedule_one()
            except Exception:  # never let the loop die
                log.exception("scheduler loop")
                started = False
            if not started:
                self._wake.wait(self.settings.poll_interval_s)
                self._wake.clear()

    def _next(self) -> tuple[dict, bool] | None:
        while self._resume:
            job_id = self._resume[0]
            job = self.store.get_job(job_id, details=True)
            if job["state"] == "running":
                return job, True
            self._resume.pop(0)
        queued = self.store.jobs_in_state("queued")
        return (queued[0], False) if queued else None

    def _connect(self) -> None:
        if not self._ray_connected:
            from workers.runtime import connect_ray

            connect_ray(self.settings.ray_address)
            self._ray_connected = True
            if self.on_ray_connected is not None:
                try:
                    self.on_ray_connected()
                except RuntimeError:  # the service's event loop is closing: it is stopping anyway
                    pass

    def _free_cpus(self) -> float:
        import ray

        total = ray.cluster_resources().get("CPU", 0.0)
        available = ray.available_resources().get("CPU", 0.0)
        with self._lock:
            ours = sum(a.cpus for a in self._active.values())
        # Actors of a job just started may not hold their CPUs yet.
        return min(available, total - ours)

    def _schedule_one(self) -> bool:
        with self._lock:
            if len(self._active) >= self.max_concurrent_jobs:
                self.waiting_for = (
                    "execution is paused (max_concurrent_jobs is 0)" if self.max_concurrent_jobs == 0 else
                    f"{len(self._active)} job(s) running, the limit (max_concurrent_jobs) is {self.max_concurrent_jobs}")
                return False
            nxt = self._next()
        if nxt is None:
            self.waiting_for = None
            return False
        job, resume = nxt
        job_id = job["id"]
        try:
            spec = parse_stored_spec(job["spec"])
            if job["workers"] != spec.resources.workers:
                spec = spec.with_workers(job["workers"])
        except SpecError as err:
            self._fail(job_id, f"spec no longer valid: {err}")
            return True
        from workers.coordinator import Coordinator

        coordinator = Coordinator(
            spec, self.settings.checkpoint_dir(job_id), data_roots=[str(r) for r in self.settings.data_roots],
            job_id=job_id, data_limits=self.settings.data_limits(), on_step=lambda record: self._on_step(job_id, record),
            on_event=lambda event: self._on_event(job_id, event))
        try:
            if not self._ray_connected:
                self.waiting_for = f"connecting to Ray at {self.settings.ray_address or 'a private local instance'}"
            self._connect()
        except Exception as err:  # a wrong --ray-address: say so, try again later
            self.waiting_for = f"cannot connect to Ray at {self.settings.ray_address}: {err}"
            if self.ray_error != str(err):
                log.error("%s", self.waiting_for)
            self.ray_error = str(err)
            return False
        self.ray_error = None
        free, need = self._free_cpus(), coordinator.required_cpus
        if free < need:
            # FIFO: the head of the queue waits, nothing overtakes it
            self.waiting_for = f"job {job_id} needs {need} CPU(s); the cluster has {max(free, 0):g} free"
            return False
        self.waiting_for = None
        active = Active(job_id, coordinator, cpus=coordinator.required_cpus)
        with self._lock:
            if resume:
                self._resume.remove(job_id)
            else:
                try:
                    self.store.transition(job_id, "running", "started", allowed_from={"queued"})
                except IllegalTransition:
                    return True  # cancelled meanwhile
            self._active[job_id] = active
        active.thread = threading.Thread(target=self._run_job, args=(active, resume),
                                         name=f"shardprop-job-{job_id}", daemon=True)
        active.thread.start()
        return True

    def _run_job(self, active: Active, resume: bool) -> None:
        from core.trainer import TrainingError
        from workers.coordinator import JobCancelled

        job_id, coordinator = active.job_id, active.coordinator
        try:
            net = coordinator.run(resume=resume)
            path = self.settings.model_path(job_id)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            net.save(path)
            self._transition(job_id, "succeeded", "finished")
        except JobCancelled:
            if active.cancel_requested or not self._stop.is_set():
                self._transition(job_id, "cancelled", "cancelled by request")
            # else: the service is stopping; the job stays running and resumes on restart
        except (TrainingError, ValueError) as err:
            self._fail(job_id, str(err))
        except Exception as err:
            log.exception("job %s", job_id)
            self._fail(job_id, f"{type(err).__name__}: {err}")
        finally:
            self.metrics.observe_counters(job_id, coordinator.counters)
            with self._lock:
                self._active.pop(job_id, None)
            self._finished(job_id)
            self.wake()

    # ------------------------------------------------------------ callbacks

    def _transition(self, job_id: str, to: str, reason: str, error: str | None = None) -> None:
        try:
            self.store.transition(job_id, to, reason, error=error)
        except (IllegalTransition, NotFound) as err:
            log.warning("%s", err)

    def _fail(self, job_id: str, error: str) -> None:
        self._transition(job_id, "failed", "error", error=error)
        self._finished(job_id)

    def _finished(self, job_id: str) -> None:
        self.metrics.job_finished(job_id)

    def _on_step(self, job_id: str, record: dict) -> None:
        self.store.record_metric(job_id, record)
        self.metrics.observe_step(job_id, record)

    def _on_event(self, job_id: str, event: Event) -> None:
        match event:
            case CheckpointWritten(step=step):
                self.store.set_checkpoint(job_id, step)
            case Resized(after=workers):
                self.store.set_workers(job_id, workers)
            case WorkersHung(step=step, seconds=seconds, workers=workers):
                log.warning("job %s: no result for step %s within %g s (resources.worker_timeout_s); workers %s "
                            "killed, to be replaced unless that step has hung 3 times",
                            job_id, step, seconds, list(workers))
        if isinstance(event, (Recovered, WorkersHung)):
            with self._lock:
                active = self._active.get(job_id)
            if active is not None:
                self.metrics.observe_counters(job_id, active.coordinator.counters)
