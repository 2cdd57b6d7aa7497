"""The job store: one SQLite file (WAL) holding jobs, their state transitions
and their per-step metrics history.

One connection shared by every thread behind a lock: SQLite serializes writes
anyway, and the service's writes are small. Each method is one transaction.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from service.states import LEGAL, STATES

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
    resumes INTEGER NOT NULL DEFAULT 0
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
    PRIMARY KEY (job, step)
);
"""

JOB_FIELDS = ("id", "name", "state", "step", "steps", "checkpoint_step", "error", "created_at",
              "updated_at", "workers", "resumes")
# columns added since the first schema, with their definitions, for stores made before them
ADDED_COLUMNS = {"jobs": {"resumes": "INTEGER NOT NULL DEFAULT 0"}}


class StoreError(Exception):
    pass


class NotFound(StoreError):
    pass


class IllegalTransition(StoreError):
    pass


class IdempotencyConflict(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The store's disk refused a write (full, or an I/O error); nothing was
    written, and the same call may succeed later."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


DISK_ERRORS = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY"}


def unavailable(err: sqlite3.Error, path: Path) -> StoreUnavailable | None:
    """The StoreUnavailable a disk error stands for, None for other errors."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if not any(name == kind or name.startswith(kind + "_") for kind in DISK_ERRORS):
        return None
    full = name == "SQLITE_FULL"
    return StoreUnavailable(f"the job store {path} cannot be written: "
                            f"{'no space left on device' if full else err}", disk_full=full)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _finite(x):
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def create_private(path: Path) -> None:
    """The store's folder 0700 (when this creates it; an existing one is
    left as it is) and its file 0600, before SQLite opens it: SQLite gives
    the -wal and -shm files the mode of the database file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if existing.exists():  # made by an earlier version, world-readable
            os.chmod(existing, 0o600)


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        create_private(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._migrate()

    def _migrate(self) -> None:
        """Add the columns a store made by an older version lacks."""
        for table, columns in ADDED_COLUMNS.items():
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ helpers

    def _tx(self):
        return _Tx(self)

    @staticmethod
    def _job(row: sqlite3.Row, spec: bool = False) -> dict:
        job = {k: row[k] for k in JOB_FIELDS}
        if spec:
            job["spec"] = json.loads(row["spec"])
        return job

    # ------------------------------------------------------------ jobs

    def create_job(self, spec: dict, *, idempotency_key: str | None = None,
                   body_hash: str | None = None) -> tuple[dict, bool]:
        """Store a new queued job; returns (job, created). With a key already
        used: the same body gives the existing job, another raises."""
        job_id = uuid.uuid4().hex[:12]
        at = now()
        training = spec.get("training", {})
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was already used with a different body "
                            f"(job {row['id']})")
                    return self._job(row, spec=True), False
            db.execute(
                "INSERT INTO jobs (id, name, spec, state, step, steps, error, created_at, updated_at, "
                "idempotency_key, body_hash, workers) VALUES (?, ?, ?, 'queued', 0, ?, NULL, ?, ?, ?, ?, ?)",
                (job_id, spec.get("name", "job"), json.dumps(spec, sort_keys=True), int(training.get("steps", 0)),
                 at, at, idempotency_key, body_hash, int(spec.get("resources", {}).get("workers", 1))))
            db.execute("INSERT INTO transitions (job, from_state, to_state, at, reason) VALUES (?, NULL, "
                       "'queued', ?, 'submitted')", (job_id, at))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row, spec=True), True

    def get_job(self, job_id: str, *, details: bool = False) -> dict:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            job = self._job(row, spec=details)
            if details:
                job["transitions"] = [
                    {"from": t["from_state"], "to": t["to_state"], "at": t["at"], "reason": t["reason"]}
                    for t in self._db.execute("SELECT * FROM transitions WHERE job = ? ORDER BY id", (job_id,))]
                m = self._db.execute("SELECT * FROM metrics WHERE job = ? ORDER BY step DESC LIMIT 1",
                                     (job_id,)).fetchone()
                job["latest_metrics"] = self._metric(m) if m is not None else None
            return job

    def list_jobs(self, state: str | None = None, limit: int = 1000) -> list[dict]:
        """Newest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq DESC LIMIT ?",
                                        (state, limit))
            return [self._job(r) for r in rows]

    def jobs_in_state(self, state: str, limit: int = -1) -> list[dict]:
        """Oldest first (FIFO), with specs; the first `limit` (-1: all)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT ?", (state, limit))
            return [self._job(r, spec=True) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            found = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
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
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def set_workers(self, job_id: str, workers: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET workers = ?, updated_at = ? WHERE id = ?", (workers, now(), job_id))

    def count_resume(self, job_id: str) -> int:
        """One more resume of a job found running at start; returns the count."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET resumes = resumes + 1, updated_at = ? WHERE id = ?", (now(), job_id))
            return db.execute("SELECT resumes FROM jobs WHERE id = ?", (job_id,)).fetchone()["resumes"]

    def set_checkpoint(self, job_id: str, step: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET checkpoint_step = ?, updated_at = ? WHERE id = ?", (step, now(), job_id))

    # ------------------------------------------------------------ metrics

    def record_metric(self, job_id: str, record: dict) -> None:
        """Upsert one step's record (a replayed step is reported again)."""
        step = int(record["step"])
        phases = record.get("phases")
        at = now()
        with self._tx() as db:
            db.execute(
                "INSERT INTO metrics (job, step, loss, val_loss, val_accuracy, samples_per_s, workers, lr, phases, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job, step) DO UPDATE SET loss=excluded.loss, "
                "val_loss=excluded.val_loss, val_accuracy=excluded.val_accuracy, "
                "samples_per_s=excluded.samples_per_s, workers=excluded.workers, lr=excluded.lr, "
                "phases=excluded.phases, at=excluded.at",
                (job_id, step, _finite(record.get("loss")), _finite(record.get("val_loss")),
                 _finite(record.get("val_accuracy")), _finite(record.get("samples_per_s")),
                 record.get("workers"), _finite(record.get("lr")),
                 json.dumps(phases) if phases is not None else None, at))
            db.execute("UPDATE jobs SET step = MAX(step, ?), updated_at = ? WHERE id = ?", (step, at, job_id))

    @staticmethod
    def _metric(row: sqlite3.Row) -> dict:
        return {"step": row["step"], "loss": row["loss"], "val_loss": row["val_loss"],
                "val_accuracy": row["val_accuracy"], "samples_per_s": row["samples_per_s"],
                "workers": row["workers"], "lr": row["lr"],
                "phases": json.loads(row["phases"]) if row["phases"] else None, "at": row["at"]}

    def metrics(self, job_id: str, since: int = 0) -> list[dict]:
        with self._lock:
            if self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                raise NotFound(f"no job with id {job_id!r}")
            rows = self._db.execute("SELECT * FROM metrics WHERE job = ? AND step > ? ORDER BY step",
                                    (job_id, since))
            return [self._metric(r) for r in rows]

    def snapshot(self) -> tuple:
        """Everything stored, for tests that check nothing changed."""
        with self._lock:
            return tuple(tuple(tuple(r) for r in self._db.execute(f"SELECT * FROM {t} ORDER BY 1, 2"))
                         for t in ("jobs", "transitions", "metrics"))


class _Tx:
    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException as err:
            self.store._lock.release()
            self._raise_unavailable(err)
            raise
        return self.store._db

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                try:
                    self.store._db.execute("COMMIT")
                except sqlite3.Error as err:
                    exc = err
            if exc is not None and self.store._db.in_transaction:
                try:
                    self.store._db.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite has rolled back already (a full disk does that)
                    pass
        finally:
            self.store._lock.release()
        if exc is not None:
            self._raise_unavailable(exc)
            if exc_type is None:
                raise exc
        return False

    def _raise_unavailable(self, err: BaseException) -> None:
        if isinstance(err, sqlite3.Error):
            replacement = unavailable(err, self.store.path)
            if replacement is not None:
                raise replacement from err
