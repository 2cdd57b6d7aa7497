"""Fit and check the step-time model (core/scaling.py) on 1-4 namespace hosts.

One cluster of `--hosts` network namespaces (tests/netns_cluster.py under
bench/multihost.py's names: `spbench-h<i>`, bridge `spbenchbr`,
10.251.77.0/24), each running one `ray start` with 1 CPU; the driver runs in host 0's namespace. Every host's
link is shaped in both directions with `tc ... tbf` (on the bridge side of
its veth for traffic to it, on its own side for traffic from it), GSO off so
that tbf sees MTU-sized packets. With `--latency-ms L [L ...]` every host
is joined through our link emulator instead of a veth (tests/link_emulator.py:
this kernel has no `netem`) and each point is measured at each latency: a
frame leaving a host waits L ms, so node to node is L one way (plus the
link's own); the round trip is probed by TCP connects (the hosts have no
ping) after each change and recorded. Without it the links are veths and
keep their own round trip. The emulator is a Python process per link: it
adds its own ~0.1 ms and bounds the rate it can carry, so compare emulated
points with emulated points.

A point is (workers N, link rate, hidden widths). Its job: N workers (Ray's
SPREAD puts them on N hosts), N shards of `--shard-rows` rows, float32, sgd
with momentum, no evaluation or checkpoints; its step time is the mean gap
between the steady steps' results at the driver (steps after `--warmup`).
Every point runs in one driver process, repeated `--rounds` times, the
points interleaved (their order reversed every other round); the median is
reported, with where the servers were (Ray picks their node). Then the
model's constants are fitted (non-negative least squares) on the points
marked `fit` and the others are predicted.

The machine has 2 cores and is shared: with 3 or 4 hosts of 1 CPU each the
workers share 2 cores, so the model's compute term is stretched by
max(1, N / 2) here (`contention`); projections assume cores of their own.

    .venv/bin/python bench/scaling.py [--hosts 4] [--rounds 3] [--steps 25] [--latency-ms 0.1 1] [--json scaling.json]
    .venv/bin/python bench/scaling.py --rows scaling.json     # fit again, no measuring

Do not run it beside bench/multihost.py: they use the same namespace names.
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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from tests.link_emulator import LinkShape  # noqa: E402
from tests.netns_cluster import BENCH, ENV, GCS_PORT, NetnsCluster  # noqa: E402

from core.scaling import FITTED, Calibration, JobShape, Network, bytes_per_step, parameter_server_step  # noqa: E402

CORES = 2  # this machine's
RATES = {"1Gbit": 1e9 / 8, "200Mbit": 200e6 / 8}
HIDDEN = {"55k": (64, 64), "269k": (256, 256)}
FEATURES, CLASSES = 784, 10

# (workers N, link rate, model): used to fit, or held out to check
POINTS = [(1, "1Gbit", "55k", "fit"), (1, "200Mbit", "269k", "fit"),
          (2, "1Gbit", "55k", "fit"), (2, "1Gbit", "269k", "fit"),
          (2, "200Mbit", "55k", "fit"), (2, "200Mbit", "269k", "fit"),
          (3, "1Gbit", "269k", "fit"), (3, "200Mbit", "55k", "fit"),
          (3, "1Gbit", "55k", "check"), (3, "200Mbit", "269k", "check"),
          (4, "1Gbit", "55k", "check"), (4, "1Gbit", "269k", "check"),
          (4, "200Mbit", "55k", "check"), (4, "200Mbit", "269k", "check")]
HOSTS = 4

DRIVER = """
import json, statistics, sys, time
from core.spec import parse_spec
from workers.coordinator import Coordinator
from workers.runtime import connect_ray
connect_ray(sys.argv[1], 1)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    raw = json.loads(line)
    arrived, where = [], {}
    coord = None
    def on_step(record):
        arrived.append(time.perf_counter())
        if not where:
            where.update(workers=[w["node_id"] for w in coord.worker_locations],
                         servers=[s["node_id"] for s in coord.server_locations])
        on_step.records.append(record)
    on_step.records = []
    coord = Coordinator(parse_spec(raw["spec"]), raw["dir"], on_step=on_step)
    coord.run()
    w = raw["warmup"]
    steady = on_step.records[w:]
    phases = {k: statistics.median(r["phases"][k] for r in steady) for k in steady[0]["phases"]}
    print(json.dumps({"step_s": (arrived[-1] - arrived[w]) / (len(arrived) - 1 - w), "phases": phases,
                      "placement": where}), flush=True)
"""


def spec_for(workers: int, model: str, steps: int, shard_rows: int) -> dict:
    return {"name": f"scaling-{workers}-{model}", "seed": 0,
            "data": {"source": "synthetic", "samples": max(4096, 2 * workers * shard_rows), "features": FEATURES,
                     "classes": CLASSES, "validation_split": 0.0, "shards": workers},
            "model": {"hidden": list(HIDDEN[model])},
            "training": {"batch_size": shard_rows * workers, "steps": steps, "dtype": "float32", "eval_every": 0,
                         "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
            "resources": {"workers": workers, "pin_cores": False}}


def shape_for(workers: int, model: str, shard_rows: int) -> JobShape:
    return JobShape((FEATURES, *HIDDEN[model], CLASSES), True, 4, shard_rows * workers, workers)


def links(nets: NetnsCluster, i: int) -> list[tuple[list[str], str]]:
    """Host i's veth: (command prefix, device) for its bridge end and its own end."""
    return [([], f"{BENCH.link}v{i}"), (nets.prefix(i), f"{BENCH.link}p{i}")]


def shape_links(nets: NetnsCluster, rate: str | None) -> None:
    """Both directions of every host's link at `rate` (None: unshaped)."""
    for i in range(len(nets.names)):
        for prefix, dev in links(nets, i):
            subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate is not None:
                bits = RATES[rate] * 8
                burst = max(16_000, int(RATES[rate] / 1000))  # 1 ms of the rate, at least ~10 packets
                subprocess.run(prefix + ["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bits:.0f}bit",
                                         "burst", str(burst), "latency", "200ms"], check=True, capture_output=True)


def no_gso(nets: NetnsCluster) -> None:
    for i in range(len(nets.names)):
        for prefix, dev in links(nets, i):
            subprocess.run(prefix + ["ip", "link", "set", "dev", dev, "gso_max_size", "1500"], check=True,
                           capture_output=True)


RTT_PROBE = """
import socket, statistics, sys, time
def once():
    began = time.perf_counter()
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
    return time.perf_counter() - began
print(statistics.median(once() for _ in range(20)) * 1e3)
"""


def rtt_ms(nets: NetnsCluster) -> float | None:
    """Median TCP connect time host 1 -> host 0 (one round trip), in ms
    (the hosts have no ping)."""
    if len(nets.names) < 2:
        return None
    done = subprocess.run(nets.prefix(1) + [sys.executable, "-c", RTT_PROBE, nets.ip(0), str(GCS_PORT)],
                          capture_output=True, text=True)
    return float(done.stdout) if done.returncode == 0 else None


class Cluster:
    """`hosts` namespace hosts of tests/netns_cluster.py under the bench's
    names, 1 CPU each, and a driver in host 0. A job of N workers lands
    them on N hosts (Ray's SPREAD); its servers go where Ray puts them, and
    each point records where that was. With `emulated`, every host's link
    goes through the link emulator, so that `set_latency` can delay it."""

    def __init__(self, hosts: int, work: Path, emulated: bool = False):
        self.hosts, self.work = hosts, work
        work.mkdir(parents=True, exist_ok=True)
        self.nets = NetnsCluster([1] * hosts, BENCH, system_config={},
                                 emulated=range(hosts) if emulated else ()).__enter__()
        self.driver = None
        self.latency_ms: float | None = None
        try:
            no_gso(self.nets)
            self.rtt_ms = {None: rtt_ms(self.nets)}
            self.driver = subprocess.Popen(self.nets.prefix(0) + [sys.executable, "-c", DRIVER, self.nets.address],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
                                           cwd=ROOT, start_new_session=True)
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver ended ({self.driver.wait()})")
        return json.loads(line)

    def set_latency(self, latency_ms: float | None) -> None:
        """Every frame leaving a host waits `latency_ms` (None: the links
        as made); the round trip is probed again."""
        if latency_ms == self.latency_ms:
            return
        for i in range(self.hosts):
            self.nets.shape(i, LinkShape(), LinkShape(delay_ms=latency_ms or 0.0))
        self.latency_ms = latency_ms
        self.rtt_ms[latency_ms] = rtt_ms(self.nets)

    def run(self, workers: int, rate: str, model: str, steps: int, shard_rows: int, warmup: int) -> dict:
        shape_links(self.nets, rate)
        job = self.work / f"job-{time.monotonic_ns()}"
        self.driver.stdin.write(json.dumps({"spec": spec_for(workers, model, steps, shard_rows),
                                            "dir": str(job), "warmup": warmup}) + "\n")
        self.driver.stdin.flush()
        got = self._read()
        place = got["placement"]
        got["remote"] = sum(node not in place["servers"] for node in place["workers"])
        got["nodes"] = len(set(place["workers"]) | set(place["servers"]))
        return got

    def close(self) -> None:
        if self.driver is not None:  # by pid; the cluster ends its own by theirs
            self.driver.stdin.close()
            try:
                self.driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, 9)
                self.driver.wait()
        self.nets.close()


# ---------------------------------------------------------------- the fit


def _colocated(r: dict) -> bool:
    return r["remote"] < r["workers"]


def _terms(r: dict, cal: Calibration, shard_rows: int) -> tuple[float, list[float]]:
    """A point's known part (its measured compute, the model's reduce+apply
    and latency) and the coefficients of the fitted constants (c0, c_n,
    alpha, 1/eta)."""
    n, remote = r["workers"], r["remote"]
    shape = shape_for(n, r["model"], shard_rows)
    moved = bytes_per_step(shape, n, _colocated(r)).total
    known = (r["phases"]["compute"] + cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters
             + (2 * cal.latency_hops * r["latency_s"] if remote else 0.0))
    return known, [1.0, float(remote), 2.0 * (remote > 0), moved / r["rate_bytes_s"]]


def calibrate(rows: list[dict], shard_rows: int) -> Calibration:
    """F from the 1-worker points' compute phase, rho from every point's
    reduce+apply phase, then c0, c_n, alpha and eta by non-negative least squares on the
    `fit` points, each point's compute taken as measured (the shared
    machine's load moves compute far more than the network terms)."""
    ones = [r for r in rows if r["workers"] == 1]
    flop_rate = statistics.median(shape_for(1, r["model"], shard_rows).shard_flops() / r["phases"]["compute"]
                                  for r in ones)
    rho = statistics.median(r["phases"]["reduce_apply"] / ((r["workers"] + 1) * shape_for(
        r["workers"], r["model"], shard_rows).parameters) for r in rows)
    cal = replace(FITTED, flop_rate=flop_rate, reduce_s_per_value=rho)
    a, b = [], []
    for r in (r for r in rows if r["use"] == "fit"):
        known, coef = _terms(r, cal, shard_rows)
        a.append(coef)
        b.append(r["step_s"] - known)
    # Non-negative least squares: every constant is a cost, and with few
    # noisy points plain least squares made some negative (an efficiency
    # below zero) to chase the noise.
    (c0, cn, alpha, inv_eta), _ = nnls(np.array(a), np.array(b))
    return replace(cal, step_overhead_s=float(c0), per_node_s=float(cn), per_transfer_s=float(alpha),
                   link_efficiency=float(1.0 / inv_eta) if inv_eta > 0 else float("inf"))


def predict(r: dict, cal: Calibration, shard_rows: int) -> tuple[float, float]:
    """The model's step for a point: with its measured compute, and with the
    compute from its FLOPs (stretched by the workers sharing CORES cores)."""
    shape = shape_for(r["workers"], r["model"], shard_rows)
    step = parameter_server_step(shape, Network(r["workers"], r["rate_bytes_s"], r["latency_s"]), cal,
                                 contention=max(1.0, r["workers"] / CORES), colocated=_colocated(r))
    return step.total_s - step.compute_s + r["phases"]["compute"], step.total_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=6, help="steps left out of the step time")
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--hosts", type=int, default=HOSTS, help="namespace hosts (points of more workers are left out)")
    ap.add_argument("--latency-ms", type=float, nargs="+", metavar="L",
                    help="measure every point at each of these one-way latencies, through the link emulator")
    ap.add_argument("--json", help="write the points and the fit here")
    ap.add_argument("--rows", help="fit again the points of an earlier --json, without measuring")
    args = ap.parse_args()
    if args.rows:
        report(json.loads(Path(args.rows).read_text())["rows"], args)
        return 0
    if os.geteuid() != 0:
        print("bench/scaling.py needs root (namespaces, tc)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="spscale-"))
    try:
        rows = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:  # before the fit, so that a failed fit loses no measurement
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    report(rows, args)
    return 0


def measure(args, work: Path) -> list[dict]:
    """Every point's median step and phases, at each latency, the runs interleaved."""
    if args.latency_ms and any(lat < 0 for lat in args.latency_ms):
        raise SystemExit(f"--latency-ms must be >= 0, got {args.latency_ms}")
    latencies = args.latency_ms or [None]
    cluster = Cluster(args.hosts, work, emulated=bool(args.latency_ms))
    runs: dict[tuple[int, float | None], list[dict]] = {}
    try:
        for rnd in range(args.rounds):
            order = [(i, lat) for lat in latencies for i, p in enumerate(POINTS) if p[0] <= args.hosts]
            for i, lat in (order if rnd % 2 == 0 else order[::-1]):
                workers, rate, model, _ = POINTS[i]
                cluster.set_latency(lat)
                got = cluster.run(workers, rate, model, args.steps, args.shard_rows, args.warmup)
                runs.setdefault((i, lat), []).append(got)
                shaped = "" if lat is None else f" +{lat} ms"
                print(f"{workers} workers {rate}{shaped} {model} round {rnd + 1}: {got['step_s'] * 1e3:.1f} ms, "
                      f"{got['remote']} remote, {got['nodes']} nodes; load {os.getloadavg()[0]:.0f}",
                      file=sys.stderr, flush=True)
                if args.json:  # the points so far, in case the run is cut short
                    Path(args.json + ".partial").write_text(json.dumps({"rows": _rows(runs, cluster.rtt_ms)}))
    finally:
        cluster.close()
    return _rows(runs, cluster.rtt_ms)


def _rows(runs: dict[tuple[int, float | None], list[dict]], rtts: dict[float | None, float | None]) -> list[dict]:
    rows = []
    for (i, lat), got in sorted(runs.items(), key=lambda kv: (kv[0][1] or 0.0, kv[0][0])):
        workers, rate, model, use = POINTS[i]
        rtt = rtts.get(lat)
        # The servers' node varies from run to run: keep the runs of the commonest placement.
        remote = statistics.mode(g["remote"] for g in got)
        same = [g for g in got if g["remote"] == remote]
        rows.append({"workers": workers, "rate": rate, "model": model, "use": use, "remote": remote,
                     "shaped_latency_ms": lat,
                     "runs_kept": len(same), "rate_bytes_s": RATES[rate], "latency_s": (rtt or 0.0) / 2e3,
                     "rtt_ms": rtt, "step_s": statistics.median(g["step_s"] for g in same),
                     "rounds_s": [g["step_s"] for g in got], "remote_by_round": [g["remote"] for g in got],
                     "phases": {k: statistics.median(g["phases"][k] for g in same) for k in same[0]["phases"]}})
    return rows


def report(rows: list[dict], args) -> None:
    cal = calibrate(rows, args.shard_rows)
    print(f"\nfitted: {json.dumps(asdict(cal))}\n")
    print("| workers | remote | link | latency (RTT ms) | parameters | used to | measured (ms) | rounds (ms) | model, compute as "
          "measured (ms) | error | model, compute from FLOPs (ms) | error | compute | transfer | reduce+apply |")
    print("|---|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["model_s"], r["model_flops_s"] = predict(r, cal, args.shard_rows)
        r["error"], r["error_flops"] = r["model_s"] / r["step_s"] - 1, r["model_flops_s"] / r["step_s"] - 1
        ph = r["phases"]
        shaped = "veth" if r.get("shaped_latency_ms") is None else f"+{r['shaped_latency_ms']} ms"
        print(f"| {r['workers']} | {r['remote']} | {r['rate']} | {shaped} ({r['rtt_ms'] or 0:.2f}) | {r['model']} | "
              f"{r['use']} | {r['step_s'] * 1e3:.1f} | "
              f"{' / '.join(f'{t * 1e3:.1f}' for t in r['rounds_s'])} | {r['model_s'] * 1e3:.1f} | "
              f"{r['error'] * 100:+.0f}% | {r['model_flops_s'] * 1e3:.1f} | {r['error_flops'] * 100:+.0f}% | "
              f"{ph['compute'] * 1e3:.1f} | {ph['transfer'] * 1e3:.1f} | {ph['reduce_apply'] * 1e3:.1f} |")
    checks = [abs(r["error"]) for r in rows if r["use"] == "check"]
    if checks:
        print(f"\nheld-out points, compute as measured: median |error| {statistics.median(checks) * 100:.0f}%, "
              f"largest {max(checks) * 100:.0f}%")
    rtts = {r.get("shaped_latency_ms"): r.get("rtt_ms") for r in rows}
    print(f"RTT host 1 -> host 0 (TCP connect), by shaped latency: {rtts} ms; load average now: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": asdict(cal), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
