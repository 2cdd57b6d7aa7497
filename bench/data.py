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

Part `workers` writes a folder of Parquet files (`--workers-mb` of float32
features on disk, 64 features, 10 classes, in chunks), prepares it, and
runs `shardprop train --address` on it with 2 workers in a child process,
attached to a local Ray this benchmark starts (a private one per child
often failed to start within Ray's fixed 30 s on a loaded machine),
polling the Ray worker processes (its descendants titled
`ray::GradientWorker`) for their VmHWM, which counts touched mapped pages;
the child (the `shardprop train` driver) reports its own VmHWM at exit. Targets (issue 14): each worker ≤
its shards' rows as float32 × 1.25 + 350 MB, the driver < 600 MB. Then, at
`--throughput-rows` rows (a size that fits in memory), it alternates
`--rounds` runs of the same job on the rows in memory (an `.npz`) and
prepared, each in a fresh process, and compares training throughput
(samples/s over the steps after the first 10).

    .venv/bin/python bench/data.py --part workers --workers-mb 1100 [--rounds 3] [--dir /var/tmp/bench]
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


# ------------------------------------------------------------ part `workers`

WORKER_FEATURES, WORKER_CLASSES, WORKER_SHARDS = 64, 10, 4
WORKER_TITLE = "ray::GradientWorker"
BUDGET_FACTOR, BUDGET_FIXED, DRIVER_LIMIT = 1.25, 350e6, 600e6


def generate_parquet(folder: Path, size_mb: float, seed: int = 0) -> int:
    """Parquet files holding about `size_mb` MB of float32 features, written
    a chunk at a time; the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    rng = np.random.default_rng(seed)
    chunk = 250_000
    rows = int(size_mb * 1e6 / (WORKER_FEATURES * 4))
    for i, start in enumerate(range(0, rows, chunk)):
        n = min(chunk, rows - start)
        X = rng.standard_normal((n, WORKER_FEATURES), dtype=np.float32)
        columns = {f"x{j}": X[:, j] for j in range(WORKER_FEATURES)}
        columns["label"] = rng.integers(0, WORKER_CLASSES, n)
        pq.write_table(pa.table(columns), folder / f"part-{i:04d}.parquet")
    return rows


def worker_job(source: Path, steps: int, eval_every: int, batch_size: int) -> dict:
    return {"name": "bench-workers", "seed": 0,
            "data": {"source": str(source), "shards": WORKER_SHARDS, "validation_split": 0.2},
            "model": {"hidden": [32]},
            "training": {"batch_size": batch_size, "steps": steps, "eval_every": eval_every, "checkpoint_every": 0,
                         "optimizer": {"name": "adam", "lr": 0.001}},
            "resources": {"workers": 2}}


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child_pid in children.get(todo.pop(), []):
            found.add(child_pid)
            todo.append(child_pid)
    return found


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def train_child(job_path: str, out: str, address: str) -> None:
    """`shardprop train` in this process (the driver), then its VmHWM as JSON."""
    from service.cli import main as cli

    code = cli(["train", job_path, "--out", out, "--checkpoint-dir", out + ".run", "--address", address])
    print(json.dumps({"code": code, "peak_rss": peak_rss_bytes()}))


def start_ray(attempts: int = 8) -> str:
    """A local Ray for the children to attach to (retried: its start can time
    out on a loaded machine); its address."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                               "PYTHONPATH": str(ROOT)}})
            return ray.get_runtime_context().gcs_address
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def measure_training_memory(job_path: Path, out: Path, address: str) -> tuple[dict, dict[int, int]]:
    """Run `shardprop train` in a child; (its report, each worker's last VmHWM by pid)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    errors = open(out.with_suffix(".err"), "w+")
    proc = subprocess.Popen([sys.executable, __file__, "--child-train", str(job_path), str(out), address],
                            stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    workers: dict[int, int] = {}
    while proc.poll() is None:
        for pid in _descendants(os.getpid()):  # the workers are children of this process's raylet
            if _title(pid).startswith(WORKER_TITLE):
                hwm = _proc_status(pid).get("VmHWM")
                if hwm:
                    workers[pid] = max(workers.get(pid, 0), hwm)
        time.sleep(0.2)
    lines = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0 or not lines:
        errors.seek(0)
        raise RuntimeError(f"shardprop train failed:\n{errors.read()[-3000:]}")
    errors.close()
    return json.loads(lines[-1]), workers


def throughput_child(source: str, address: str) -> None:
    """One job on the Ray at `address`; samples/s over the steps after the first 10."""
    from workers.coordinator import Coordinator
    from workers.runtime import connect_ray

    connect_ray(address)
    stamps = []
    spec = worker_job(Path(source), steps=70, eval_every=0, batch_size=2048)
    with tempfile.TemporaryDirectory() as run:
        Coordinator(spec, run, on_step=lambda r: stamps.append((time.perf_counter(), r["samples"]))).run()
    samples = sum(n for _, n in stamps[11:])
    print(json.dumps({"samples_per_s": samples / (stamps[-1][0] - stamps[10][0])}))


def bench_workers(args) -> str:
    from core.prepared import prepare
    from core.shards import shard_range

    import ray

    # This Ray is the benchmark's alone: no token (one shared in the home
    # folder, replaced by another user's Ray meanwhile, locked the children out).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    work = Path(tempfile.mkdtemp(prefix="shardprop-bench-workers-", dir=args.dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    address = start_ray()
    try:
        rows = generate_parquet(work / "parquet", args.workers_mb)
        prepared = prepare(work / "parquet", work / "set", seed=0)
        disk = sum(f["bytes"] for f in prepared.manifest["files"])
        shutil.rmtree(work / "parquet")
        job_path = work / "job.json"
        job_path.write_text(json.dumps(worker_job(work / "set", steps=40, eval_every=20, batch_size=512)))
        report, workers = measure_training_memory(job_path, work / "model.npz", address)
        assert report["code"] == 0, report
        print(f"driver {report['peak_rss'] / 1e6:.0f} MB, workers {sorted(workers.values())}", file=sys.stderr)
        ranges = [shard_range(prepared.n_train, WORKER_SHARDS, s) for s in range(WORKER_SHARDS)]
        per_worker = [sum(b - a for a, b in ranges[w::2]) * WORKER_FEATURES * 4 for w in range(2)]  # shard s to s mod 2
        shutil.rmtree(work / "set")
        small = throughput_sets(work, args.throughput_rows)
        results = {"memory": [], "prepared": []}
        for r in range(args.rounds):
            for kind in ("memory", "prepared"):
                for attempt in range(3):  # attaching can time out on a loaded machine
                    done = subprocess.run([sys.executable, __file__, "--child-throughput", str(small[kind]), address],
                                          capture_output=True, text=True, env=env)
                    if done.returncode == 0:
                        break
                    print(f"the {kind} throughput run failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                else:
                    raise RuntimeError(f"the {kind} throughput run failed 3 times")
                results[kind].append(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"])
                print(f"round {r + 1} {kind}: {results[kind][-1]:.0f} samples/s", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    peaks = sorted(workers.values(), reverse=True)[:2]
    budget = [w * BUDGET_FACTOR + BUDGET_FIXED for w in per_worker]
    ratios = [p / m for m, p in zip(results["memory"], results["prepared"])]
    lines = [
        f"A prepared set of {disk / 1e9:.2f} GB on disk ({rows} rows: {prepared.n_train} training, "
        f"{WORKER_FEATURES} float32 features, {WORKER_CLASSES} classes), {WORKER_SHARDS} shards, "
        "`shardprop train` with 2 workers (40 steps of 512 rows, validation every 20 steps):",
        "",
        "| process | peak resident memory (VmHWM) | its shards' rows as float32 | target |",
        "|---|---:|---:|---:|",
        *(f"| worker {i} | {peak / 1e6:.0f} MB | {rows_bytes / 1e6:.0f} MB | ≤ {limit / 1e6:.0f} MB |"
          for i, (peak, rows_bytes, limit) in enumerate(zip(peaks, sorted(per_worker, reverse=True), budget))),
        f"| driver (`shardprop train`) | {report['peak_rss'] / 1e6:.0f} MB | — | < {DRIVER_LIMIT / 1e6:.0f} MB |",
        "",
        f"Training throughput at {args.throughput_rows} rows ({args.rounds} alternating rounds, each a fresh "
        "process, 2 workers, 60 measured steps of 2048 rows): in memory "
        f"{statistics.median(results['memory']):.0f} samples/s, prepared "
        f"{statistics.median(results['prepared']):.0f} samples/s (median); prepared / in memory "
        f"**{statistics.median(ratios):.2f}x** (median of per-round ratios; target ≥ 0.9x).",
    ]
    return "\n".join(lines)


def throughput_sets(work: Path, rows: int) -> dict[str, Path]:
    """The same rows as an `.npz` (trained in memory) and prepared."""
    from core.prepared import prepare

    rng = np.random.default_rng(1)
    X = rng.standard_normal((rows, WORKER_FEATURES), dtype=np.float32)
    np.savez(work / "small.npz", X=X, y=rng.integers(0, WORKER_CLASSES, rows))
    prepare(work / "small.npz", work / "small", seed=0)
    return {"memory": work / "small.npz", "prepared": work / "small"}


PARTS = {"prepare": bench_prepare, "workers": bench_workers}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-train":
        train_child(*sys.argv[2:5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--child-throughput":
        throughput_child(*sys.argv[2:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--size-mb", type=float, default=1200.0, help="the generated CSV's size (default 1200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers-mb", type=float, default=1100.0,
                        help="part workers: the prepared set's features on disk (default 1100)")
    parser.add_argument("--throughput-rows", type=int, default=200_000,
                        help="part workers: rows of the in-memory vs prepared throughput runs (default 200000)")
    parser.add_argument("--dir", help="where to write the CSV and the prepared sets (default: the temp dir)")
    args = parser.parse_args()
    for name, part in PARTS.items():
        if args.part in (name, "all"):
            print(f"## {name}\n\n{part(args)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
