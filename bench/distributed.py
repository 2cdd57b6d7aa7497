"""Distributed training speed: sync workers against the single-process trainer.

Measures, in one run on a private local Ray instance:
  1. samples/s of `core.train` (thread pool over shards, every core) and of
     the coordinator with 1, 2 and 4 workers on the same spec
     (784-256-256-10, synthetic data, global batch 1024, float32);
  2. the median time per phase of a step for each worker count;
  3. the per-step overhead (step time minus compute) as the parameter count
     grows from 10k to 10M, and as the worker count grows, with a batch so
     small that compute is negligible.

    .venv/bin/python bench/distributed.py [--steps 300] [--repeats 3] [--json out.json] [--plot docs/distributed.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.spec import parse_spec  # noqa: E402
from core.trainer import train  # noqa: E402
from workers.coordinator import Coordinator  # noqa: E402
from workers.runtime import connect_ray  # noqa: E402

WARMUP = 20
SETTLE_S = 3.0  # lets the previous run's actor processes exit before the next is timed


def spec_for(workers: int, steps: int, hidden=(256, 256), features=784, batch=1024, samples=20000):
    return parse_spec({
        "name": "bench", "seed": 0,
        "data": {"source": "synthetic", "samples": samples, "features": features, "classes": 10,
                 "validation_split": 0.0, "shards": 4},
        "model": {"hidden": list(hidden)},
        "training": {"batch_size": batch, "steps": steps, "eval_every": 0,
                     "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
        "resources": {"workers": workers},
    })


def timed_records():
    """An on_step callback that stamps each record with its arrival time."""
    records = []

    def on_step(record):
        record["at"] = time.perf_counter()
        records.append(record)

    return records, on_step


def throughput(records) -> float:
    """Samples/s over the steps after warm-up, from arrival times."""
    steady = records[WARMUP:]
    seconds = steady[-1]["at"] - records[WARMUP - 1]["at"]
    return sum(r["samples"] for r in steady) / seconds


def run_reference(spec) -> dict:
    records, on_step = timed_records()
    train(spec, on_step=on_step)
    return {"samples_per_s": throughput(records)}


def run_distributed(spec) -> dict:
    time.sleep(SETTLE_S)
    records, on_step = timed_records()
    transports = []

    def on_event(event):
        if event.kind == "graph":
            transports.append(event.transport)

    with tempfile.TemporaryDirectory() as tmp:
        Coordinator(spec, tmp, on_step=on_step, on_event=on_event).run()
    steady = records[WARMUP:]
    phases = {p: statistics.median(r["phases"][p] for r in steady) for p in steady[0]["phases"]}
    step_s = [b["at"] - a["at"] for a, b in zip(records[WARMUP - 1:], steady)]
    return {"samples_per_s": throughput(records), "phases_s": phases, "step_s": statistics.median(step_s),
            "transport": "/".join(sorted(set(transports)))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    connect_ray(None, 4)
    results = {"cores": os.cpu_count(), "steps": args.steps}

    print(f"throughput: 784-256-256-10, batch 1024, float32, 4 shards; {args.repeats} interleaved rounds",
          flush=True)
    rounds = []
    for k in range(args.repeats):
        row = {"reference": run_reference(spec_for(2, args.steps))}
        for w in (1, 2, 4):
            row[w] = run_distributed(spec_for(w, args.steps))
        rounds.append(row)
        print(f"  round {k + 1}: reference {row['reference']['samples_per_s']:9.0f} samples/s; "
              + "; ".join(f"{w} worker(s) x{row[w]['samples_per_s'] / row['reference']['samples_per_s']:.2f}"
                          for w in (1, 2, 4)), flush=True)
    median = statistics.median
    results["rounds"] = [{str(k): v for k, v in row.items()} for row in rounds]
    results["reference"] = {"samples_per_s": median(r["reference"]["samples_per_s"] for r in rounds)}
    print(f"  reference (thread pool) {results['reference']['samples_per_s']:9.0f} samples/s (median)", flush=True)
    results["workers"] = {}
    for w in (1, 2, 4):
        runs = [row[w] for row in rounds]
        r = {
            "samples_per_s": median(x["samples_per_s"] for x in runs),
            "step_s": median(x["step_s"] for x in runs),
            "phases_s": {p: median(x["phases_s"][p] for x in runs) for p in runs[0]["phases_s"]},
            # the ratio within each round (same machine state), then its median
            "ratio_to_reference": median(x["samples_per_s"] / row["reference"]["samples_per_s"]
                                         for x, row in zip(runs, rounds)),
            "transport": runs[0]["transport"],
        }
        results["workers"][w] = r
        phases = "  ".join(f"{k} {v * 1e3:6.1f} ms" for k, v in r["phases_s"].items())
        print(f"  {w} worker(s)             {r['samples_per_s']:9.0f} samples/s  "
              f"x{r['ratio_to_reference']:.2f}  step {r['step_s'] * 1e3:6.1f} ms  {phases}  ({r['transport']})",
              flush=True)

    print("per-step overhead (step time - compute) with a 4-row batch:", flush=True)
    results["overhead"] = []
    for width, layers in [(50, 2), (300, 2), (1000, 1), (3100, 1)]:
        hidden = [width] * layers
        for w in (1, 2, 4):
            spec = spec_for(w, 60, hidden=hidden, features=width, batch=4, samples=400)
            params = sum(a * b + b for a, b in zip([width, *hidden], [*hidden, 10]))
            r = run_distributed(spec)
            overhead = r["step_s"] - r["phases_s"]["compute"]
            results["overhead"].append({"params": params, "workers": w, "step_s": r["step_s"],
                                        "overhead_s": overhead})
            print(f"  {params:>10,} params  {w} worker(s)  step {r['step_s'] * 1e3:7.1f} ms  "
                  f"overhead {overhead * 1e3:7.1f} ms", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["reference"] + [f"{w} worker(s)" for w in results["workers"]]
    values = [results["reference"]["samples_per_s"]] + [r["samples_per_s"] for r in results["workers"].values()]
    left.bar(names, values, color=["#888"] + ["#3a7"] * len(results["workers"]))
    left.set_ylabel("samples/s")
    left.set_title("784-256-256-10, batch 1024, float32")
    for w in sorted({o["workers"] for o in results["overhead"]}):
        rows = [o for o in results["overhead"] if o["workers"] == w]
        right.plot([o["params"] for o in rows], [o["overhead_s"] * 1e3 for o in rows], marker="o",
                   label=f"{w} worker(s)")
    right.set_xscale("log")
    right.set_xlabel("parameters")
    right.set_ylabel("overhead per step (ms)")
    right.set_title("per-step overhead")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
