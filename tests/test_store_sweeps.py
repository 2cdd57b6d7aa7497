"""The store's sweeps: their trials and runs persist, a run is made once per
(sweep, trial, rung), and a run's objective is its job's last recorded value."""

from __future__ import annotations

import sqlite3

import pytest

from service.store import IdempotencyConflict, IllegalTransition, NotFound, Store

DOC = {"name": "sw", "method": "grid"}
TRIALS = [{"training.optimizer.lr": 0.1}, {"training.optimizer.lr": 0.01}]
SPEC = {"name": "sw-t0", "training": {"steps": 10}, "resources": {"workers": 1}}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.db")
    yield s
    s.close()


def test_sweep_trials_and_runs_survive_reopening(tmp_path):
    s = Store(tmp_path / "s.db")
    sweep, created = s.create_sweep(DOC, TRIALS)
    assert created and sweep["state"] == "queued" and sweep["name"] == "sw"
    job, made = s.create_run(sweep["id"], 1, 0, SPEC)
    assert made and job["sweep"] == sweep["id"] and job["state"] == "queued"
    s.close()
    again = Store(tmp_path / "s.db")
    got = again.get_sweep(sweep["id"], details=True)
    assert got["document"] == DOC and got["trials"] == TRIALS
    assert [(r["trial"], r["rung"], r["job_id"]) for r in got["runs"]] == [(1, 0, job["id"])]
    assert again.get_job(job["id"], details=True)["spec"] == SPEC
    assert [j["sweep"] for j in again.list_jobs()] == [sweep["id"]]
    again.close()


def test_a_run_is_made_once(store):
    sweep, _ = store.create_sweep(DOC, TRIALS)
    first, made = store.create_run(sweep["id"], 0, 0, SPEC)
    second, made_again = store.create_run(sweep["id"], 0, 0, {**SPEC, "name": "other"})
    assert made and not made_again and second["id"] == first["id"]
    assert store.counts()["queued"] == 1
    with pytest.raises(sqlite3.IntegrityError):  # no such trial: nothing is written
        store.create_run(sweep["id"], 7, 0, SPEC)
    assert store.counts()["queued"] == 1


def test_objective_is_the_last_recorded_value(store):
    sweep, _ = store.create_sweep(DOC, TRIALS)
    job, _ = store.create_run(sweep["id"], 0, 0, SPEC)
    store.record_metric(job["id"], {"step": 5, "loss": 1.0, "val_accuracy": 0.5})
    store.record_metric(job["id"], {"step": 9, "loss": 0.8, "val_accuracy": 0.75})
    store.record_metric(job["id"], {"step": 10, "loss": 0.7})
    [run] = store.sweep_runs(sweep["id"], "val_accuracy")
    assert run["objective_value"] == 0.75 and run["step"] == 10 and run["steps"] == 10
    assert store.sweep_runs(sweep["id"], "val_loss")[0]["objective_value"] is None
    assert store.sweep_runs(sweep["id"])[0]["objective_value"] is None


def test_idempotency_and_transitions(store):
    sweep, _ = store.create_sweep(DOC, TRIALS, idempotency_key="k", body_hash="h")
    same, created = store.create_sweep(DOC, TRIALS, idempotency_key="k", body_hash="h")
    assert not created and same["id"] == sweep["id"]
    with pytest.raises(IdempotencyConflict):
        store.create_sweep(DOC, TRIALS, idempotency_key="k", body_hash="other")
    assert [s["id"] for s in store.list_sweeps()] == [sweep["id"]] and store.list_sweeps()[0]["trials"] == 2
    assert store.active_sweeps() == [sweep["id"]]
    store.sweep_transition(sweep["id"], "running")
    with pytest.raises(IllegalTransition):
        store.sweep_transition(sweep["id"], "queued")
    store.sweep_transition(sweep["id"], "failed", error="no trial succeeded")
    assert store.get_sweep(sweep["id"])["error"] == "no trial succeeded" and store.active_sweeps() == []
    with pytest.raises(NotFound):
        store.get_sweep("nope")


def test_a_store_made_before_sweeps_gains_them(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0,
        steps INTEGER NOT NULL, checkpoint_step INTEGER, error TEXT, created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL, idempotency_key TEXT UNIQUE, body_hash TEXT, workers INTEGER NOT NULL);
        INSERT INTO jobs (id, name, spec, state, steps, created_at, updated_at, workers)
        VALUES ('old1', 'a', '{}', 'succeeded', 10, 't', 't', 1);""")
    db.close()
    s = Store(path)
    assert s.get_job("old1")["sweep"] is None
    sweep, _ = s.create_sweep(DOC, TRIALS)
    assert s.create_run(sweep["id"], 0, 0, SPEC)[0]["sweep"] == sweep["id"]
    s.close()


def test_a_promotions_parent_and_the_jobs_an_ended_sweep_left(store):
    sweep, _ = store.create_sweep(DOC, TRIALS)
    first, _ = store.create_run(sweep["id"], 0, 0, SPEC)
    other, _ = store.create_run(sweep["id"], 1, 0, SPEC)
    promoted, _ = store.create_run(sweep["id"], 0, 1, {**SPEC, "training": {"steps": 20, "stop_at": 15}})
    assert promoted["steps"] == 15  # where it stops
    assert store.run_parent(promoted["id"]) == (first["id"], 0)
    assert store.run_parent(first["id"]) is None and store.run_parent("nope") is None
    plain, _ = store.create_job(SPEC)
    store.transition(other["id"], "running")
    assert store.unfinished_jobs_of_ended_sweeps() == []
    store.sweep_transition(sweep["id"], "cancelled")
    assert store.unfinished_jobs_of_ended_sweeps() == [first["id"], other["id"], promoted["id"]]
    with pytest.raises(IllegalTransition):  # an ended sweep starts no job
        store.create_run(sweep["id"], 1, 1, SPEC)
    assert store.get_job(plain["id"])["sweep"] is None
