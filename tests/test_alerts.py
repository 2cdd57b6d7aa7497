"""The alert rules of deploy/alerts.yml: valid for promtool, their unit tests
(deploy/alerts_test.yml) passing, reading only series the service defines —
and the stuck-job alert firing in a real Prometheus that scrapes a real
service whose job's worker hangs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from promql_names import PROMETHEUS_OWN, defined_names, metric_names
from service_helpers import ServerThread, tiny_spec, wait_for, wait_state

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "alerts.yml"
PER_JOB = {"ShardpropJobStuck", "ShardpropNonFiniteStepsSkipped", "ShardpropValidationLossDiverging",
           "ShardpropWorkersFailingRepeatedly"}


def rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def promtool(*args: str) -> None:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    promtool("check", "rules", RULES.name)
    promtool("test", "rules", "alerts_test.yml")


def test_every_rule_has_a_severity_and_says_which_job_and_reads_series_the_service_defines():
    found = rules()
    assert set(found) == PER_JOB | {"ShardpropServiceDown"}
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        if name in PER_JOB:
            assert "$labels.job_id" in rule["annotations"]["summary"], name
        names = metric_names(rule["expr"])
        assert names and names <= defined_names() | PROMETHEUS_OWN, (name, names)
    assert "up" in metric_names(found["ShardpropServiceDown"]["expr"])


@pytest.mark.parametrize("expr, names", [
    ('up{job="shardprop"} == 0 or absent(up{job="shardprop"})', {"up"}),
    ("(time() - a_seconds) > 900 and b == 1", {"a_seconds", "b"}),
    ('histogram_quantile(0.5, sum by (le, phase) (rate(c_bucket{job_id=~"$job_id"}[1m])))', {"c_bucket"}),
    ("x > 1.5 * min_over_time(x[1h]) unless on(job_id) y", {"x", "y"}),
    ("label_values(d_loss, job_id)", {"d_loss"}),
])
def test_metric_names_reads_the_names_an_expression_uses(expr, names):
    assert metric_names(expr) == names


STUCK_AFTER_S = 4  # the test's threshold for "no step for ..." in place of the rule's 15 minutes


def rules_with_a_short_stuck_threshold() -> str:
    """deploy/alerts.yml as it is, but for the stuck-job threshold."""
    text = RULES.read_text()
    expr = rules()["ShardpropJobStuck"]["expr"]
    assert expr.count("> 900") == 1 and text.count(expr) == 1, expr
    return text.replace(expr, expr.replace("> 900", f"> {STUCK_AFTER_S}"))


def firing(port: int) -> set[tuple[str, str | None]]:
    """(alert name, job_id) of every alert firing in the Prometheus on `port`."""
    try:
        alerts = httpx.get(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except (httpx.HTTPError, ValueError, KeyError):  # not up yet
        return set()
    return {(a["labels"]["alertname"], a["labels"].get("job_id")) for a in alerts if a["state"] == "firing"}


@pytest.mark.ray
@pytest.mark.slow
def test_a_real_prometheus_fires_the_stuck_job_alert_for_a_job_whose_worker_hangs(ray_local, tmp_path):
    from service.api import create_app
    from service.metrics import ServiceMetrics
    from service.scheduler import Scheduler
    from service.settings import Settings
    from service.store import Store
    from tests.test_deploy import running_prometheus
    from workers.faults import FaultPlan, Faults

    settings = Settings(store_path=tmp_path / "store.db", data_roots=[tmp_path], ray_address=ray_local,
                        token=None, poll_interval_s=0.05)
    # the job's only worker sleeps ten minutes in its first step: longer than the test
    hang = FaultPlan({0: Faults(delay_s=600)})
    scheduler = Scheduler(settings, Store(settings.store_path), ServiceMetrics(), start_worker=hang)
    (tmp_path / "alerts.yml").write_text(rules_with_a_short_stuck_threshold())
    with ServerThread(create_app(settings, scheduler)) as server:
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(tmp_path / "alerts.yml")],
                  "scrape_configs": [{"job_name": "shardprop",
                                      "static_configs": [{"targets": [server.url.removeprefix("http://")]}]}]}
        with running_prometheus(config, tmp_path) as port:
            job_id = httpx.post(f"{server.url}/v1/jobs", json=tiny_spec(), timeout=10).json()["id"]
            wait_for(lambda: firing(port), timeout=120, interval=0.5, what="an alert firing")
            # that one alert, for that job, which is running and has completed no step
            assert firing(port) == {("ShardpropJobStuck", job_id)}
            job = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()
            assert (job["state"], job["step"]) == ("running", 0), job
            assert httpx.post(f"{server.url}/v1/jobs/{job_id}/cancel", timeout=60).status_code == 200
            assert wait_state(server.url, job_id, timeout=60)["state"] == "cancelled"
            # no longer running: the alert ends
            wait_for(lambda: not firing(port), timeout=60, interval=0.5, what="the alert resolved")
    # ray_local's teardown insists the cluster is clean: no actor left, every CPU free
