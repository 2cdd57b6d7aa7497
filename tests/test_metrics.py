"""The Prometheus exposition: every metric once, with its type, labels and
base units; failure counters as increments; finished jobs forgotten."""

from __future__ import annotations

import shutil
import subprocess
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ServiceMetrics

EXPECTED = {  # name as parsed (counters lose _total) -> (type, labels beyond job_id)
    "shardprop_train_loss": ("gauge", set()),
    "shardprop_validation_loss": ("gauge", set()),
    "shardprop_validation_accuracy": ("gauge", set()),
    "shardprop_learning_rate": ("gauge", set()),
    "shardprop_steps": ("counter", set()),
    "shardprop_samples": ("counter", set()),
    "shardprop_workers": ("gauge", set()),
    "shardprop_parameter_version": ("gauge", set()),
    "shardprop_step_seconds": ("histogram", {"phase", "le"}),
    "shardprop_worker_failures": ("counter", set()),
    "shardprop_recoveries": ("counter", set()),
    "shardprop_steps_replayed": ("counter", set()),
    "shardprop_nonfinite_steps_skipped": ("counter", set()),
    "shardprop_hung_workers": ("counter", set()),
    "shardprop_staleness": ("histogram", {"le"}),
    "shardprop_last_step_timestamp_seconds": ("gauge", set()),
    "shardprop_job_running": ("gauge", set()),
}


def record(step, **extra):
    return {"step": step, "loss": 1.0 / step, "samples": 128, "lr": 0.1, "workers": 2, "version": step,
            "val_loss": 0.5, "val_accuracy": 0.9, "staleness": 1,
            "phases": {"compute": 0.01, "transfer": 0.001, "reduce_apply": 0.002, "wait": 0.003}, **extra}


def families(metrics):
    text, _ = metrics.exposition()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_every_metric_has_its_type_and_labels():
    m = ServiceMetrics()
    m.job_started("j1")
    for step in (1, 2, 3):
        m.observe_step("j1", record(step))
    m.observe_counters("j1", SimpleNamespace(worker_failures=1, recoveries=1, steps_replayed=3, nonfinite_skipped=0))
    m.set_job_states({"running": 1, "queued": 2})
    found = families(m)
    for name, (kind, labels) in EXPECTED.items():
        assert found[name].type == kind, name
        samples = [s for s in found[name].samples if s.labels.get("job_id") == "j1"]
        assert samples, name
        assert set(samples[0].labels) - {"job_id"} <= labels, name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}
    assert value[("shardprop_steps_total", (("job_id", "j1"),))] == 3
    assert value[("shardprop_samples_total", (("job_id", "j1"),))] == 384
    assert value[("shardprop_train_loss", (("job_id", "j1"),))] == pytest.approx(1 / 3)
    assert value[("shardprop_step_seconds_count", (("job_id", "j1"), ("phase", "compute")))] == 3
    assert value[("shardprop_jobs", (("state", "queued"),))] == 2
    assert value[("shardprop_steps_replayed_total", (("job_id", "j1"),))] == 3


def sample(metrics, name, job_id):
    found = [s.value for s in families(metrics)[name].samples if s.labels.get("job_id") == job_id]
    return found[0] if found else None


def test_a_job_is_running_from_its_start_to_its_end_and_its_last_step_time_follows_its_steps():
    m = ServiceMetrics(retention_s=0.2)
    assert sample(m, "shardprop_job_running", "j") is None  # a job not started has no series
    before = time.time()
    m.job_started("j")
    assert sample(m, "shardprop_job_running", "j") == 1
    started = sample(m, "shardprop_last_step_timestamp_seconds", "j")  # before its first step: its start
    assert before <= started <= time.time()
    time.sleep(0.01)
    m.observe_step("j", record(1))
    first = sample(m, "shardprop_last_step_timestamp_seconds", "j")
    time.sleep(0.01)
    m.observe_step("j", record(2))
    second = sample(m, "shardprop_last_step_timestamp_seconds", "j")
    assert started < first < second <= time.time()
    m.job_stopped("j")
    m.job_finished("j")
    assert sample(m, "shardprop_job_running", "j") == 0  # ended, still exported through retention
    assert sample(m, "shardprop_last_step_timestamp_seconds", "j") == second
    time.sleep(0.3)
    assert sample(m, "shardprop_job_running", "j") is None
    assert sample(m, "shardprop_last_step_timestamp_seconds", "j") is None


def test_cumulative_counters_are_exported_as_increments():
    m = ServiceMetrics()
    for failures in (1, 1, 3):
        m.observe_counters("j", SimpleNamespace(worker_failures=failures, recoveries=0, steps_replayed=0,
                                                nonfinite_skipped=0))
    samples = {s.name: s.value for s in families(m)["shardprop_worker_failures"].samples}
    assert samples["shardprop_worker_failures_total"] == 3


def test_a_finished_jobs_series_are_gone_after_retention():
    m = ServiceMetrics(retention_s=0.2)
    m.observe_step("done", record(1))
    m.observe_step("live", record(1))
    m.job_finished("done")
    assert any(s.labels.get("job_id") == "done" for s in families(m)["shardprop_train_loss"].samples)
    time.sleep(0.3)
    loss = families(m)["shardprop_train_loss"].samples
    assert {s.labels["job_id"] for s in loss} == {"live"}
    assert all(s.labels.get("job_id") != "done" for f in families(m).values() for s in f.samples)


def test_promtool_accepts_the_exposition():
    m = ServiceMetrics()
    m.observe_step("j1", record(1))
    text, _ = m.exposition()
    assert shutil.which("promtool"), "promtool missing: .ci/run installs Debian's prometheus package"
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
