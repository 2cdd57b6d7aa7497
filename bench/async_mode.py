"""Async against sync when one worker is slow.

Two workers on digits (4 shards, global batch 128); worker 1 is slowed on
purpose with a `delay_s` fault (workers.faults, passed as the coordinator's
`start_worker`). Sync waits for the straggler every step; async applies the fast
worker's shard gradients as they come. Reports applied updates per second
and samples per second for both, median of several rounds, alternating.

    .venv/bin/python bench/async_mode.py [--delay 0.05] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.spec import parse_spec  # noqa: E402
from workers.coordinator import Coordinator  # noqa: E402
from workers.faults import FaultPlan, Faults  # noqa: E402
from workers.runtime import connect_ray  # noqa: E402


def spec(mode: str, steps: int):
    return parse_spec({
        "name": f"bench-{mode}", "seed": 0, "data": {"source": "digits", "shards": 4}, "model": {"hidden": [64]},
        "training": {"mode": mode, "batch_size": 128, "steps": steps, "eval_every": 0,
                     "checkpoint_every": 0, "max_staleness": 4, "optimizer": {"name": "sgd", "lr": 0.05}},
        "resources": {"workers": 2},
    })


def measure(mode: str, steps: int, delay: float) -> dict:
    stamps, samples = [], []

    def on_step(r):
        stamps.append(time.perf_counter())
        samples.append(r["samples"])

    with tempfile.TemporaryDirectory() as tmp:
        Coordinator(spec(mode, steps), tmp, on_step=on_step, start_worker=FaultPlan({1: Faults(delay_s=delay)})).run()
    skip = len(stamps) // 5  # warm-up
    seconds = stamps[-1] - stamps[skip]
    return {"updates_per_s": (len(stamps) - 1 - skip) / seconds, "samples_per_s": sum(samples[skip + 1:]) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds added to every call of worker 1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    connect_ray(None, 2)
    runs = {"sync": [], "async": []}
    for _ in range(args.rounds):
        runs["sync"].append(measure("sync", 40, args.delay))
        runs["async"].append(measure("async", 160, args.delay))
    print(f"worker 1 slowed by {args.delay * 1e3:.0f} ms per call; medians of {args.rounds} rounds")
    for mode, rows in runs.items():
        u = statistics.median(r["updates_per_s"] for r in rows)
        s = statistics.median(r["samples_per_s"] for r in rows)
        print(f"  {mode:5s}  {u:8.1f} updates/s  {s:9.0f} samples/s")
    ratio = statistics.median(a["updates_per_s"] / s["updates_per_s"] for a, s in zip(runs["async"], runs["sync"]))
    print(f"  async / sync updates per second: x{ratio:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
