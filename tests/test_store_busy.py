"""A store locked by another process: another process holds SQLite's write
lock on the store file (`BEGIN EXCLUSIVE` and a write, never committed), as a
stalled writer or a careless `sqlite3` session would.

Reads answer from the last committed snapshot (WAL), at once; writes wait at
most 2 s and answer 503 with `Retry-After`; what a running job reports is
kept and written, in order, once the lock is gone."""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service import store as store_module
from service.client import Client
from service.store import Store
from service_helpers import service, tiny_spec, wait_for, wait_state

READ_TIMEOUT_S = 8.0  # far below the 30 s a read used to wait, far above a loaded machine's stall
HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("UPDATE jobs SET updated_at = updated_at")
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
db.execute("ROLLBACK")
"""


@contextmanager
def locked_by_another_process(path: Path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        assert holder.wait(30) == 0


def test_reads_answer_and_writes_get_503_with_retry_after_while_another_process_holds_the_lock(tmp_path):
    with service(tmp_path) as (url, app):
        first = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        with locked_by_another_process(app.state.store.path):
            health = httpx.get(f"{url}/healthz", timeout=READ_TIMEOUT_S)
            listed = httpx.get(f"{url}/v1/jobs", timeout=READ_TIMEOUT_S)
            job = httpx.get(f"{url}/v1/jobs/{first['id']}", timeout=READ_TIMEOUT_S)
            history = httpx.get(f"{url}/v1/jobs/{first['id']}/metrics", timeout=READ_TIMEOUT_S)
            refused = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), timeout=READ_TIMEOUT_S)
        assert health.status_code == 200 and health.json()["jobs"]["queued"] == 1
        assert listed.status_code == 200 and [j["id"] for j in listed.json()["jobs"]] == [first["id"]]
        assert job.status_code == 200 and job.json()["state"] == "queued"
        assert history.status_code == 200 and history.json()["metrics"] == []
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "2"
        assert refused.json() == {"detail": "the job store is busy (database is locked); try again in a moment"}
        # the lock gone, the same request is taken; the refused one left nothing
        again = httpx.post(f"{url}/v1/jobs", json=tiny_spec())
        assert again.status_code == 201
        assert [j["id"] for j in httpx.get(f"{url}/v1/jobs").json()["jobs"]] == [again.json()["id"], first["id"]]


def _steps(store: Store, job_id: str) -> list[int]:
    return [m["step"] for m in store.metrics(job_id)]


def test_what_a_job_reports_while_locked_is_kept_and_written_in_order(tmp_path, monkeypatch):
    store = Store(tmp_path / "s.db")
    job, _ = store.create_job({"name": "a", "training": {"steps": 30}})
    for step in (1, 2, 3):
        store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
    monkeypatch.setattr(store_module, "METRIC_RETRY_S", 0.0)  # every report tries the file again
    with locked_by_another_process(store.path):
        for step in range(4, 21):
            store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
        store.set_checkpoint(job["id"], 20)
        assert _steps(store, job["id"]) == [1, 2, 3]  # the last snapshot, readable
        assert store.get_job(job["id"])["checkpoint_step"] is None
    store.record_metric(job["id"], {"step": 21, "loss": 1.0 / 21})  # the first report after: all written
    assert _steps(store, job["id"]) == list(range(1, 22))
    assert [m["loss"] for m in store.metrics(job["id"])] == [1.0 / s for s in range(1, 22)]
    got = store.get_job(job["id"])
    assert (got["step"], got["checkpoint_step"]) == (21, 20)

    monkeypatch.setattr(store_module, "METRIC_RETRY_S", 3600.0)  # kept: no report tries again
    with locked_by_another_process(store.path):
        for step in range(22, 26):
            store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
    store.record_metric(job["id"], {"step": 26, "loss": 1.0 / 26})
    assert _steps(store, job["id"]) == list(range(1, 22))  # still kept...
    store.transition(job["id"], "cancelled", "by hand")  # ...until any other write
    assert _steps(store, job["id"]) == list(range(1, 27)) and store.get_job(job["id"])["step"] == 26
    store.close()


def test_a_stopping_service_writes_what_was_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "METRIC_RETRY_S", 3600.0)  # kept: no report tries again
    with service(tmp_path) as (url, app):
        store = app.state.store
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        with locked_by_another_process(store.path):
            for step in range(1, 6):
                store.record_metric(job["id"], {"step": step, "loss": 1.0 / step})
        assert _steps(store, job["id"]) == []
    assert _steps(store, job["id"]) == [1, 2, 3, 4, 5]


def test_a_report_for_a_job_that_is_gone_is_dropped_and_blocks_nothing(tmp_path, caplog):
    store = Store(tmp_path / "s.db")
    with caplog.at_level(logging.ERROR, "shardprop.store"):
        store.record_metric("nosuchjob", {"step": 1, "loss": 0.5})
    assert "dropped a deferred write (FOREIGN KEY constraint failed)" in caplog.text
    job, created = store.create_job({"name": "a", "training": {"steps": 3}})
    store.record_metric(job["id"], {"step": 1, "loss": 0.5})
    assert created and _steps(store, job["id"]) == [1]
    store.close()


@pytest.mark.ray
def test_a_job_trained_through_a_locked_store_keeps_every_step(tmp_path, ray_local):
    steps = 400
    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app):
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec(steps=steps, eval_every=50, checkpoint_every=50)).json()
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["step"] >= 20, 120, what="step 20")
        steps_counted = app.state.metrics.steps.labels(job_id=job["id"])  # in memory, not in the store
        with locked_by_another_process(app.state.store.path):
            at_lock = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=READ_TIMEOUT_S).json()["step"]
            # training goes on, its steps kept in memory while the store is locked
            wait_for(lambda: steps_counted._value.get() >= at_lock + 50, 120, what="50 steps while locked")
            seen = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=READ_TIMEOUT_S)
        assert seen.status_code == 200 and seen.json()["step"] == at_lock  # the snapshot of the lock's start
        done = wait_state(url, job["id"], timeout=120)
        assert done["state"] == "succeeded", done
        with Client(url) as client:
            history = client.metrics(job["id"])
        assert [m["step"] for m in history] == list(range(1, steps + 1))
        assert [m["step"] for m in history if m["val_accuracy"] is not None] == list(range(50, steps + 1, 50))
        assert done["step"] == steps and done["checkpoint_step"] == steps
