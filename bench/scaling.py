"""Fit and check the step-time model (core/scaling.py) on 1-4 namespace hosts.

Each host is a network namespace of bench/multihost.py's (`spbench-h<i>` on
the bridge `spbenchbr`, 10.251.77.0/24) running one `ray start` with 1 CPU;
the driver runs in host 0's namespace. Every host's link is shaped in both
directions with `tc ... tbf` (on the bridge side of its veth for traffic to
it, on its own side for traffic from it), GSO off so that tbf sees
MTU-sized packets. This kernel has no `netem` (CONFIG_NET_SCH_NETEM is not
set), so latency is not shaped: the links keep the veths' own (measured with
ping and printed).

A point is (hosts N, link rate, hidden widths). Its job: N workers, N shards
of `--shard-rows` rows, float32, sgd with momentum, no evaluation or
checkpoints; its step time is the mean gap between the steady steps' results
at the driver (steps after `--warmup`). Points of one cluster run in one
driver process, each repeated `--rounds` times, the points interleaved
(their order reversed every other round); the median is reported. Then the
model's constants are fitted (least squares) on the points marked `fit` and
the others are predicted.

The machine has 2 cores and is shared: with 3 or 4 hosts of 1 CPU each the
workers share 2 cores, so the model's compute term is stretched by
max(1, N / 2) here (`contention`); projections assume cores of their own.

    .venv/bin/python bench/scaling.py [--rounds 3] [--steps 40] [--json scaling.json]

Do not run it beside bench/multihost.py: they use the same namespace names.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import multihost  # noqa: E402
from multihost import SUBNET, Namespaces, Setup, sh  # noqa: E402

from core.scaling import FITTED, Calibration, JobShape, Network, bytes_per_step, parameter_server_step  # noqa: E402

CORES = 2  # this machine's
# A loaded machine (the shared one reached a load average of ~37) needs longer than Ray's default wait.
multihost.ENV["RAY_raylet_start_wait_time_s"] = "180"
ENV = multihost.ENV
RATES = {"1Gbit": 1e9 / 8, "200Mbit": 200e6 / 8}
HIDDEN = {"55k": (64, 64), "269k": (256, 256)}
FEATURES, CLASSES = 784, 10

# (hosts, rate, model): used to fit, or held out to check
POINTS = [(1, None, "55k", "fit"), (1, None, "269k", "fit"),
          (2, "1Gbit", "55k", "fit"), (2, "1Gbit", "269k", "fit"),
          (2, "200Mbit", "55k", "fit"), (2, "200Mbit", "269k", "fit"),
          (3, "1Gbit", "269k", "fit"), (3, "200Mbit", "55k", "fit"),
          (3, "1Gbit", "55k", "check"), (3, "200Mbit", "269k", "check"),
          (4, "1Gbit", "55k", "check"), (4, "1Gbit", "269k", "check"),
          (4, "200Mbit", "55k", "check"), (4, "200Mbit", "269k", "check")]

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


def spec_for(hosts: int, model: str, steps: int, shard_rows: int) -> dict:
    return {"name": f"scaling-{hosts}-{model}", "seed": 0,
            "data": {"source": "synthetic", "samples": max(4096, 2 * hosts * shard_rows), "features": FEATURES,
                     "classes": CLASSES, "validation_split": 0.0, "shards": hosts},
            "model": {"hidden": list(HIDDEN[model])},
            "training": {"batch_size": shard_rows * hosts, "steps": steps, "dtype": "float32", "eval_every": 0,
                         "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
            "resources": {"workers": hosts, "pin_cores": False}}


def shape_for(hosts: int, model: str, shard_rows: int) -> JobShape:
    return JobShape((FEATURES, *HIDDEN[model], CLASSES), True, 4, shard_rows * hosts, hosts)


def shape_links(nets: Namespaces, rate: str | None) -> None:
    """Both directions of every host's link at `rate` (None: unshaped)."""
    for i, ns in enumerate(nets.names):
        for prefix, dev in (([], f"spbv{i}"), (nets.prefix(i), f"spbp{i}")):
            subprocess.run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)
            if rate is not None:
                bits = RATES[rate] * 8
                burst = max(16_000, int(RATES[rate] / 1000))  # 1 ms of the rate, at least ~10 packets
                sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{bits:.0f}bit",
                   "burst", str(burst), "latency", "200ms")


def no_gso(nets: Namespaces) -> None:
    for i in range(len(nets.names)):
        for prefix, dev in (([], f"spbv{i}"), (nets.prefix(i), f"spbp{i}")):
            sh(*prefix, "ip", "link", "set", "dev", dev, "gso_max_size", "1500")


def ping_ms(nets: Namespaces) -> float | None:
    """Median round trip host 1 -> host 0, in ms."""
    if len(nets.names) < 2:
        return None
    done = subprocess.run(nets.prefix(1) + ["ping", "-c", "20", "-i", "0.05", "-q", f"{SUBNET}.1"],
                          capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if "min/avg" in x]
    return float(line[0].split("=")[1].split("/")[1]) if line else None


class Cluster:
    """N namespace hosts, a `ray start` each (1 CPU), and a driver in host 0."""

    def __init__(self, hosts: int, work: Path):
        self.hosts, self.work = hosts, work
        work.mkdir(parents=True, exist_ok=True)
        self.nets = Namespaces(hosts).__enter__()
        port = 7379 + os.getpid() % 1000
        head = f"{SUBNET}.1"
        self.setup = Setup(f"{hosts} hosts", f"{head}:{port}", self.nets.prefix(0))
        self.driver = None
        try:
            no_gso(self.nets)
            self.setup.start_ray(["--head", f"--port={port}", "--num-cpus=1", f"--node-ip-address={head}",
                                  f"--temp-dir={work / f'r{hosts}'}"], work / f"h{hosts}-0.log", self.nets.prefix(0))
            for i in range(1, hosts):
                self.setup.start_ray([f"--address={head}:{port}", "--num-cpus=1",
                                      f"--node-ip-address={SUBNET}.{i + 1}"], work / f"h{hosts}-{i}.log",
                                     self.nets.prefix(i))
            self.setup.wait_cpus(hosts)
            self.rtt_ms = ping_ms(self.nets)
            self.driver = subprocess.Popen(self.nets.prefix(0) + [sys.executable, "-c", DRIVER, self.setup.address],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
                                           cwd=ROOT, start_new_session=True)
            self._read()
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.hosts} hosts: the driver ended ({self.driver.wait()})")
        return json.loads(line)

    def run(self, rate: str | None, model: str, steps: int, shard_rows: int, warmup: int) -> dict:
        shape_links(self.nets, rate)
        job = self.work / f"job-{time.monotonic_ns()}"
        self.driver.stdin.write(json.dumps({"spec": spec_for(self.hosts, model, steps, shard_rows),
                                            "dir": str(job), "warmup": warmup}) + "\n")
        self.driver.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.driver is not None:  # by pid, then the raylets by theirs
            self.driver.stdin.close()
            try:
                self.driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.driver.pid, 9)
                self.driver.wait()
        self.setup.close()
        self.nets.__exit__()


def started(hosts: int, work: Path, tries: int = 3) -> Cluster:
    """A cluster, tried again if `ray start` timed out (it does, on a loaded machine)."""
    for attempt in range(tries):
        try:
            return Cluster(hosts, work / f"try{attempt}")
        except RuntimeError as err:
            print(f"{hosts} hosts, attempt {attempt + 1}: {str(err)[:300]}", file=sys.stderr, flush=True)
    raise RuntimeError(f"{hosts} hosts: no cluster after {tries} attempts")


# ---------------------------------------------------------------- the fit


def _terms(r: dict, cal: Calibration, shard_rows: int) -> tuple[float, list[float]]:
    """A point's known part (its measured compute, the model's reduce+apply
    and latency) and the coefficients of the fitted constants (c0, c_n,
    alpha, 1/eta)."""
    hosts = r["hosts"]
    shape = shape_for(hosts, r["model"], shard_rows)
    known = (r["phases"]["compute"] + cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters
             + (2 * cal.latency_hops * r["latency_s"] if hosts > 1 else 0.0))
    remote = hosts > 1
    return known, [1.0, float(hosts - 1), 2.0 * remote, bytes_per_step(shape, hosts).total / r["rate_bytes_s"]]


def calibrate(rows: list[dict], shard_rows: int) -> Calibration:
    """F from the 1-host points' compute phase, rho from every point's
    reduce+apply phase, then c0, c_n, alpha and eta by least squares on the
    `fit` points, each point's compute taken as measured (the shared
    machine's load moves compute far more than the network terms)."""
    ones = [r for r in rows if r["hosts"] == 1]
    flop_rate = statistics.median(shape_for(1, r["model"], shard_rows).shard_flops() / r["phases"]["compute"]
                                  for r in ones)
    rho = statistics.median(r["phases"]["reduce_apply"] / ((r["hosts"] + 1) * shape_for(
        r["hosts"], r["model"], shard_rows).parameters) for r in rows)
    cal = replace(FITTED, flop_rate=flop_rate, reduce_s_per_value=rho)
    a, b = [], []
    for r in (r for r in rows if r["use"] == "fit"):
        known, coef = _terms(r, cal, shard_rows)
        a.append(coef)
        b.append(r["step_s"] - known)
    (c0, cn, alpha, inv_eta), *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    return replace(cal, step_overhead_s=float(c0), per_node_s=float(cn), per_transfer_s=float(alpha),
                   link_efficiency=float(1.0 / inv_eta))


def predict(r: dict, cal: Calibration, shard_rows: int) -> tuple[float, float]:
    """The model's step for a point: with its measured compute, and with the
    compute from its FLOPs (stretched by the hosts sharing CORES cores)."""
    shape = shape_for(r["hosts"], r["model"], shard_rows)
    step = parameter_server_step(shape, Network(r["hosts"], r["rate_bytes_s"], r["latency_s"]), cal,
                                 contention=max(1.0, r["hosts"] / CORES))
    return step.total_s - step.compute_s + r["phases"]["compute"], step.total_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the step time")
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--hosts", default="1,2,3,4")
    ap.add_argument("--json", help="write the points and the fit here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/scaling.py needs root (namespaces, tc)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="spscale-"))
    rows = []
    for hosts in map(int, args.hosts.split(",")):
        points = [p for p in POINTS if p[0] == hosts]
        cluster = started(hosts, work)
        try:
            runs: dict[int, list[dict]] = {i: [] for i in range(len(points))}
            for rnd in range(args.rounds):
                order = list(range(len(points)))
                for i in (order if rnd % 2 == 0 else order[::-1]):
                    _, rate, model, _ = points[i]
                    got = cluster.run(rate, model, args.steps, args.shard_rows, args.warmup)
                    runs[i].append(got)
                    print(f"{hosts} hosts {rate or 'unshaped'} {model} round {rnd + 1}: "
                          f"{got['step_s'] * 1e3:.1f} ms {got['placement']}", file=sys.stderr, flush=True)
            for i, (_, rate, model, use) in enumerate(points):
                got = runs[i]
                rows.append({"hosts": hosts, "rate": rate or "unshaped", "model": model, "use": use,
                             "rate_bytes_s": RATES[rate] if rate else 1e12,
                             "latency_s": (cluster.rtt_ms or 0.0) / 2e3, "rtt_ms": cluster.rtt_ms,
                             "step_s": statistics.median(g["step_s"] for g in got),
                             "rounds_s": [g["step_s"] for g in got],
                             "phases": {k: statistics.median(g["phases"][k] for g in got) for k in got[0]["phases"]},
                             "placement": got[-1]["placement"]})
        finally:
            cluster.close()
    cal = calibrate(rows, args.shard_rows)
    print(f"\nfitted: {json.dumps(asdict(cal))}\n")
    print("| hosts | link | parameters | used to | measured (ms) | rounds (ms) | model, compute as measured (ms) "
          "| error | model, compute from FLOPs (ms) | error | compute | transfer | reduce+apply |")
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["model_s"], r["model_flops_s"] = predict(r, cal, args.shard_rows)
        r["error"], r["error_flops"] = r["model_s"] / r["step_s"] - 1, r["model_flops_s"] / r["step_s"] - 1
        ph = r["phases"]
        print(f"| {r['hosts']} | {r['rate']} | {r['model']} | {r['use']} | {r['step_s'] * 1e3:.1f} | "
              f"{' / '.join(f'{t * 1e3:.1f}' for t in r['rounds_s'])} | {r['model_s'] * 1e3:.1f} | "
              f"{r['error'] * 100:+.0f}% | {r['model_flops_s'] * 1e3:.1f} | {r['error_flops'] * 100:+.0f}% | "
              f"{ph['compute'] * 1e3:.1f} | {ph['transfer'] * 1e3:.1f} | {ph['reduce_apply'] * 1e3:.1f} |")
    checks = [abs(r["error"]) for r in rows if r["use"] == "check"]
    if checks:
        print(f"\nheld-out points, compute as measured: median |error| {statistics.median(checks) * 100:.0f}%, "
              f"largest {max(checks) * 100:.0f}%")
    print(f"ping RTT host 1 -> 0 (ms, by hosts): { {r['hosts']: r['rtt_ms'] for r in rows if r['rtt_ms']} }; "
          f"load average at the end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": asdict(cal), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
