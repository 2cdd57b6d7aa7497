"""The job store: one SQLite file (WAL) holding jobs, their state transitions,
their per-step metrics history and their event timeline.

Each method is one transaction: writes on the one writer connection, reads on
read-only connections of their own (`service/store_db.py`), so a read never
waits behind a write. What a running job reports (per-step metrics, its
checkpoint step, its workers) is never refused for a lock: while the file is
locked by someone else it is kept and written, in order, by the next write
that gets through, so training goes on and nothing is lost.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from datetime import datetime
from pathlib import Path

from service.jsonable import finite, json_safe
from service.states import LEGAL, STATES
from service.store_db import (WRITE_WAIT_S, Connections, IdempotencyConflict, IllegalTransition, NotFound, StoreBusy,
                              StoreError, StoreUnavailable, now)
from service.store_sweeps import SWEEP_SCHEMA, SWEEP_TABLES, SweepTables

__all__ = ["Store", "StoreError", "StoreUnavailable", "StoreBusy", "NotFound", "IllegalTransition",
           "IdempotencyConflict"]

log = logging.getLogger("shardprop.store")
METRIC_WAIT_S = 0.1  # the training thread waits no longer than this for a locked store
METRIC_RETRY_S = 1.0  # and then keeps what it reports for at least this long before trying again

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL,
    checkpoint_step INTEGER,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT,
    workers INTEGER NOT NULL,
    resumes INTEGER NOT NULL DEFAULT 0,
    provenance TEXT,
    sweep TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL REFERENCES jobs(id),
    from_state TEXT,
    to_state TEXT NOT NULL,
    at TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions(job, id);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL REFERENCES jobs(id),
    step INTEGER NOT NULL,
    loss REAL,
    val_loss REAL,
    val_accuracy REAL,
    samples_per_s REAL,
    workers INTEGER,
    lr REAL,
    phases TEXT,
    at TEXT NOT NULL,
    record TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, step)
);
"""

JOB_FIELDS = ("id", "name", "state", "step", "steps", "checkpoint_step", "error", "created_at",
              "updated_at", "workers", "resumes", "sweep")
# columns added since the first schema, with their definitions, for stores made before them
ADDED_COLUMNS = {"jobs": {"resumes": "INTEGER NOT NULL DEFAULT 0", "provenance": "TEXT",
                          "sweep": "TEXT"},  # the sweep a trial's job belongs to (service/store_sweeps.py)
                 "metrics": {"record": "TEXT",
                             # the job's run that wrote the row: jobs.resumes then (a resume is a new run)
                             "attempt": "INTEGER NOT NULL DEFAULT 0"}}
# A job's timeline: its state transitions and the coordinator's typed events,
# numbered 1, 2, ... per job. A number is given inside the transaction that
# writes the event (one writer, in order), so it never repeats or goes back,
# also across a killed service: what a reader saw was committed.
EVENTS_TABLE = """
CREATE TABLE events (
    job TEXT NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step INTEGER,
    time REAL NOT NULL,
    detail TEXT NOT NULL,
    PRIMARY KEY (job, seq)
)"""
INSERT_EVENT = ("INSERT INTO events (job, seq, kind, step, time, detail) VALUES "
                "(?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job = ?1), ?2, ?3, ?4, ?5)")
LAST_METRICS = ("loss", "val_loss", "val_accuracy")  # what the job list shows of each job's history
METRIC_COLUMNS = ("step", "loss", "val_loss", "val_accuracy", "samples_per_s", "workers", "lr", "phases", "at")
# A step's row is written once per run of the job (its attempt: jobs.resumes):
# a second record of a step in the same run is refused, and leaves a
# `record_refused` event; a later run's (a resumed job replaying the steps
# since its checkpoint, with the same bits) replaces it. So the history
# holds each step exactly once, the newest run's.
_ATTEMPT = "COALESCE((SELECT resumes FROM jobs WHERE id = ?), 0)"
UPSERT_METRIC = (
    f"INSERT INTO metrics (job, {', '.join(METRIC_COLUMNS)}, record, attempt) "
    f"VALUES (?, {', '.join('?' * 10)}, {_ATTEMPT}) "
    "ON CONFLICT(job, step) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in (*METRIC_COLUMNS[1:], "record", "attempt"))
    + " WHERE metrics.attempt < excluded.attempt")
REFUSED_METRIC = (
    "INSERT INTO events (job, seq, kind, step, time, detail) "
    "SELECT m.job, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job = m.job), 'record_refused', m.step, ?, "
    "json_object('step', m.step, 'attempt', m.attempt) "
    f"FROM metrics m WHERE m.job = ? AND m.step = ? AND m.attempt >= {_ATTEMPT}")
# what a step record holds besides the columns, kept in its JSON (docs/service.md, the step record)
EXTRA_FIELDS = ("gradient_norm", "update_ratio", "worker_compute_s", "worker_wait_s", "finished_at",
                "params_sha256", "goodput")
_PHASES = json.JSONDecoder(parse_constant=lambda _: None)  # a NaN or Infinity becomes null
_RECORD = json.JSONEncoder(separators=(",", ":"))  # made once: one per record is not free


def _integer(x):
    return None if x is None else int(x)


class Store(SweepTables):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._connections = Connections(self.path, SCHEMA + SWEEP_SCHEMA)  # the folder 0700, the file 0600
        self._db = self._connections.writer
        with self._tx() as db:
            self._migrate(db)
        self._retry_at = 0.0  # what a job reports waits until then before trying a locked file again

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Add the columns a store made by an older version lacks."""
        for table, columns in ADDED_COLUMNS.items():
            have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
                    if (table, name) == ("metrics", "record"):
                        _fill_records(db)
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is None:
            db.execute(EVENTS_TABLE)
            _fill_events(db)
        db.execute("CREATE INDEX IF NOT EXISTS jobs_sweep ON jobs(sweep) WHERE sweep IS NOT NULL")

    def close(self) -> None:
        self.flush()
        self._connections.close()

    def flush(self) -> None:
        """Write what was kept while the file was locked (at a stop: the last chance)."""
        if self._connections.deferred:
            try:
                with self._tx():
                    pass
            except StoreUnavailable as err:
                log.error("%s: %d deferred write(s) not done", err, self._connections.deferred)

    # ------------------------------------------------------------ helpers

    def _tx(self, wait_s: float = WRITE_WAIT_S):
        return self._connections.write(wait_s)

    def _read(self):
        return self._connections.read()

    @staticmethod
    def _job(row: sqlite3.Row, spec: bool = False) -> dict:
        job = {k: row[k] for k in JOB_FIELDS}
        if spec:
            job["spec"] = json.loads(row["spec"])
            job["provenance"] = json.loads(row["provenance"]) if row["provenance"] else None
        return job

    # ------------------------------------------------------------ jobs

    def create_job(self, spec: dict, *, idempotency_key: str | None = None,
                   body_hash: str | None = None, provenance: dict | None = None) -> tuple[dict, bool]:
        """Store a new queued job; returns (job, created). With a key already
        used: the same body gives the existing job, another raises.
        `provenance`: what the job was made from (service/provenance.py)."""
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was already used with a different body "
                            f"(job {row['id']})")
                    return self._job(row, spec=True), False
            job_id = self._insert_job(db, spec, idempotency_key=idempotency_key, body_hash=body_hash,
                                      provenance=provenance)
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row, spec=True), True

    @staticmethod
    def _insert_job(db: sqlite3.Connection, spec: dict, *, idempotency_key: str | None = None,
                    body_hash: str | None = None, provenance: dict | None = None, sweep: str | None = None) -> str:
        """A new queued job's row, transition and first event, in the caller's transaction; its id."""
        job_id = uuid.uuid4().hex[:12]
        at = now()
        training = spec.get("training", {})
        steps = training.get("stop_at") or training.get("steps", 0)  # a job stopped early runs to stop_at
        db.execute(
            "INSERT INTO jobs (id, name, spec, state, step, steps, error, created_at, updated_at, "
            "idempotency_key, body_hash, workers, provenance, sweep) "
            "VALUES (?, ?, ?, 'queued', 0, ?, NULL, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, spec.get("name", "job"), json.dumps(spec, sort_keys=True), int(steps),
             at, at, idempotency_key, body_hash, int(spec.get("resources", {}).get("workers", 1)),
             json.dumps(provenance, sort_keys=True) if provenance is not None else None, sweep))
        db.execute("INSERT INTO transitions (job, from_state, to_state, at, reason) VALUES (?, NULL, "
                   "'queued', ?, 'submitted')", (job_id, at))
        db.execute(INSERT_EVENT, _state_event(job_id, None, "queued", "submitted", 0))
        return job_id

    def get_job(self, job_id: str, *, details: bool = False) -> dict:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            job = self._job(row, spec=details)
            if details:
                job["transitions"] = [
                    {"from": t["from_state"], "to": t["to_state"], "at": t["at"], "reason": t["reason"]}
                    for t in db.execute("SELECT * FROM transitions WHERE job = ? ORDER BY id", (job_id,))]
                m = db.execute("SELECT record FROM metrics WHERE job = ? ORDER BY step DESC LIMIT 1",
                               (job_id,)).fetchone()
                job["latest_metrics"] = json.loads(m[0]) if m is not None else None
            return job

    def list_jobs(self, state: str | None = None, limit: int = 1000, name: str | None = None) -> list[dict]:
        """Newest first; `name`: only jobs whose name contains it (any case).
        Each job carries `last_metrics`: its last recorded loss, val_loss and
        val_accuracy (each from the last step that has it; null if none)."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if name:
            where.append("instr(lower(name), lower(?)) > 0")  # names are ASCII (core.spec.NAME)
            params.append(name)
        last = ", ".join(f"(SELECT {c} FROM metrics WHERE job = jobs.id AND {c} IS NOT NULL "
                         f"ORDER BY step DESC LIMIT 1) AS last_{c}" for c in LAST_METRICS)
        sql = (f"SELECT *, {last} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY seq DESC LIMIT ?")
        with self._read() as db:
            return [{**self._job(r), "last_metrics": {c: r[f"last_{c}"] for c in LAST_METRICS}}
                    for r in db.execute(sql, (*params, limit))]

    def jobs_in_state(self, state: str, limit: int = -1) -> list[dict]:
        """Oldest first (FIFO), with specs; the first `limit` (-1: all)."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (state, limit))
            return [self._job(r, spec=True) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            found = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: found.get(s, 0) for s in STATES}

    def transition(self, job_id: str, to: str, reason: str = "", error: str | None = None,
                   allowed_from: set[str] | None = None) -> dict:
        """Move a job to `to`; refuses moves LEGAL does not allow."""
        if to not in STATES:
            raise IllegalTransition(f"unknown state {to!r}")
        at = now()
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            before = row["state"]
            if to not in LEGAL[before] or (allowed_from is not None and before not in allowed_from):
                raise IllegalTransition(f"job {job_id} is {before}; it cannot become {to}")
            db.execute("UPDATE jobs SET state = ?, updated_at = ?, error = COALESCE(?, error) WHERE id = ?",
                       (to, at, error, job_id))
            db.execute("INSERT INTO transitions (job, from_state, to_state, at, reason) VALUES (?, ?, ?, ?, ?)",
                       (job_id, before, to, at, reason))
            step = db.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()["step"]
            db.execute(INSERT_EVENT, _state_event(job_id, before, to, reason, step))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def set_workers(self, job_id: str, workers: int) -> None:
        self._write_soon(("UPDATE jobs SET workers = ?, updated_at = ? WHERE id = ?", (workers, now(), job_id)))

    def count_resume(self, job_id: str) -> int:
        """One more resume of a job found running at start; returns the count."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET resumes = resumes + 1, updated_at = ? WHERE id = ?", (now(), job_id))
            return db.execute("SELECT resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()["resumes"]

    def set_data_sha256(self, job_id: str, sha256: str) -> None:
        """The job's data fingerprint once its data is prepared: its manifest's (core/provenance.py)."""
        self._write_soon(("UPDATE jobs SET provenance = json_set(provenance, '$.data_sha256', ?), updated_at = ? "
                          "WHERE id = ? AND provenance IS NOT NULL", (sha256, now(), job_id)))

    def set_checkpoint(self, job_id: str, step: int) -> None:
        self._write_soon(("UPDATE jobs SET checkpoint_step = ?, updated_at = ? WHERE id = ?", (step, now(), job_id)))

    # ------------------------------------------------------------ metrics

    def record_metric(self, job_id: str, record: dict) -> None:
        """Store one step's record, once per run of the job: a second one
        of this run is refused (a `record_refused` event says so), one of a
        later run (a resumed job replays the steps since its checkpoint)
        replaces it."""
        row = _metric_row(job_id, record)
        step, at = row[1], row[9]
        self._write_soon((REFUSED_METRIC, (time.time(), job_id, step, job_id)),
                         (UPSERT_METRIC, (*row, job_id)),
                         ("UPDATE jobs SET step = MAX(step, ?), updated_at = ? WHERE id = ?", (step, at, job_id)))

    def _write_soon(self, *statements: tuple[str, tuple]) -> None:
        """The training thread's writes: now if the file is free, else kept
        (in order) and written by the next write that gets through; never an
        error, and never more than a short wait for the caller."""
        for statement in statements:
            self._connections.defer(*statement)
        if time.monotonic() < self._retry_at:
            return  # still locked a moment ago: do not make training wait again yet
        try:
            with self._tx(wait_s=METRIC_WAIT_S):
                pass
        except StoreBusy as err:
            if self._retry_at == 0.0:
                log.warning("%s; progress is kept and written once the store is free", err)
            self._retry_at = time.monotonic() + METRIC_RETRY_S
        else:
            self._retry_at = 0.0

    def missing_steps(self, job_id: str) -> int:
        """Steps from 1 to the highest recorded that the job's history lacks:
        every step is recorded once, so 0 (a step is one row: (job, step) is
        the key; a second record of it in the same run is refused, a later
        run's replaces it)."""
        with self._read() as db:
            return int(db.execute("SELECT COALESCE(MAX(step), 0) - COUNT(*) FROM metrics WHERE job = ?",
                                  (job_id,)).fetchone()[0])

    def metrics(self, job_id: str, since: int = 0, limit: int | None = None) -> list[dict]:
        """The records of steps after `since`, in step order; at most `limit`."""
        return [json.loads(text) for text in self.metrics_json(job_id, since, limit)]

    def metrics_json(self, job_id: str, since: int = 0, limit: int | None = None) -> list[str]:
        """The same, each record as the JSON text stored with it: a page is
        polled often, and is served without decoding and encoding it again."""
        with self._read() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job with id {job_id!r}")
            rows = db.execute("SELECT record FROM metrics WHERE job = ? AND step > ? ORDER BY step LIMIT ?",
                              (job_id, since, -1 if limit is None else limit))
            return [r[0] for r in rows]

    # ------------------------------------------------------------ events

    def record_event(self, job_id: str, kind: str, step: int | None, detail: dict) -> None:
        """Append a coordinator's event to the job's timeline (a training
        thread's write: never refused for a lock, see `_write_soon`)."""
        self._write_soon((INSERT_EVENT, (job_id, kind, _integer(step), time.time(),
                                         _RECORD.encode(json_safe(detail)))))

    def events(self, job_id: str, since: int = 0, limit: int | None = None) -> list[dict]:
        """The job's events numbered after `since`, in order; at most `limit`."""
        with self._read() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job with id {job_id!r}")
            rows = db.execute("SELECT seq, kind, step, time, detail FROM events WHERE job = ? AND seq > ? "
                              "ORDER BY seq LIMIT ?", (job_id, since, -1 if limit is None else limit))
            return [{"seq": r["seq"], "kind": r["kind"], "step": r["step"], "time": r["time"],
                     "detail": json.loads(r["detail"])} for r in rows]

    def snapshot(self) -> tuple:
        """Everything stored, for tests that check nothing changed."""
        with self._read() as db:
            return tuple(tuple(tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY 1, 2"))
                         for t in ("jobs", "transitions", "metrics", "events", *SWEEP_TABLES))


def _metric_row(job_id: str, record: dict) -> tuple:
    """The row stored for a step: its columns, then the record as the API
    shows it (JSON, every number finite or null)."""
    phases = record.get("phases")
    values = (int(record["step"]), finite(record.get("loss")), finite(record.get("val_loss")),
              finite(record.get("val_accuracy")), finite(record.get("samples_per_s")),
              _integer(record.get("workers")), finite(record.get("lr")),
              {k: finite(v) for k, v in phases.items()} if phases is not None else None, now())
    shown = dict(zip(METRIC_COLUMNS, values))
    shown.update({k: json_safe(record[k]) for k in EXTRA_FIELDS if k in record})
    return (job_id, *values[:7], _RECORD.encode(values[7]) if values[7] is not None else None, values[8],
            _RECORD.encode(shown))


def _state_event(job_id: str, before: str | None, to: str, reason: str, step: int | None) -> tuple:
    detail = {"state": to, "from": before, "reason": reason}
    return (job_id, "state", step, time.time(), _RECORD.encode(detail))


def _fill_events(db: sqlite3.Connection) -> None:
    """The timeline of every job of a store made before events were kept:
    its state transitions (the coordinator's events of then are gone)."""
    rows = db.execute("SELECT job, from_state, to_state, at, reason FROM transitions ORDER BY id").fetchall()
    for r in rows:
        try:
            at = datetime.fromisoformat(r["at"]).timestamp()
        except (TypeError, ValueError):
            at = 0.0
        job, kind, step, _, detail = _state_event(r["job"], r["from_state"], r["to_state"], r["reason"] or "", None)
        db.execute(INSERT_EVENT, (job, kind, step, at, detail))


def _fill_records(db: sqlite3.Connection) -> None:
    """The `record` of every step of a store made before it existed, from the other columns."""
    rows = db.execute(f"SELECT job, {', '.join(METRIC_COLUMNS)} FROM metrics").fetchall()
    db.executemany("UPDATE metrics SET record = ? WHERE job = ? AND step = ?", [
        (_RECORD.encode({**dict(zip(METRIC_COLUMNS, tuple(r)[1:])), "phases": _PHASES.decode(r[8]) if r[8] else None}),
         r[0], r[1]) for r in rows])
