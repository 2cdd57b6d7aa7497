"""A sweep as the service takes it and shows it.

`create_sweep` validates a sweep document at the edge (core.sweep parses
it, every trial's job spec included; admission holds every trial against
the service's limits) and stores it with its trials' values, or refuses it
with nothing stored. `sweep_view` is what the API answers for a sweep: its
state, its trials by state, its leaderboard (each trial: values, objective,
state, steps run, its jobs in rung order; a trial not launched yet is
queued, after the others), its best trial and the
promotions decided so far, all computed by core.sweep from the store's
runs, so they read the same before and after a restart.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache

from core.sweep import RungResult, SweepSpec, decide, leaderboard, parse_sweep
from service.admission import Refused, admit
from service.settings import Settings
from service.states import STATES
from service.store import Store


def create_sweep(settings: Settings, store: Store, raw, idempotency_key: str | None) -> tuple[dict, bool]:
    """Store a sweep; (view, created). SweepError / Refused name what is wrong."""
    sweep = parse_sweep(raw)
    for trial in range(sweep.n_trials):
        spec = sweep.trial_spec(trial, len(sweep.rungs) - 1)
        try:
            admit(spec, settings)
        except Refused as err:
            raise Refused(f"trial {trial} ({_values_text(sweep.values(trial))}): {err}") from None
    body_hash = hashlib.sha256(sweep.to_json().encode()).hexdigest() if idempotency_key else None
    stored, created = store.create_sweep(sweep.document(), [sweep.values(t) for t in range(sweep.n_trials)],
                                         idempotency_key=idempotency_key, body_hash=body_hash)
    return sweep_view(store, stored["id"], sweep), created


@lru_cache(maxsize=64)
def _parse(document_json: str) -> SweepSpec:
    return parse_sweep(json.loads(document_json))


def stored_sweep(document: dict) -> SweepSpec:
    """A stored document parsed again (validating up to every trial's spec:
    the last 64 are kept, so a polled sweep is not parsed at every poll)."""
    return _parse(json.dumps(document, sort_keys=True))


def _values_text(values: dict) -> str:
    return ", ".join(f"{path}={value!r}" for path, value in values.items())


def rung_results(sweep: SweepSpec, runs: list[dict]) -> list[RungResult]:
    """The store's runs as core.sweep reads them; a run's steps are those it
    trained itself (a promotion starts where the rung before it stopped)."""
    starts = (0, *sweep.rungs)
    return [RungResult(r["trial"], r["rung"], r["state"], r["objective_value"],
                       max(0, r["step"] - starts[r["rung"]]) if r["step"] else 0) for r in runs]


def sweep_view(store: Store, sweep_id: str, sweep: SweepSpec | None = None) -> dict:
    """The sweep as the API shows it (NotFound if there is none)."""
    stored = store.get_sweep(sweep_id, details=True)
    sweep = sweep or stored_sweep(stored["document"])
    runs = store.sweep_runs(sweep_id, sweep.objective.metric)
    results = rung_results(sweep, runs)
    jobs: dict[int, dict[int, str]] = {}
    for r in runs:
        jobs.setdefault(r["trial"], {})[r["rung"]] = r["job_id"]
    board = []
    for row in leaderboard(sweep, results):
        trial_jobs = jobs.get(row.trial, {})
        board.append({"rank": row.rank, "trial": row.trial, "values": row.values, "objective": row.objective,
                      "state": row.state, "steps_run": row.steps, "rung": row.rung,
                      "jobs": [trial_jobs[k] for k in sorted(trial_jobs)],
                      "job_id": trial_jobs.get(row.rung)})
    for trial in sorted(set(range(sweep.n_trials)) - set(jobs)):  # not launched yet: waiting
        board.append({"rank": len(board) + 1, "trial": trial, "values": sweep.values(trial), "objective": None,
                      "state": "queued", "steps_run": 0, "rung": None, "jobs": [], "job_id": None})
    best = board[0] if board and board[0]["objective"] is not None else None
    view = {k: stored[k] for k in ("id", "name", "state", "error", "created_at", "updated_at")}
    view.update({
        "method": sweep.method, "objective": {"metric": sweep.objective.metric, "mode": sweep.objective.mode},
        "reproducible": sweep.reproducible, "trials": sweep.n_trials, "rungs": list(sweep.rungs),
        "max_concurrent_trials": sweep.max_concurrent_trials,
        "trial_states": trial_states([row["state"] for row in board]),
        "best": None if best is None else {k: best[k] for k in ("trial", "values", "objective", "rung", "job_id")},
        "promotions": [list(p) for p in decide(sweep, results).promoted],
        "leaderboard": board, "document": stored["document"]})
    return view


def trial_states(states: list[str]) -> dict[str, int]:
    """How many trials are in each state, given each trial's (its latest job's)."""
    counts = Counter(states)
    return {state: counts.get(state, 0) for state in STATES}
