"""The SQLite job store: states, transitions, metrics upserts, idempotency, threads."""

from __future__ import annotations

import threading

import pytest

from service.store import IdempotencyConflict, IllegalTransition, NotFound, Store

SPEC = {"name": "a", "training": {"steps": 10}, "resources": {"workers": 2}}


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.db")
    yield s
    s.close()


def test_wal_and_persistence(tmp_path):
    s = Store(tmp_path / "s.db")
    job, created = s.create_job(SPEC)
    assert created and job["state"] == "queued" and job["steps"] == 10 and job["workers"] == 2
    assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()
    again = Store(tmp_path / "s.db")
    assert again.get_job(job["id"], details=True)["spec"] == SPEC
    again.close()


def test_legal_and_illegal_transitions(store):
    job, _ = store.create_job(SPEC)
    with pytest.raises(IllegalTransition):
        store.transition(job["id"], "succeeded")
    store.transition(job["id"], "running", "started")
    with pytest.raises(IllegalTransition):
        store.transition(job["id"], "queued")
    store.transition(job["id"], "failed", "error", error="boom")
    for to in ("running", "succeeded", "cancelled", "queued"):
        with pytest.raises(IllegalTransition):
            store.transition(job["id"], to)
    got = store.get_job(job["id"], details=True)
    assert got["error"] == "boom"
    assert [(t["from"], t["to"]) for t in got["transitions"]] == [
        (None, "queued"), ("queued", "running"), ("running", "failed")]
    with pytest.raises(NotFound):
        store.get_job("nope")
    with pytest.raises(NotFound):
        store.transition("nope", "running")


def test_a_step_is_recorded_once_per_run_and_a_resumed_runs_replay_replaces_it(store):
    job, _ = store.create_job(SPEC)
    store.record_metric(job["id"], {"step": 1, "loss": 2.0, "phases": {"compute": 0.1}})
    store.record_metric(job["id"], {"step": 2, "loss": 1.5, "val_accuracy": 0.5})
    store.record_metric(job["id"], {"step": 2, "loss": 1.4, "val_accuracy": 0.6})  # a second record, same run
    rows = store.metrics(job["id"])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == 1.5 and rows[1]["val_accuracy"] == 0.5, "the second record of a run was refused"
    refused = [e for e in store.events(job["id"]) if e["kind"] == "record_refused"]
    assert [(e["step"], e["detail"]) for e in refused] == [(2, {"step": 2, "attempt": 0})]
    store.count_resume(job["id"])  # a resumed run replays the steps since its checkpoint
    store.record_metric(job["id"], {"step": 2, "loss": 1.4, "val_accuracy": 0.6})
    store.record_metric(job["id"], {"step": 1, "loss": float("nan")})
    rows = store.metrics(job["id"])
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == 1.4 and rows[1]["val_accuracy"] == 0.6 and rows[0]["loss"] is None
    assert len([e for e in store.events(job["id"]) if e["kind"] == "record_refused"]) == 1
    store.record_metric(job["id"], {"step": 1, "loss": 3.0})  # and that run's second record is refused too
    assert store.metrics(job["id"])[0]["loss"] is None
    assert store.missing_steps(job["id"]) == 0
    assert store.get_job(job["id"])["step"] == 2
    assert store.metrics(job["id"], since=1)[0]["step"] == 2


def test_idempotency(store):
    a, created = store.create_job(SPEC, idempotency_key="k", body_hash="h1")
    b, again = store.create_job(SPEC, idempotency_key="k", body_hash="h1")
    assert created and not again and a["id"] == b["id"]
    with pytest.raises(IdempotencyConflict):
        store.create_job(SPEC, idempotency_key="k", body_hash="h2")
    assert len(store.list_jobs()) == 1


def test_list_newest_first_filter_and_counts(store):
    ids = [store.create_job(SPEC)[0]["id"] for _ in range(3)]
    store.transition(ids[0], "cancelled")
    assert [j["id"] for j in store.list_jobs()] == ids[::-1]
    assert [j["id"] for j in store.list_jobs("queued")] == ids[:0:-1]
    assert [j["id"] for j in store.jobs_in_state("queued")] == ids[1:]
    assert store.counts() == {"queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1}


def test_threads_each_job_once_and_one_winner_per_transition(store):
    made = []

    def submit(i):
        for k in range(10):
            made.append(store.create_job(SPEC, idempotency_key=f"{k}", body_hash="h")[0]["id"])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(set(made)) == 10 and len(store.list_jobs()) == 10
    job = made[0]
    wins = []

    def move():
        try:
            store.transition(job, "cancelled")
            wins.append(1)
        except IllegalTransition:
            pass

    threads = [threading.Thread(target=move) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert wins == [1]


def _older_store(path, column: str, *inserts: str):
    """A store as a version before `column` (a line of SCHEMA) left it: job j1, then `inserts`."""
    import sqlite3

    from service.store import SCHEMA

    old = SCHEMA.replace(column, "")
    assert column.strip(",\n ").split()[0] not in old  # "resumes", "record": gone
    with sqlite3.connect(path) as db:
        db.executescript(old)
        db.execute("INSERT INTO jobs (id, name, spec, state, steps, created_at, updated_at, workers) "
                   "VALUES ('j1', 'a', '{}', 'running', 10, 'then', 'then', 2)")
        for insert in inserts:
            db.execute(insert)


def test_a_store_made_before_resumes_were_counted_gains_the_column(tmp_path):
    _older_store(tmp_path / "old.db", ",\n    resumes INTEGER NOT NULL DEFAULT 0")
    store = Store(tmp_path / "old.db")
    assert store.get_job("j1")["resumes"] == 0
    assert [store.count_resume("j1") for _ in range(3)] == [1, 2, 3]
    store.close()
    assert Store(tmp_path / "old.db").get_job("j1")["resumes"] == 3  # opened again: no second ALTER


def test_a_store_made_before_records_were_kept_as_json_gets_them(tmp_path):
    _older_store(tmp_path / "old.db", "\n    record TEXT,",
                 "INSERT INTO metrics (job, step, loss, workers, phases, at) "
                 "VALUES ('j1', 1, 0.5, 2, '{\"compute\": 0.25, \"wait\": NaN}', 't1')",
                 "INSERT INTO metrics (job, step, loss, val_accuracy, lr, at) VALUES ('j1', 2, 0.25, 0.75, 0.1, 't2')")
    store = Store(tmp_path / "old.db")
    assert store.metrics("j1") == [
        {"step": 1, "loss": 0.5, "val_loss": None, "val_accuracy": None, "samples_per_s": None, "workers": 2,
         "lr": None, "phases": {"compute": 0.25, "wait": None}, "at": "t1"},
        {"step": 2, "loss": 0.25, "val_loss": None, "val_accuracy": 0.75, "samples_per_s": None, "workers": None,
         "lr": 0.1, "phases": None, "at": "t2"}]
    assert store.get_job("j1", details=True)["latest_metrics"]["val_accuracy"] == 0.75
    store.record_metric("j1", {"step": 3, "loss": 0.125, "phases": {"compute": float("inf")}})
    assert store.metrics("j1", since=2)[0]["phases"] == {"compute": None}
    store.close()


def test_events_are_numbered_per_job_in_order_with_state_changes_among_them(tmp_path):
    """The timeline written here by hand: a job's state changes and
    coordinator events interleaved, two jobs numbered apart; reopened, the
    numbers go on from where they were."""
    store = Store(tmp_path / "s.db")
    a, b = store.create_job(SPEC)[0]["id"], store.create_job(SPEC)[0]["id"]
    store.transition(a, "running", "started")
    store.record_metric(a, {"step": 4, "loss": 0.5})
    store.record_event(a, "recovery", 4, {"step": 4, "steps_replayed": 2, "seconds": float("nan")})
    store.record_event(b, "resize", 1, {"from": 2, "to": (3,)})
    store.close()
    store = Store(tmp_path / "s.db")
    store.transition(a, "succeeded", "finished")
    got = store.events(a)
    assert [(e["seq"], e["kind"], e["step"]) for e in got] == [
        (1, "state", 0), (2, "state", 0), (3, "recovery", 4), (4, "state", 4)]
    assert [e["detail"] for e in got] == [
        {"state": "queued", "from": None, "reason": "submitted"},
        {"state": "running", "from": "queued", "reason": "started"},
        {"step": 4, "steps_replayed": 2, "seconds": None},
        {"state": "succeeded", "from": "running", "reason": "finished"}]
    assert got == sorted(got, key=lambda e: e["time"])
    assert [e["seq"] for e in store.events(a, since=2, limit=1)] == [3]
    assert [(e["seq"], e["detail"]) for e in store.events(b)][1:] == [(2, {"from": 2, "to": [3]})]
    with pytest.raises(NotFound):
        store.events("nope")
    store.close()


def test_a_store_made_before_events_were_kept_gets_the_table_and_its_transitions_as_events(tmp_path):
    import sqlite3

    _older_store(tmp_path / "old.db", ",\n    provenance TEXT",
                 "INSERT INTO transitions (job, from_state, to_state, at, reason) "
                 "VALUES ('j1', NULL, 'queued', '2026-01-02T03:04:05.000000+00:00', 'submitted')",
                 "INSERT INTO transitions (job, from_state, to_state, at, reason) "
                 "VALUES ('j1', 'queued', 'running', '2026-01-02T03:04:06.500000+00:00', 'started')")
    with sqlite3.connect(tmp_path / "old.db") as db:
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone() is None
    store = Store(tmp_path / "old.db")
    assert store.get_job("j1", details=True)["provenance"] is None
    events = store.events("j1")
    assert [(e["seq"], e["detail"]["state"]) for e in events] == [(1, "queued"), (2, "running")]
    assert events[1]["time"] - events[0]["time"] == 1.5
    store.record_event("j1", "checkpoint", 5, {"step": 5, "path": "p"})
    store.close()
    store = Store(tmp_path / "old.db")  # opened again: not filled twice
    assert [e["seq"] for e in store.events("j1")] == [1, 2, 3]
    store.close()


def test_the_list_filters_by_name_and_carries_each_jobs_last_metrics(store):
    """`last_metrics` is, per column, the value of the last step that has one
    (validation is every few steps): here written by hand, step by step."""
    a = store.create_job({**SPEC, "name": "lr-Small"})[0]["id"]
    b = store.create_job({**SPEC, "name": "lr-big"})[0]["id"]
    c = store.create_job({**SPEC, "name": "other"})[0]["id"]
    for step in range(1, 8):
        evaluated = step % 3 == 0
        store.record_metric(a, {"step": step, "loss": 1.0 / step, "val_loss": 2.0 / step if evaluated else None,
                                "val_accuracy": step / 10 if evaluated else None})
    store.record_metric(b, {"step": 1, "loss": float("nan")})  # stored as null
    store.transition(a, "running")
    store.transition(a, "succeeded")
    jobs = {j["id"]: j for j in store.list_jobs()}
    assert jobs[a]["last_metrics"] == {"loss": 1.0 / 7, "val_loss": 2.0 / 6, "val_accuracy": 0.6}
    assert jobs[b]["last_metrics"] == jobs[c]["last_metrics"] == {"loss": None, "val_loss": None,
                                                                  "val_accuracy": None}
    assert [j["id"] for j in store.list_jobs(name="LR-")] == [b, a]
    assert [j["id"] for j in store.list_jobs(name="small")] == [a]
    assert [j["id"] for j in store.list_jobs(name="%")] == []  # a literal, not a pattern
    assert [j["id"] for j in store.list_jobs("succeeded", name="lr")] == [a]
    assert [j["id"] for j in store.list_jobs("queued", name="lr")] == [b]
    assert [j["id"] for j in store.list_jobs(limit=2)] == [c, b]


def test_a_step_record_keeps_the_training_health_fields_with_non_finite_numbers_as_null(store):
    job = store.create_job(SPEC)[0]["id"]
    store.record_metric(job, {"step": 1, "loss": 0.5, "gradient_norm": float("inf"), "update_ratio": [1e-3, None],
                              "worker_compute_s": {0: 0.25, "1": float("nan")}, "worker_wait_s": {"0": 0.0},
                              "finished_at": 1.5e9, "params_sha256": "ab" * 32, "not_a_field": 1})
    (row,) = store.metrics(job)
    assert row["gradient_norm"] is None and row["update_ratio"] == [1e-3, None]
    assert row["worker_compute_s"] == {"0": 0.25, "1": None} and row["worker_wait_s"] == {"0": 0.0}
    assert row["finished_at"] == 1.5e9 and row["params_sha256"] == "ab" * 32 and "not_a_field" not in row
