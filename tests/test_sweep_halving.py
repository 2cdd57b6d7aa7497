"""Successive halving on real training results: the issue's digits space
(4 learning rates x 4 widths, reduction factor 3, three rungs) on the
reference trainer, against the full grid over the same space. Fewer steps
than bench/sweep_halving.py (90 per full trial, not 270) to stay quick."""

from __future__ import annotations

import numpy as np
import pytest

from core.sweep import parse_sweep
from core.sweep.local import run_local

pytestmark = [pytest.mark.slow]


def digits_sweep(method: str) -> dict:
    doc = {"seed": 0, "method": method, "objective": {"metric": "val_accuracy", "mode": "max"},
           "space": {"training.optimizer.lr": {"grid": [0.003, 0.01, 0.03, 0.1]},
                     "model.hidden": {"grid": [[16], [32], [64], [128]]}},
           "base": {"data": {"source": "digits", "shards": 4},
                    "training": {"steps": 90, "batch_size": 128, "eval_every": 0, "checkpoint_every": 0,
                                 "optimizer": {"name": "sgd", "momentum": 0.9}},
                    "resources": {"workers": 1}}}
    if method == "halving":
        doc["halving"] = {"reduction_factor": 3}
    return doc


def test_halving_finds_the_grids_best_within_a_point_with_at_most_40_percent_of_its_steps():
    halving, grid = (run_local(parse_sweep(digits_sweep(method))) for method in ("halving", "grid"))
    assert grid.steps == 16 * 90
    assert halving.steps == 16 * 10 + 5 * (30 - 10) + 1 * (90 - 30)  # promotions continue: no step made twice
    assert halving.steps <= 0.4 * grid.steps
    best, grid_best = halving.leaderboard[0], grid.leaderboard[0]
    assert best.rung == 2 and best.objective >= grid_best.objective - 0.01
    # the promoted trial, continued twice, ends with the bits of the grid's uninterrupted run of it
    assert np.array_equal(halving.params[best.trial], grid.params[best.trial])
    assert best.objective == next(r.objective for r in grid.leaderboard if r.trial == best.trial)
    # on these real results, rung 1 holds the 16 // 3 = 5 best rung-0 accuracies (ties by trial index)
    rung0 = sorted((r for r in halving.results.values() if r.rung == 0), key=lambda r: (-r.objective, r.trial))
    assert [t for t, rung in halving.decision.promoted if rung == 1] == [r.trial for r in rung0[:5]]
