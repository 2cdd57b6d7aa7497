"""Prometheus metrics: every shardprop metric, defined once, here.

Per running job, labelled `job_id` (not `job`, which Prometheus rewrites on
scrape): its loss, accuracy, learning rate, progress, workers, time per phase
and failure counters, and its training health: gradient norm, update-to-weight
ratio per layer, compute and wait seconds per worker, goodput and the time
lost by cause, steps lost. A finished job's series are removed after a
retention period so that the number of series stays bounded; the extra labels
are bounded too (`layer` by the network's depth, `worker` by the job's
workers: a worker's place in the job, 0 to workers - 1, `cause` by CAUSES).
Base units throughout: seconds, samples, steps.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.states import STATES
from workers.goodput import CAUSES

PHASES = ("compute", "transfer", "reduce_apply", "wait")
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)

# coordinator counter name -> metric attribute
FAILURE_COUNTERS = {
    "worker_failures": "worker_failures",
    "recoveries": "recoveries",
    "steps_replayed": "steps_replayed",
    "nonfinite_skipped": "nonfinite_skipped",
    "hung_workers": "hung_workers",
    "fenced": "stale_refused",
}


class ServiceMetrics:
    """The service's metrics in a registry of its own (one per app, so tests
    can run several services in one process)."""

    def __init__(self, retention_s: float = 300.0):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.retention_s = retention_s
        job = ["job_id"]
        self.train_loss = Gauge("shardprop_train_loss", "Training loss of the latest step", job, registry=r)
        self.validation_loss = Gauge("shardprop_validation_loss", "Loss on the validation split", job, registry=r)
        self.validation_accuracy = Gauge("shardprop_validation_accuracy", "Accuracy on the validation split "
                                         "(fraction, 0-1)", job, registry=r)
        self.learning_rate = Gauge("shardprop_learning_rate", "Learning rate of the latest step", job, registry=r)
        self.steps = Counter("shardprop_steps", "Optimizer steps completed", job, registry=r)
        self.samples = Counter("shardprop_samples", "Training samples processed", job, registry=r)
        self.workers = Gauge("shardprop_workers", "Gradient workers of the job", job, registry=r)
        self.parameter_version = Gauge("shardprop_parameter_version", "Highest applied parameter version",
                                       job, registry=r)
        self.step_seconds = Histogram("shardprop_step_seconds", "Time per step in each phase",
                                      ["job_id", "phase"], buckets=STEP_BUCKETS, registry=r)
        self.worker_failures = Counter("shardprop_worker_failures", "Gradient workers lost", job, registry=r)
        self.recoveries = Counter("shardprop_recoveries", "Recoveries from lost workers, nodes or servers",
                                  job, registry=r)
        self.steps_replayed = Counter("shardprop_steps_replayed", "Steps computed again after a recovery",
                                      job, registry=r)
        self.hung_workers = Counter("shardprop_hung_workers", "Gradient workers killed and replaced for "
                                    "exceeding resources.worker_timeout_s", job, registry=r)
        self.stale_refused = Counter("shardprop_stale_refused", "Plans and worker results refused as of another "
                                     "membership epoch (workers/fencing.py)", job, registry=r)
        self.nonfinite_skipped = Counter("shardprop_nonfinite_steps_skipped", "Steps skipped for a non-finite "
                                         "gradient", job, registry=r)
        self.staleness = Histogram("shardprop_staleness", "Versions between computing and applying a gradient "
                                   "(async mode)", job, buckets=STALENESS_BUCKETS, registry=r)
        self.gradient_norm = Gauge("shardprop_gradient_norm", "L2 norm of the mean gradient the latest step "
                                   "applied", job, registry=r)
        self.update_ratio = Gauge("shardprop_update_to_weight_ratio", "Latest step's ||W_after - W_before|| / "
                                  "||W_before|| of each layer (weights and bias)", ["job_id", "layer"], registry=r)
        self.worker_compute = Counter("shardprop_worker_compute_seconds", "Seconds each worker spent computing "
                                      "shard gradients", ["job_id", "worker"], registry=r)
        self.worker_wait = Counter("shardprop_worker_wait_seconds", "Seconds each worker waited before its "
                                   "computations (for the parameters, the servers, slower workers)",
                                   ["job_id", "worker"], registry=r)
        self.goodput = Gauge("shardprop_goodput_ratio", "Fraction of the job's wall time spent on steps that "
                             "count (0-1)", job, registry=r)
        self.lost_seconds = Counter("shardprop_lost_seconds", "Wall time of the job not spent on steps that count, "
                                    "by cause", ["job_id", "cause"], registry=r)
        self.steps_lost = Counter("shardprop_steps_lost", "Steps missing from the job's history (stays 0)",
                                  job, registry=r)
        self.last_step_timestamp = Gauge("shardprop_last_step_timestamp_seconds", "Unix time of the job's last "
                                         "completed step (or of its start or resume, before its first step)",
                                         job, registry=r)
        self.job_running = Gauge("shardprop_job_running", "1 while the job is running in this service, else 0",
                                 job, registry=r)
        self.jobs = Gauge("shardprop_jobs", "Jobs by state", ["state"], registry=r)
        for state in STATES:
            self.jobs.labels(state=state).set(0)
        self.sweeps = SweepMetrics(r, retention_s)
        self._lock = threading.Lock()
        self._seen: dict[str, dict] = {}  # job -> last cumulative counters (failures, lost seconds, steps lost)
        self._labelled: dict[str, set] = {}  # job -> (metric, label) of its series with a second label
        self._finished: dict[str, float] = {}  # job -> when it ended

    # ------------------------------------------------------------ updates

    def observe_step(self, job_id: str, record: dict) -> None:
        """One step record from the coordinator."""
        self._forget_expired()
        if record.get("loss") is not None:
            self.train_loss.labels(job_id).set(record["loss"])
        if record.get("val_loss") is not None:
            self.validation_loss.labels(job_id).set(record["val_loss"])
        if record.get("val_accuracy") is not None:
            self.validation_accuracy.labels(job_id).set(record["val_accuracy"])
        self.learning_rate.labels(job_id).set(record.get("lr") or 0.0)
        self.steps.labels(job_id).inc()
        self.last_step_timestamp.labels(job_id).set(record.get("finished_at") or time.time())
        self.samples.labels(job_id).inc(record.get("samples") or 0)
        if record.get("workers") is not None:
            self.workers.labels(job_id).set(record["workers"])
        self.parameter_version.labels(job_id).set(record.get("version", record["step"]))
        for phase, seconds in (record.get("phases") or {}).items():
            if phase in PHASES and seconds is not None:
                self.step_seconds.labels(job_id, phase).observe(seconds)
        if record.get("staleness") is not None:
            self.staleness.labels(job_id).observe(record["staleness"])
        self._observe_health(job_id, record)
        for attr in FAILURE_COUNTERS.values():
            getattr(self, attr).labels(job_id)  # a running job's failure counters exist, at 0
        self.steps_lost.labels(job_id)

    def _observe_health(self, job_id: str, record: dict) -> None:
        if record.get("gradient_norm") is not None:
            self.gradient_norm.labels(job_id).set(record["gradient_norm"])
        for layer, ratio in enumerate(record.get("update_ratio") or ()):
            if ratio is not None:
                self._child(self.update_ratio, job_id, str(layer)).set(ratio)
        for metric, key in ((self.worker_compute, "worker_compute_s"), (self.worker_wait, "worker_wait_s")):
            for worker, seconds in enumerate(record.get(key) or ()):
                if seconds is not None and seconds >= 0:
                    self._child(metric, job_id, str(worker)).inc(seconds)
        if record.get("goodput"):
            self._observe_goodput(job_id, record["goodput"])

    def _child(self, metric, job_id: str, label: str):
        """A series with a second label, remembered so that `forget` removes it."""
        with self._lock:
            self._labelled.setdefault(job_id, set()).add((metric, label))
        return metric.labels(job_id, label)

    def _observe_goodput(self, job_id: str, goodput: dict) -> None:
        """A cumulative goodput account (workers.goodput.snapshot)."""
        if goodput.get("ratio") is not None:
            self.goodput.labels(job_id).set(goodput["ratio"])
        lost = goodput.get("lost_s") or {}
        for cause in CAUSES:
            self._increase(job_id, self._child(self.lost_seconds, job_id, cause), f"lost:{cause}", lost.get(cause, 0.0))

    def _increase(self, job_id: str, child, name: str, value: float) -> None:
        """Export a cumulative `value` as the increment since it was last seen."""
        with self._lock:
            last = self._seen.setdefault(job_id, {})
            delta = value - last.get(name, 0)
            if delta > 0:
                child.inc(delta)
            last[name] = value

    def observe_counters(self, job_id: str, counters) -> None:
        """Cumulative failure counters and goodput (a coordinator's
        `counters`): counters exported as increments since the last call."""
        for name, attr in FAILURE_COUNTERS.items():
            # the series exists from the start, at 0
            self._increase(job_id, getattr(self, attr).labels(job_id), name, getattr(counters, name, 0))
        if getattr(counters, "goodput", None):
            self._observe_goodput(job_id, counters.goodput)

    def observe_steps_lost(self, job_id: str, missing: int) -> None:
        """Steps the job's stored history lacks (Store.missing_steps), as a counter."""
        self._increase(job_id, self.steps_lost.labels(job_id), "steps_lost", missing)

    def set_job_states(self, counts: dict[str, int]) -> None:
        for state in STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))

    def job_started(self, job_id: str) -> None:
        """A job starts (or resumes) running here. Its last-step time starts
        at now, so that a job stuck before its first step is seen as stuck."""
        self.job_running.labels(job_id).set(1)
        self.last_step_timestamp.labels(job_id).set(time.time())

    def job_stopped(self, job_id: str) -> None:
        """The job no longer runs here: it ended, or the service is stopping."""
        self.job_running.labels(job_id).set(0)

    def job_finished(self, job_id: str) -> None:
        """Start the retention clock of a finished job's series."""
        with self._lock:
            self._finished[job_id] = time.monotonic()

    def _forget_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [j for j, at in self._finished.items() if now - at >= self.retention_s]
            for job_id in expired:
                del self._finished[job_id]
                self._seen.pop(job_id, None)
        for job_id in expired:
            self.forget(job_id)

    def forget(self, job_id: str) -> None:
        """Remove every series of a job."""
        failures = tuple(getattr(self, attr) for attr in FAILURE_COUNTERS.values())
        with self._lock:
            labelled = self._labelled.pop(job_id, set())
        series = [(metric, (job_id,)) for metric in (
            self.train_loss, self.validation_loss, self.validation_accuracy, self.learning_rate, self.steps,
            self.samples, self.workers, self.parameter_version, self.staleness, *failures, self.gradient_norm,
            self.goodput, self.steps_lost,
            self.last_step_timestamp, self.job_running)]
        series += [(self.step_seconds, (job_id, phase)) for phase in PHASES]
        series += [(metric, (job_id, label)) for metric, label in labelled]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:
                pass

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type, after dropping expired jobs and sweeps."""
        self._forget_expired()
        self.sweeps.forget_expired()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------- sweeps


class SweepMetrics:
    """Per sweep, labelled `sweep_id`: its trials by state (a trial is in its
    latest run's job state) and the best objective so far. An ended sweep's
    series are removed after the retention period, as a job's are."""

    def __init__(self, registry: CollectorRegistry, retention_s: float):
        self.retention_s = retention_s
        self.trials = Gauge("shardprop_sweep_trials", "Trials of a sweep by state", ["sweep_id", "state"],
                            registry=registry)
        self.best = Gauge("shardprop_sweep_best_objective", "Best objective value of a sweep's trials so far "
                          "(its objective's metric, in that metric's unit)", ["sweep_id"], registry=registry)
        self._lock = threading.Lock()
        self._ended: dict[str, float] = {}  # sweep -> when it ended

    def observe(self, sweep_id: str, trial_states: dict[str, int], best: float | None) -> None:
        """A sweep now: how many of its trials are in each state, its best objective (None: none yet)."""
        for state in STATES:
            self.trials.labels(sweep_id, state).set(trial_states.get(state, 0))
        if best is not None:
            self.best.labels(sweep_id).set(best)

    def ended(self, sweep_id: str) -> None:
        with self._lock:
            self._ended.setdefault(sweep_id, time.monotonic())

    def forget_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [s for s, at in self._ended.items() if now - at >= self.retention_s]
            for sweep_id in expired:
                del self._ended[sweep_id]
        for sweep_id in expired:
            for state in STATES:
                _remove(self.trials, sweep_id, state)
            _remove(self.best, sweep_id)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
