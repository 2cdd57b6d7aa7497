"""A whole sweep in this process, on the reference trainer.

The same decisions as the service makes (core.sweep.decide), with each
rung a `train_from` call that continues the trial's previous rung: what a
benchmark or a test needs to see halving's results without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from core.sweep.decide import Decision, LeaderboardRow, RungResult, decide, leaderboard
from core.sweep.spec import SweepSpec
from core.trainer import TrainingError, TrainState, train_from


@dataclass
class LocalSweep:
    decision: Decision  # the last one: finished, with every promotion
    results: dict[tuple[int, int], RungResult]
    leaderboard: list[LeaderboardRow]
    params: dict[int, np.ndarray] = field(default_factory=dict)  # each trial's parameters at its last rung

    @property
    def steps(self) -> int:
        """Training steps made by every job of the sweep."""
        return sum(r.steps for r in self.results.values())


def run_local(sweep: SweepSpec, *, threads: int | None = None,
              on_result: Callable[[RungResult], None] | None = None) -> LocalSweep:
    """Run `sweep` to the end, one job at a time, in the order decide gives."""
    results: dict[tuple[int, int], RungResult] = {}
    states: dict[int, TrainState] = {}
    while True:
        decision = decide(sweep, results.values())
        if decision.finished:
            break
        for launch in decision.launch:
            spec = sweep.trial_spec(launch.trial, launch.rung)
            start = states.get(launch.trial) if launch.continues else None
            made: list[dict] = []  # the steps a failed job made count too
            try:
                _, history, states[launch.trial] = train_from(spec, start, threads=threads, on_step=made.append)
                objective = history[-1][sweep.objective.metric] if history else None
                result = RungResult(launch.trial, launch.rung, "succeeded", objective, len(history))
            except TrainingError:
                result = RungResult(launch.trial, launch.rung, "failed", None, len(made))
            results[(launch.trial, launch.rung)] = result
            if on_result is not None:
                on_result(result)
    params = {trial: state.params for trial, state in states.items()}
    return LocalSweep(decision, results, leaderboard(sweep, results.values()), params)
