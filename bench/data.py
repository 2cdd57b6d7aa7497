"""Data at scale: preparing a large CSV (part `prepare`), and the workers'
memory when training on a prepared set (part `workers`, added beside it).

Part `prepare` generates a CSV of `--size-mb` megabytes (32 float64
features in pyarrow's shortest round-trip text, an integer label of 10
classes), then alternates, `--rounds` times, two child processes on it:
pyarrow's plain `pyarrow.csv.read_csv` of the whole file (the baseline) and
`shardprop data prepare`'s `prepare` into a fresh folder. Each child reports
its wall time and its peak resident memory (VmHWM of /proc/self/status, which
counts touched mapped pages too). It prints medians as a markdown table for
docs/benchmarks.md. Targets (issue 14): preparation ≥ 0.5× the baseline's
MB/s, peak memory under 1 GB whatever the size.

    .venv/bin/python bench/data.py --part prepare --size-mb 1200 [--rounds 3] [--dir /var/tmp/bench]
    .venv/bin/python bench/data.py --size-mb 20 --rounds 1      (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES, CLASSES = 32, 10


def generate_csv(path: Path, size_mb: float, seed: int = 0) -> int:
    """A CSV of about `size_mb` MB, written in chunks (bounded memory); its row count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    target, rows = size_mb * 1e6, 0
    with open(path, "wb") as fh:
        first = True
        while fh.tell() < target:
            n = 5_000
            X = rng.standard_normal((n, FEATURES))
            columns = {f"x{j}": X[:, j] for j in range(FEATURES)}
            columns["label"] = rng.integers(0, CLASSES, n)
            pacsv.write_csv(pa.table(columns), fh, write_options=pacsv.WriteOptions(include_header=first))
            first, rows = False, rows + n
    return rows


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(task: str, csv: str, out: str) -> None:
    """Run in a fresh process: one measured task, its result as JSON on stdout.
    Both tasks import what they use before the clock starts."""
    import pyarrow.compute  # noqa: F401
    import pyarrow.csv  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    if task == "read_csv":
        import pyarrow.csv as pacsv

        start = time.perf_counter()
        table = pacsv.read_csv(csv)
        seconds = time.perf_counter() - start
        rows = table.num_rows
    else:
        from core.prepared import prepare

        start = time.perf_counter()
        prepared = prepare(csv, out)
        seconds = time.perf_counter() - start
        rows = prepared.n_train + prepared.n_val
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(), "rows": rows}))


def run_child(task: str, csv: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--child", task, str(csv), str(out)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_prepare(args) -> str:
    work = Path(tempfile.mkdtemp(prefix="shardprop-bench-data-", dir=args.dir))
    try:
        csv = work / "big.csv"
        rows = generate_csv(csv, args.size_mb)
        size = csv.stat().st_size
        with open(csv, "rb") as fh:  # into the page cache, so both read it from memory alike
            while fh.read(64 << 20):
                pass
        results = {"read_csv": [], "prepare": []}
        for r in range(args.rounds):
            for task in ("read_csv", "prepare"):
                out = work / f"out-{r}"
                results[task].append(run_child(task, csv, out))
                shutil.rmtree(out, ignore_errors=True)
                assert results[task][-1]["rows"] == rows
                print(f"round {r + 1} {task}: {results[task][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = size / 1e6

    def median(task, key):
        return statistics.median(x[key] for x in results[task])

    ratios = [b["seconds"] / p["seconds"] for b, p in zip(results["read_csv"], results["prepare"])]
    read_rate, prep_rate = mb / median("read_csv", "seconds"), mb / median("prepare", "seconds")
    lines = [
        f"CSV of {mb:.0f} MB ({rows} rows, {FEATURES} features + label), median of {args.rounds} "
        f"alternating rounds, each in a fresh process:",
        "",
        "| | MB/s of CSV | peak resident memory (VmHWM) |",
        "|---|---:|---:|",
        f"| `pyarrow.csv.read_csv` (baseline) | {read_rate:.0f} | {median('read_csv', 'peak_rss') / 1e6:.0f} MB |",
        f"| `prepare` (`shardprop data prepare`) | {prep_rate:.0f} | {median('prepare', 'peak_rss') / 1e6:.0f} MB |",
        "",
        f"prepare / read_csv speed: **{statistics.median(ratios):.2f}x** (median of per-round ratios; "
        f"target ≥ 0.5x); prepare's peak memory {max(x['peak_rss'] for x in results['prepare']) / 1e6:.0f} MB "
        f"at most (target < 1000 MB).",
    ]
    return "\n".join(lines)


PARTS = {"prepare": bench_prepare}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--size-mb", type=float, default=1200.0, help="the generated CSV's size (default 1200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to write the CSV and the prepared sets (default: the temp dir)")
    args = parser.parse_args()
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            print(f"## {name}\n\n{part(args)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
