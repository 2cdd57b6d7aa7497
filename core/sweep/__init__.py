"""Sweeps: searches over job specs whose trials, promotions and leaderboard
are the same, bit for bit, whatever the cluster, failures or restarts.

space: the dimensions and how values are drawn; spec: the sweep document;
decide: what to run next and how trials rank.
"""

from core.sweep.decide import (Decision, Launch, LeaderboardRow, RungResult, best_trial, decide, leaderboard,
                               sweep_state)
from core.sweep.space import Dimension, SweepError, grid_points
from core.sweep.spec import METRICS, METHODS, Objective, SweepSpec, load_sweep, parse_sweep, rung_sizes

__all__ = ["Decision", "Dimension", "Launch", "LeaderboardRow", "METHODS", "METRICS", "Objective", "RungResult",
           "SweepError", "SweepSpec", "best_trial", "decide", "grid_points", "leaderboard", "load_sweep",
           "parse_sweep", "rung_sizes", "sweep_state"]
