"""The job store's sweeps: a sweep's document and state, its trials (the
values each was given, fixed once at submit) and its runs (one job per trial
and rung).

Everything a sweep has decided is here, so a service killed mid-sweep picks
it up where it was: the trials are read back, not sampled again, and a run
is created with its job in one transaction, keyed by (sweep, trial, rung),
so a restarted runner that asks for the same run gets the same job, never a
second one. A mixin of `service.store.Store` (its `_tx`, `_read`, `_job`).
"""

from __future__ import annotations

import json
import sqlite3
import uuid

from service.states import LEGAL, STATES
from service.store_db import IdempotencyConflict, IllegalTransition, NotFound, now

SWEEP_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep TEXT NOT NULL REFERENCES sweeps(id),
    trial INTEGER NOT NULL,
    trial_values TEXT NOT NULL,
    PRIMARY KEY (sweep, trial)
);
CREATE TABLE IF NOT EXISTS sweep_runs (
    sweep TEXT NOT NULL,
    trial INTEGER NOT NULL,
    rung INTEGER NOT NULL,
    job TEXT NOT NULL UNIQUE REFERENCES jobs(id),
    PRIMARY KEY (sweep, trial, rung),
    FOREIGN KEY (sweep, trial) REFERENCES sweep_trials(sweep, trial)
);
"""
SWEEP_FIELDS = ("id", "name", "state", "error", "created_at", "updated_at")
SWEEP_TABLES = ("sweeps", "sweep_trials", "sweep_runs")


class SweepTables:
    """The sweep methods of the Store (see the module's docstring)."""

    # ------------------------------------------------------------ sweeps

    def create_sweep(self, document: dict, trials: list[dict], *, idempotency_key: str | None = None,
                     body_hash: str | None = None) -> tuple[dict, bool]:
        """Store a new queued sweep and its trials' values (trial i is
        `trials[i]`); returns (sweep, created). With a key already used: the
        same body gives the existing sweep, another raises."""
        sweep_id = "s" + uuid.uuid4().hex[:11]
        at = now()
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM sweeps WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_hash"] != body_hash:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was already used with a different body "
                            f"(sweep {row['id']})")
                    return _sweep(row), False
            db.execute("INSERT INTO sweeps (id, name, document, state, created_at, updated_at, idempotency_key, "
                       "body_hash) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                       (sweep_id, document.get("name", "sweep"), json.dumps(document, sort_keys=True), at, at,
                        idempotency_key, body_hash))
            db.executemany("INSERT INTO sweep_trials (sweep, trial, trial_values) VALUES (?, ?, ?)",
                           [(sweep_id, i, json.dumps(v, sort_keys=True)) for i, v in enumerate(trials)])
            return _sweep(db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()), True

    def get_sweep(self, sweep_id: str, *, details: bool = False) -> dict:
        """The sweep; with `details` its document, trials' values and runs too."""
        with self._read() as db:
            row = db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if row is None:
                raise NotFound(f"no sweep with id {sweep_id!r}")
            sweep = _sweep(row)
            if details:
                sweep["document"] = json.loads(row["document"])
                sweep["trials"] = [json.loads(r[0]) for r in db.execute(
                    "SELECT trial_values FROM sweep_trials WHERE sweep = ? ORDER BY trial", (sweep_id,))]
                sweep["runs"] = _runs(db, sweep_id)
            return sweep

    def list_sweeps(self, state: str | None = None, limit: int = 1000) -> list[dict]:
        """Newest first; each with its count of trials."""
        where, params = ("WHERE state = ?", (state,)) if state is not None else ("", ())
        with self._read() as db:
            rows = db.execute(f"SELECT *, (SELECT COUNT(*) FROM sweep_trials WHERE sweep = sweeps.id) AS n_trials "
                              f"FROM sweeps {where} ORDER BY seq DESC LIMIT ?", (*params, limit))
            return [{**_sweep(r), "trials": r["n_trials"]} for r in rows]

    def active_sweeps(self) -> list[str]:
        """The ids of the sweeps not ended yet, oldest first."""
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT id FROM sweeps WHERE state IN ('queued', 'running') "
                                             "ORDER BY seq")]

    def sweep_transition(self, sweep_id: str, to: str, error: str | None = None) -> dict:
        """Move a sweep to `to` (the job states' LEGAL moves)."""
        if to not in STATES:
            raise IllegalTransition(f"unknown state {to!r}")
        with self._tx() as db:
            row = db.execute("SELECT state FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if row is None:
                raise NotFound(f"no sweep with id {sweep_id!r}")
            if to not in LEGAL[row["state"]]:
                raise IllegalTransition(f"sweep {sweep_id} is {row['state']}; it cannot become {to}")
            db.execute("UPDATE sweeps SET state = ?, updated_at = ?, error = COALESCE(?, error) WHERE id = ?",
                       (to, now(), error, sweep_id))
            return _sweep(db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone())

    # ------------------------------------------------------------ runs

    def create_run(self, sweep_id: str, trial: int, rung: int, spec: dict,
                   provenance: dict | None = None) -> tuple[dict, bool]:
        """The job of one trial's rung: stored queued, with its link to the
        sweep, in one transaction; (job, created). Asked again for the same
        (sweep, trial, rung), the job made the first time. A sweep that has
        ended (a cancel came first) gets no new job: IllegalTransition."""
        with self._tx() as db:
            row = db.execute("SELECT job FROM sweep_runs WHERE sweep = ? AND trial = ? AND rung = ?",
                             (sweep_id, trial, rung)).fetchone()
            if row is not None:
                return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone()), False
            state = db.execute("SELECT state FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            if state is None:
                raise NotFound(f"no sweep with id {sweep_id!r}")
            if state[0] not in ("queued", "running"):
                raise IllegalTransition(f"sweep {sweep_id} is {state[0]}; it starts no more trial jobs")
            job_id = self._insert_job(db, spec, provenance=provenance, sweep=sweep_id)
            db.execute("INSERT INTO sweep_runs (sweep, trial, rung, job) VALUES (?, ?, ?, ?)",
                       (sweep_id, trial, rung, job_id))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def run_parent(self, job_id: str) -> tuple[str, int] | None:
        """For a trial job above the first rung: the job of the same trial's
        rung before it, and that rung's index; None for any other job."""
        with self._read() as db:
            row = db.execute("SELECT p.job, p.rung FROM sweep_runs r JOIN sweep_runs p ON p.sweep = r.sweep AND "
                             "p.trial = r.trial AND p.rung = r.rung - 1 WHERE r.job = ?", (job_id,)).fetchone()
            return None if row is None else (row[0], row[1])

    def unfinished_jobs_of_ended_sweeps(self) -> list[str]:
        """Queued or running jobs of sweeps that ended (cancelled while the
        service stopped before it could cancel them all), oldest first."""
        with self._read() as db:
            return [r[0] for r in db.execute(
                "SELECT j.id FROM jobs j JOIN sweeps s ON s.id = j.sweep WHERE j.sweep IS NOT NULL AND "
                "j.state IN ('queued', 'running') AND s.state NOT IN ('queued', 'running') ORDER BY j.seq")]

    def sweep_runs(self, sweep_id: str, objective: str | None = None) -> list[dict]:
        """Every run of the sweep in (trial, rung) order: its job's id, state,
        step and steps, and with `objective` (a step record's field) the last
        value of it the job recorded (`objective_value`, null if none)."""
        with self._read() as db:
            return _runs(db, sweep_id, objective)


def _sweep(row: sqlite3.Row) -> dict:
    return {k: row[k] for k in SWEEP_FIELDS}


def _runs(db: sqlite3.Connection, sweep_id: str, objective: str | None = None) -> list[dict]:
    value = ("(SELECT json_extract(record, '$.' || ?2) FROM metrics WHERE job = r.job AND "
             "json_extract(record, '$.' || ?2) IS NOT NULL ORDER BY step DESC LIMIT 1)")
    rows = db.execute(f"SELECT r.trial, r.rung, r.job, j.state, j.step, j.steps, j.error, "
                      f"{value if objective else 'NULL'} AS objective_value FROM sweep_runs r "
                      f"JOIN jobs j ON j.id = r.job WHERE r.sweep = ?1 ORDER BY r.trial, r.rung",
                      (sweep_id, objective) if objective else (sweep_id,))
    return [{"trial": r["trial"], "rung": r["rung"], "job_id": r["job"], "state": r["state"], "step": r["step"],
             "steps": r["steps"], "error": r["error"], "objective_value": r["objective_value"]} for r in rows]
