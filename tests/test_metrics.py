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
    "shardprop_stale_refused": ("counter", set()),
    "shardprop_staleness": ("histogram", {"le"}),
    "shardprop_gradient_norm": ("gauge", set()),
    "shardprop_update_to_weight_ratio": ("gauge", {"layer"}),
    "shardprop_worker_compute_seconds": ("counter", {"worker"}),
    "shardprop_worker_wait_seconds": ("counter", {"worker"}),
    "shardprop_goodput_ratio": ("gauge", set()),
    "shardprop_lost_seconds": ("counter", {"cause"}),
    "shardprop_steps_lost": ("counter", set()),
    "shardprop_last_step_timestamp_seconds": ("gauge", set()),
    "shardprop_job_running": ("gauge", set()),
}


def goodput(step):
    """A cumulative account after `step` steps of 1 s, with a 2 s start-up and 0.5 s per evaluation."""
    lost = {"startup": 2.0, "recovery": 0.0, "replay": 0.0, "checkpoint": 0.0, "evaluation": 0.5 * step}
    wall = step + sum(lost.values())
    return {"ratio": step / wall, "wall_s": wall, "step_s": float(step), "lost_s": lost}


def record(step, **extra):
    return {"step": step, "loss": 1.0 / step, "samples": 128, "lr": 0.1, "workers": 2, "version": step,
            "val_loss": 0.5, "val_accuracy": 0.9, "staleness": 1,
            "phases": {"compute": 0.01, "transfer": 0.001, "reduce_apply": 0.002, "wait": 0.003},
            "gradient_norm": 2.0 * step, "update_ratio": [1e-3 * step, None, 3e-3],
            "worker_compute_s": [0.25, 0.5], "worker_wait_s": [0.0, 0.125], "goodput": goodput(step), **extra}


def values(found):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}


def families(metrics):
    text, _ = metrics.exposition()
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_every_metric_has_its_type_and_labels():
    m = ServiceMetrics()
    m.job_started("j1")
    for step in (1, 2, 3):
        m.observe_step("j1", record(step))
    m.observe_counters("j1", SimpleNamespace(worker_failures=1, recoveries=1, steps_replayed=3, nonfinite_skipped=0,
                                             fenced=2))
    m.set_job_states({"running": 1, "queued": 2})
    found = families(m)
    for name, (kind, labels) in EXPECTED.items():
        assert found[name].type == kind, name
        samples = [s for s in found[name].samples if s.labels.get("job_id") == "j1"]
        assert samples, name
        assert set(samples[0].labels) - {"job_id"} <= labels, name
    value = values(found)
    assert value[("shardprop_steps_total", (("job_id", "j1"),))] == 3
    assert value[("shardprop_samples_total", (("job_id", "j1"),))] == 384
    assert value[("shardprop_train_loss", (("job_id", "j1"),))] == pytest.approx(1 / 3)
    assert value[("shardprop_step_seconds_count", (("job_id", "j1"), ("phase", "compute")))] == 3
    assert value[("shardprop_jobs", (("state", "queued"),))] == 2
    assert value[("shardprop_steps_replayed_total", (("job_id", "j1"),))] == 3
    assert value[("shardprop_stale_refused_total", (("job_id", "j1"),))] == 2


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
    m.observe_step("j", record(3, finished_at=second + 0.5))  # the step's own time, when it says it
    assert sample(m, "shardprop_last_step_timestamp_seconds", "j") == second + 0.5
    m.job_stopped("j")
    m.job_finished("j")
    assert sample(m, "shardprop_job_running", "j") == 0  # ended, still exported through retention
    assert sample(m, "shardprop_last_step_timestamp_seconds", "j") == second + 0.5
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


def test_health_series_hold_the_latest_step_and_sums_of_the_history():
    m = ServiceMetrics()
    for step in (1, 2, 3):
        m.observe_step("j1", record(step))
    m.observe_counters("j1", SimpleNamespace(goodput=goodput(3)))  # the same account again adds nothing
    value = values(families(m))
    job = (("job_id", "j1"),)
    assert value[("shardprop_gradient_norm", job)] == 6.0
    assert value[("shardprop_update_to_weight_ratio", job + (("layer", "0"),))] == pytest.approx(3e-3)
    assert ("shardprop_update_to_weight_ratio", job + (("layer", "1"),)) not in value  # None: no weights
    assert value[("shardprop_worker_compute_seconds_total", job + (("worker", "1"),))] == 1.5
    assert value[("shardprop_worker_wait_seconds_total", job + (("worker", "1"),))] == 0.375
    assert value[("shardprop_goodput_ratio", job)] == pytest.approx(3 / 6.5)
    assert value[("shardprop_lost_seconds_total", (("cause", "startup"),) + job)] == 2.0
    assert value[("shardprop_lost_seconds_total", (("cause", "evaluation"),) + job)] == 1.5
    assert value[("shardprop_lost_seconds_total", (("cause", "replay"),) + job)] == 0
    assert value[("shardprop_steps_lost_total", job)] == 0
    m.observe_steps_lost("j1", 2)
    m.observe_steps_lost("j1", 2)
    assert values(families(m))[("shardprop_steps_lost_total", job)] == 2


def test_promtool_accepts_the_exposition():
    m = ServiceMetrics()
    m.observe_step("j1", record(1))
    m.observe_step("j1", record(2, gradient_norm=float("inf")))  # a skipped step's
    text, _ = m.exposition()
    assert shutil.which("promtool"), "promtool missing: .ci/run installs Debian's prometheus package"
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_steps_lost_counts_the_steps_missing_from_a_stored_history(tmp_path):
    """From a real store: a replayed step replaces its row (nothing lost); a
    step never recorded below the highest is one lost."""
    from service.store import Store

    store = Store(tmp_path / "store.db")
    job, _ = store.create_job({"name": "j", "training": {"steps": 5}})
    m = ServiceMetrics()
    for step in (1, 2, 3, 2, 3):  # steps 2 and 3 made again after a recovery
        store.record_metric(job["id"], record(step))
        m.observe_step(job["id"], record(step))
    m.observe_steps_lost(job["id"], store.missing_steps(job["id"]))
    lost = (("job_id", job["id"]),)
    assert store.missing_steps(job["id"]) == 0 and values(families(m))[("shardprop_steps_lost_total", lost)] == 0
    store.record_metric(job["id"], record(5))  # step 4 never recorded
    m.observe_steps_lost(job["id"], store.missing_steps(job["id"]))
    assert values(families(m))[("shardprop_steps_lost_total", lost)] == 1
    store.close()
