"""The live dashboard and /metrics, served by a real service (uvicorn on
loopback, a real SQLite file, the session's Ray cluster), driven in headless
Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from browser_helpers import chromium, page_of, screenshot
from service.api import create_app
from service.metrics import ServiceMetrics
from service.settings import Settings

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOB = {"name": "dash", "seed": 0, "data": {"source": "digits", "shards": 2},
       "model": {"hidden": [32]},
       "training": {"batch_size": 64, "steps": 400, "eval_every": 20, "checkpoint_every": 100,
                    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
       "resources": {"workers": 2}}
PHASES = {"compute", "transfer", "reduce_apply", "wait"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def service(ray_local, tmp_path):
    metrics = ServiceMetrics(retention_s=3.0)
    settings = Settings(port=free_port(), store_path=tmp_path / "store.db", data_roots=[tmp_path],
                        ray_address=ray_local, token=None)
    app = create_app(settings, metrics=metrics)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def wait_for(predicate, timeout=120.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


def scrape(url):
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_while_a_job_runs_then_gone_after_retention(service):
    job = httpx.post(f"{service}/v1/jobs", json=JOB, timeout=10).json()
    jid = job["id"]
    wait_for(lambda: httpx.get(f"{service}/v1/jobs/{jid}", timeout=10).json()["step"] >= 30)
    text, fams = scrape(service)
    running = {n: f for n, f in fams.items() if any(s.labels.get("job_id") == jid for s in f.samples)}
    for name, kind in [("shardprop_train_loss", "gauge"), ("shardprop_validation_loss", "gauge"),
                       ("shardprop_validation_accuracy", "gauge"), ("shardprop_learning_rate", "gauge"),
                       ("shardprop_steps", "counter"), ("shardprop_samples", "counter"),
                       ("shardprop_workers", "gauge"), ("shardprop_parameter_version", "gauge"),
                       ("shardprop_step_seconds", "histogram"), ("shardprop_worker_failures", "counter"),
                       ("shardprop_recoveries", "counter"), ("shardprop_steps_replayed", "counter"),
                       ("shardprop_nonfinite_steps_skipped", "counter"), ("shardprop_gradient_norm", "gauge"),
                       ("shardprop_update_to_weight_ratio", "gauge"), ("shardprop_worker_compute_seconds", "counter"),
                       ("shardprop_worker_wait_seconds", "counter"), ("shardprop_goodput_ratio", "gauge"),
                       ("shardprop_lost_seconds", "counter"), ("shardprop_steps_lost", "counter")]:
        assert name in running and running[name].type == kind, name
    phases = {s.labels["phase"] for s in running["shardprop_step_seconds"].samples}
    assert phases == PHASES
    assert {s.labels["layer"] for s in running["shardprop_update_to_weight_ratio"].samples} == {"0", "1"}
    assert {s.labels["worker"] for s in running["shardprop_worker_compute_seconds"].samples
            if s.name.endswith("_total")} == {"0", "1"}
    # the history the API serves has each step's health, per-worker times and goodput so far
    history = httpx.get(f"{service}/v1/jobs/{jid}/metrics", params={"limit": 30}, timeout=10).json()["metrics"]
    for r in history:
        assert r["gradient_norm"] > 0 and len(r["update_ratio"]) == 2 and all(u > 0 for u in r["update_ratio"])
        assert len(r["worker_compute_s"]) == len(r["worker_wait_s"]) == 2 and min(r["worker_compute_s"]) > 0
        assert r["finished_at"] <= time.time() and 0 < r["goodput"]["ratio"] <= 1
    assert {s.labels["state"] for s in fams["shardprop_jobs"].samples} >= {"running", "queued", "succeeded"}
    done = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: httpx.get(f"{service}/v1/jobs/{jid}", timeout=10).json()["state"] == "succeeded")
    _, fams = scrape(service)  # within the retention: the job's whole account
    value = {(s.name, s.labels.get("cause")): s.value for f in fams.values() for s in f.samples
             if s.labels.get("job_id") == jid}
    assert 0 < value[("shardprop_goodput_ratio", None)] <= 1 and value[("shardprop_steps_lost_total", None)] == 0
    assert value[("shardprop_lost_seconds_total", "startup")] > 0
    assert value[("shardprop_lost_seconds_total", "checkpoint")] > 0  # every 100 steps, and at the end
    time.sleep(3.5)  # the retention configured above
    _, fams = scrape(service)
    assert not any(s.labels.get("job_id") == jid for f in fams.values() for s in f.samples)


def test_two_live_runs_overlaid_grow_from_since_pages_only(service):
    """Two real runs whose learning rates differ, overlaid while they run: the
    curves grow with no reload, every metrics request after a job's first
    asks only for the steps after those held, and each curve ends with each
    step exactly once. The screenshot is the README's (docs/dashboard.png)."""
    slow = {**JOB, "name": "lr-0.05", "training": {**JOB["training"], "steps": 200}}
    fast = {**slow, "name": "lr-0.5", "training": {**slow["training"],
                                                   "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}}}
    a = httpx.post(f"{service}/v1/jobs", json=slow, timeout=10).json()["id"]
    b = httpx.post(f"{service}/v1/jobs", json=fast, timeout=10).json()["id"]
    asked: dict[str, list[int]] = {a: [], b: []}

    def note(request):
        url = urlparse(request.url)
        if url.path.endswith("/metrics") and url.path.startswith("/v1/jobs/"):
            asked[url.path.split("/")[3]].append(int(parse_qs(url.query)["since"][0]))

    with chromium() as browser, page_of(browser, 1400, 1000) as page:
        page.on("request", note)
        page.goto(f"{service}/?jobs={a},{b}")
        held = lambda job: int(page.locator(f"#loss path[data-series='{job}:loss']").get_attribute("data-points")  # noqa: E731
                               if page.locator(f"#loss path[data-series='{job}:loss']").count() else 0)
        first = wait_for(lambda: held(a) or None, timeout=60)
        wait_for(lambda: held(a) > first, timeout=60)  # more points, no reload
        for job in (a, b):
            row = page.locator(f"tr.job[data-id='{job}']")
            wait_for(lambda: row.get_attribute("data-state") == "succeeded", timeout=180)
        wait_for(lambda: held(a) == held(b) == 200, timeout=30)
        assert len(page.locator("#accuracy path.series").all()) == 2 and page.locator("#accuracy-legend li").count() == 2
        assert page.locator(f"tr.job[data-id='{b}'] td.val_accuracy").get_attribute("data-value") is not None
        history = httpx.get(f"{service}/v1/jobs/{b}/metrics", params={"limit": 1000}).json()["metrics"]
        assert float(page.locator(f"tr.job[data-id='{b}'] td.loss").get_attribute("data-value")) == history[-1]["loss"]
        page.wait_for_timeout(1500)  # a redraw after the last poll
        screenshot(page, "dashboard.png")
        with page_of(browser, 390, 844) as phone:
            phone.goto(f"{service}/?jobs={a},{b}")
            wait_for(lambda: int(phone.locator("#loss").get_attribute("data-points") or 0) > 0, timeout=30)
            screenshot(phone, "dashboard-phone.png")
    for job, since in asked.items():
        # from 0 only while nothing is held; then never back: never the whole history again
        assert since == sorted(since) and since[-1] > 0, (job, since)


def test_with_a_token_the_page_asks_for_it_then_shows_the_jobs(tmp_path):
    """A service with a token (paused: the job only queues) answers the page
    401 until the token is typed in; then the page shows the jobs, and keeps
    the token for the tab (sessionStorage) across a reload."""
    from tests.service_helpers import service as paused_service, tiny_spec

    token = "dashboard-token-0123456789"
    with paused_service(tmp_path, token=token) as (url, _):
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), headers={"Authorization": f"Bearer {token}"}).json()
        with chromium() as browser, page_of(browser) as page:
            page.goto(f"{url}/")
            error = page.locator("#error")
            wait_for(lambda: "needs its token" in (error.text_content() or ""), timeout=30)
            assert page.locator("#auth").is_visible() and page.locator("tr.job").count() == 0
            page.fill("#token", "not-the-token-at-all")
            page.click("#use-token")
            wait_for(lambda: error.text_content() == "wrong token", timeout=30)
            assert page.locator("tr.job").count() == 0
            page.fill("#token", token)
            page.click("#use-token")
            row = page.locator(f"tr.job[data-id='{job['id']}']")
            wait_for(lambda: row.count() == 1 and row.get_attribute("data-state") == "queued", timeout=30)
            assert not page.locator("#auth").is_visible() and error.text_content() == ""
            page.reload()
            wait_for(lambda: row.count() == 1, timeout=30)
            assert page.evaluate("sessionStorage.getItem('shardprop-token')") == token
