"""What a sweep does next, decided from what its jobs recorded.

A pure function of the sweep and its results — no clock, no order of
arrival — so a service that restarts, or runs on another cluster, makes the
same decisions. Successive halving is synchronous: rung k+1 is chosen only
once every job of rung k has ended, as the best max(1, n_k // eta) trials of
rung k (ties by trial index), and a promotion continues the trial from its
rung-k checkpoint. Grid and random sweeps have one rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from core.sweep.spec import SweepSpec, rung_sizes

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATES = ("queued", "running", *sorted(TERMINAL))


@dataclass(frozen=True)
class RungResult:
    """One job of a sweep as recorded: a rung of a trial."""

    trial: int
    rung: int
    state: str  # the job's state (service.states)
    objective: float | None = None  # the objective metric at the rung's stop; None if not (yet) there
    steps: int = 0  # steps this job made


@dataclass(frozen=True)
class Launch:
    """A job to start: rung `rung` of trial `trial` (its spec: SweepSpec.trial_spec)."""

    trial: int
    rung: int

    @property
    def continues(self) -> bool:
        """A promotion: resume from the checkpoint of the trial's previous rung."""
        return self.rung > 0


@dataclass(frozen=True)
class Decision:
    launch: tuple[Launch, ...]  # to start now, in this order, within max_concurrent_trials
    finished: bool  # every job has ended and there is nothing left to start
    promoted: tuple[tuple[int, int], ...]  # (trial, rung) of every promotion decided so far, in order


@dataclass(frozen=True)
class LeaderboardRow:
    rank: int  # 1 for the best
    trial: int
    values: dict[str, Any]
    rung: int | None  # highest rung with an objective (None: none yet)
    objective: float | None  # at that rung
    state: str  # of the trial's latest job
    steps: int  # made by all its jobs


def decide(sweep: SweepSpec, results: Iterable[RungResult]) -> Decision:
    """The jobs to start next, whether the sweep is over, and its promotions."""
    table = _table(sweep, results)
    planned, promoted, complete = _plan(sweep, table)
    active = sum(1 for r in table.values() if r.state not in TERMINAL)
    slots = max(0, sweep.max_concurrent_trials - active)
    launch = tuple(Launch(t, k) for t, k in planned if (t, k) not in table)[:slots]
    finished = complete and active == 0 and all(job in table for job in planned)
    return Decision(launch, finished, tuple(promoted))


def _plan(sweep: SweepSpec, table: dict) -> tuple[list, list, bool]:
    """Every job the sweep has decided to run, in launch order; the promotions;
    and whether no further rung can be decided (the plan is complete)."""
    planned = [(t, 0) for t in range(sweep.n_trials)]
    promoted: list[tuple[int, int]] = []
    rung_trials = list(range(sweep.n_trials))
    for rung, size in enumerate(rung_sizes(sweep)[1:], start=1):
        below = [table.get((t, rung - 1)) for t in rung_trials]
        if any(r is None or r.state not in TERMINAL for r in below):
            return planned, promoted, False
        ranked = sorted((r for r in below if r.state == "succeeded" and _finite(r.objective)),
                        key=lambda r: (sweep.objective.better_first(r.objective), r.trial))
        rung_trials = [r.trial for r in ranked[:size]]
        promoted += [(t, rung) for t in rung_trials]
        planned += [(t, rung) for t in rung_trials]
    return planned, promoted, True


def leaderboard(sweep: SweepSpec, results: Iterable[RungResult]) -> list[LeaderboardRow]:
    """Every trial with a job, best first: by the highest rung it reached with
    an objective, then the objective, then the trial index; trials without
    an objective last."""
    table = _table(sweep, results)
    trials: dict[int, list[RungResult]] = {}
    for (trial, _), r in sorted(table.items()):
        trials.setdefault(trial, []).append(r)
    rows = []
    for trial, jobs in trials.items():
        scored = [r for r in jobs if r.state == "succeeded" and _finite(r.objective)]
        top = scored[-1] if scored else None
        rows.append((trial, jobs, top))

    def order(row):
        trial, _, top = row
        if top is None:
            return (1, 0, 0.0, trial)
        return (0, -top.rung, sweep.objective.better_first(top.objective), trial)

    return [LeaderboardRow(rank, trial, sweep.values(trial), top.rung if top else None,
                           top.objective if top else None, jobs[-1].state, sum(r.steps for r in jobs))
            for rank, (trial, jobs, top) in enumerate(sorted(rows, key=order), start=1)]


def best_trial(sweep: SweepSpec, results: Iterable[RungResult]) -> LeaderboardRow | None:
    """The leaderboard's first row, if it has an objective."""
    rows = leaderboard(sweep, results)
    return rows[0] if rows and rows[0].objective is not None else None


def sweep_state(sweep: SweepSpec, results: Iterable[RungResult]) -> str:
    """queued (no job started yet), running, or once finished succeeded (a
    best trial exists) or failed (no trial reached an objective). A cancelled
    sweep is the service's to record."""
    results = list(results)
    decision = decide(sweep, results)
    if decision.finished:
        return "succeeded" if best_trial(sweep, results) is not None else "failed"
    if all(r.state == "queued" for r in results):
        return "queued"
    return "running"


def _table(sweep: SweepSpec, results: Iterable[RungResult]) -> dict[tuple[int, int], RungResult]:
    table: dict[tuple[int, int], RungResult] = {}
    for r in results:
        if not 0 <= r.trial < sweep.n_trials or not 0 <= r.rung < len(sweep.rungs):
            raise ValueError(f"result for trial {r.trial} rung {r.rung} is outside the sweep "
                             f"({sweep.n_trials} trials, {len(sweep.rungs)} rungs)")
        if r.state not in STATES:
            raise ValueError(f"result for trial {r.trial} rung {r.rung}: unknown state {r.state!r}")
        if (r.trial, r.rung) in table:
            raise ValueError(f"two results for trial {r.trial} rung {r.rung}")
        table[(r.trial, r.rung)] = r
    return table


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
