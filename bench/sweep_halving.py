"""Successive halving against a full grid, on the digits set.

The same space for both — 4 learning rates x 4 hidden widths, 16 trials —
run in this process on the reference trainer (core.sweep.local: the
service's decisions, no cluster). Halving uses reduction factor 3 and three
rungs (steps/9, steps/3, steps), each promotion continuing its trial's
checkpoint. Reports each method's best validation accuracy and total
training steps; the targets are halving within 1 point of the grid's best
with at most 40% of its steps. Also checks that halving's best trial ends
with the bits the grid's run of that trial has (continuation loses nothing).

    .venv/bin/python bench/sweep_halving.py [--steps 270]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.sweep import parse_sweep  # noqa: E402
from core.sweep.local import LocalSweep, run_local  # noqa: E402

LEARNING_RATES = [0.003, 0.01, 0.03, 0.1]
WIDTHS = [[16], [32], [64], [128]]


def sweep_document(method: str, steps: int) -> dict:
    doc = {
        "name": f"bench-{method}", "seed": 0, "method": method,
        "objective": {"metric": "val_accuracy", "mode": "max"},
        "space": {"training.optimizer.lr": {"grid": LEARNING_RATES}, "model.hidden": {"grid": WIDTHS}},
        "base": {"seed": 0, "data": {"source": "digits", "shards": 4, "validation_split": 0.2},
                 "training": {"steps": steps, "batch_size": 128, "eval_every": 0, "checkpoint_every": 0,
                              "optimizer": {"name": "sgd", "momentum": 0.9}},
                 "resources": {"workers": 1}},
    }
    if method == "halving":
        doc["halving"] = {"reduction_factor": 3}
    return doc


def run(method: str, steps: int) -> tuple[LocalSweep, float]:
    sweep = parse_sweep(sweep_document(method, steps))
    began = time.perf_counter()
    return run_local(sweep), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=270, help="steps of a full trial (the last rung)")
    args = parser.parse_args()
    run("grid", 1)  # imports and first data load, outside the timings
    (halving, halving_s), (grid, grid_s) = run("halving", args.steps), run("grid", args.steps)
    print(f"{'method':8} {'jobs':>5} {'steps':>6} {'of grid':>8} {'best trial':>10} {'val acc':>8} {'seconds':>8}")
    for name, result, seconds in (("grid", grid, grid_s), ("halving", halving, halving_s)):
        best = result.leaderboard[0]
        print(f"{name:8} {len(result.results):5d} {result.steps:6d} {result.steps / grid.steps:8.1%} "
              f"{best.trial:10d} {best.objective:8.4f} {seconds:8.1f}")
    best = halving.leaderboard[0]
    print(f"halving's best: trial {best.trial} {best.values}; grid's best: trial {grid.leaderboard[0].trial} "
          f"{grid.leaderboard[0].values}")
    gap = 100 * (grid.leaderboard[0].objective - best.objective)
    print(f"gap to the grid's best: {gap:.2f} points (target <= 1); steps: {halving.steps / grid.steps:.1%} "
          "of the grid's (target <= 40%)")
    same = np.array_equal(halving.params[best.trial], grid.params[best.trial])
    print(f"halving's best trial bit-identical to the grid's run of it: {same}")


if __name__ == "__main__":
    main()
