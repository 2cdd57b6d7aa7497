"""GET /v1/jobs/{id}/metrics a page at a time: at most `limit` records of
the steps after `since`, with where to go on (`next_since`) and whether there
is more; the client reads a whole history page by page."""

from __future__ import annotations

import httpx
import pytest

from service.cli import main
from service.client import Client
from service_helpers import service, tiny_spec


@pytest.fixture
def job_with_history(tmp_path):
    """A paused service holding a job with 2500 recorded steps (loss = 1/step)."""
    with service(tmp_path) as (url, app):
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        for step in range(1, 2501):
            app.state.store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
        yield url, job["id"]


def _get(url, job_id, **params) -> httpx.Response:
    return httpx.get(f"{url}/v1/jobs/{job_id}/metrics", params=params, timeout=30)


def test_pages_follow_on_from_each_other(job_with_history):
    url, job_id = job_with_history
    expected = [(0, 1000, 1, 1000, True), (1000, 1000, 1001, 2000, True), (2000, 1000, 2001, 2500, False),
                (2400, 50, 2401, 2450, True), (2450, 50, 2451, 2500, False)]
    for since, limit, first, last, more in expected:
        body = _get(url, job_id, since=since, limit=limit).json()
        assert [m["step"] for m in body["metrics"]] == list(range(first, last + 1))
        assert body["metrics"][0]["loss"] == 1.0 / first
        assert (body["job_id"], body["next_since"], body["more"]) == (job_id, last, more)
    body = _get(url, job_id).json()  # the default page: 1000
    assert len(body["metrics"]) == 1000 and body["next_since"] == 1000 and body["more"] is True
    body = _get(url, job_id, since=2500).json()  # nothing new yet: ask again from the same place
    assert body == {"job_id": job_id, "metrics": [], "next_since": 2500, "more": False}


@pytest.mark.parametrize("params,words", [
    ({"limit": 0}, "limit: Input should be greater than or equal to 1 (got '0')"),
    ({"limit": 10001}, "limit: Input should be less than or equal to 10000 (got '10001')"),
    ({"limit": "many"}, "limit: Input should be a valid integer"),
    ({"since": -1}, "since: Input should be greater than or equal to 0 (got '-1')"),
])
def test_a_limit_or_since_out_of_range_is_a_422_naming_it(job_with_history, params, words):
    url, job_id = job_with_history
    r = _get(url, job_id, **params)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_an_unknown_job_is_a_404(job_with_history):
    url, _ = job_with_history
    r = _get(url, "nosuchjob", limit=10)
    assert r.status_code == 404 and r.json() == {"detail": "no job with id 'nosuchjob'"}


def test_the_client_and_the_cli_read_the_whole_history_page_by_page(job_with_history, capsys):
    url, job_id = job_with_history
    with Client(url) as client:
        assert [m["step"] for m in client.metrics(job_id)] == list(range(1, 2501))
        assert [m["step"] for m in client.metrics(job_id, since=1999)] == list(range(2000, 2501))
    assert main(["--server", url, "metrics", job_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step,loss,val_loss,val_accuracy,samples_per_s,workers,lr"
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 2501))


def test_non_finite_numbers_come_back_as_null(tmp_path):
    with service(tmp_path) as (url, app):
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        app.state.store.record_metric(job["id"], {"step": 1, "loss": float("nan"), "lr": float("inf"),
                                                  "phases": {"compute": float("inf"), "wait": 0.5}})
        r = _get(url, job["id"])
        assert r.status_code == 200, r.text
        (m,) = r.json()["metrics"]
        assert (m["loss"], m["lr"], m["phases"]) == (None, None, {"compute": None, "wait": 0.5})
