"""The job store's SQLite connections: one writer behind a lock, and a pool
of read-only readers, so that a read never waits behind a write.

Statements can also be deferred: they are run first by the next write
transaction, and dropped once it commits; until then they stay queued, in
order. The store uses that for per-step metrics, so that a locked file does
not stop training.

In WAL mode a reader sees the last committed snapshot while a writer (ours,
or another process's) holds the write lock, so `GET /healthz` and job lists
answer while a write is stuck. Every wait is short and bounded: a store
still busy after it raises `StoreBusy` (the API answers 503 with
`Retry-After`), never a 30-second hang. A disk that refuses a write (full, or
failing) raises `StoreUnavailable`; nothing was written.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("shardprop.store")
READ_WAIT_S = 2.0  # a reader's busy timeout
WRITE_WAIT_S = 2.0  # a writer's, for our own lock and SQLite's
IDLE_READERS = 8  # readers kept open between reads; more are opened when needed
SQLITE_BUSY, SQLITE_LOCKED = 5, 6


class StoreError(Exception):
    pass


class NotFound(StoreError):
    pass


class IllegalTransition(StoreError):
    pass


class IdempotencyConflict(StoreError):
    pass


def now() -> str:
    """The time stored with every row: UTC, ISO 8601, to the microsecond."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class StoreUnavailable(StoreError):
    """The store's disk refused a write (full, or an I/O error); nothing was
    written, and the same call may succeed later."""

    def __init__(self, message: str, disk_full: bool):
        super().__init__(message)
        self.disk_full = disk_full


class StoreBusy(StoreUnavailable):
    """The store is locked (by another process, or a stuck write) beyond the
    wait allowed; nothing was written, and the same call may succeed later."""

    retry_after_s = 2

    def __init__(self, message: str):
        super().__init__(message, disk_full=False)


DISK_ERRORS = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_READONLY"}


def unavailable(err: sqlite3.Error, path: Path) -> StoreUnavailable | None:
    """The StoreUnavailable a disk error stands for, None for other errors."""
    name = getattr(err, "sqlite_errorname", "") or ""
    if not any(name == kind or name.startswith(kind + "_") for kind in DISK_ERRORS):
        return None
    full = name == "SQLITE_FULL"
    return StoreUnavailable(f"the job store {path} cannot be written: "
                            f"{'no space left on device' if full else err}", disk_full=full)


@contextmanager
def sqlite_errors(path: Path, writing: bool):
    """SQLite's "database is locked" / "busy" as StoreBusy and, on a write, a
    disk's refusal as StoreUnavailable; other errors unchanged."""
    try:
        yield
    except sqlite3.Error as err:
        code = getattr(err, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED):
            raise StoreBusy(f"the job store is busy ({err}); try again in a moment") from None
        replacement = unavailable(err, path) if writing else None
        if replacement is not None:
            raise replacement from err
        raise


def create_private(path: Path) -> None:
    """The store's folder 0700 (when this creates it; an existing one is
    left as it is) and its file 0600, before SQLite opens it: SQLite gives
    the -wal and -shm files the mode of the database file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for existing in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if existing.exists():  # made by an earlier version, world-readable
            os.chmod(existing, 0o600)


class Connections:
    """The writer (behind `_write_lock`), the idle readers, and the deferred statements."""

    def __init__(self, path: Path, schema: str):
        self.path = path
        create_private(path)
        self._write_lock = threading.Lock()
        self.writer = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                      timeout=WRITE_WAIT_S)
        self.writer.row_factory = sqlite3.Row
        self._writer_wait_s = WRITE_WAIT_S  # its busy timeout now
        with self._write_lock, sqlite_errors(path, writing=True):
            self.writer.execute("PRAGMA journal_mode=WAL")
            self.writer.execute(f"PRAGMA busy_timeout={int(WRITE_WAIT_S * 1000)}")
            self.writer.execute("PRAGMA synchronous=NORMAL")
            self.writer.execute("PRAGMA foreign_keys=ON")
            self.writer.executescript(schema)
        self._uri = path.resolve().as_uri() + "?mode=ro"
        self._idle: list[sqlite3.Connection] = []
        self._idle_lock = threading.Lock()
        self._closed = False
        self._deferred: list[tuple[str, tuple]] = []  # appended by anyone, consumed under the write lock

    def close(self) -> None:
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()
        with self._write_lock:
            self.writer.close()

    def defer(self, sql: str, params: tuple) -> None:
        """Queue a statement for the next write transaction (see `write`)."""
        self._deferred.append((sql, params))

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    @contextmanager
    def write(self, wait_s: float = WRITE_WAIT_S):
        """One write transaction (BEGIN IMMEDIATE, the deferred statements, the
        body's, COMMIT), waiting at most `wait_s` for this service's other
        writes and as long for SQLite's lock."""
        if not self._write_lock.acquire(timeout=wait_s):
            raise StoreBusy(f"the job store is busy (a write has waited {wait_s:g} s); try again in a moment")
        try:
            with sqlite_errors(self.path, writing=True):
                db = self.writer
                if wait_s != self._writer_wait_s:
                    db.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
                    self._writer_wait_s = wait_s
                db.execute("BEGIN IMMEDIATE")
                try:
                    pending = self._deferred[:]
                    for statement in pending:
                        try:
                            db.execute(*statement)
                        except sqlite3.IntegrityError as err:  # its job is gone: it can never be written
                            log.error("dropped a deferred write (%s): %s", err, statement[0][:60])
                    yield db
                    db.execute("COMMIT")
                    del self._deferred[:len(pending)]  # only appends happen meanwhile
                finally:
                    if db.in_transaction:  # the body or COMMIT failed: nothing half-written stays
                        try:
                            db.execute("ROLLBACK")
                        except sqlite3.Error:  # SQLite has rolled back already (a full disk does that)
                            pass
        finally:
            self._write_lock.release()

    @contextmanager
    def read(self):
        """One read transaction (one snapshot) on a read-only connection of the pool."""
        db = self._borrow()
        healthy = False
        try:
            with sqlite_errors(self.path, writing=False):
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
                    healthy = True
        finally:
            self._give_back(db, healthy)

    def _borrow(self) -> sqlite3.Connection:
        with self._idle_lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the store is closed")
            if self._idle:
                return self._idle.pop()
        with sqlite_errors(self.path, writing=False):
            db = sqlite3.connect(self._uri, uri=True, check_same_thread=False, isolation_level=None,
                                 timeout=READ_WAIT_S)
        db.row_factory = sqlite3.Row
        return db

    def _give_back(self, db: sqlite3.Connection, healthy: bool) -> None:
        with self._idle_lock:
            if healthy and not self._closed and len(self._idle) < IDLE_READERS:
                self._idle.append(db)
                return
        db.close()
