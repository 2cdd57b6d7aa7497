"""Fit and check the step-time model (core/scaling.py) on 1, 2, 3 and 4 namespace hosts.

One invocation measures every point and fits. For each host count N (in the
order 1, 2, 4, 3) a cluster of exactly N network namespaces
(tests/netns_cluster.py under bench/multihost.py's names: `spbench-h<i>`,
bridge `spbenchbr`, 10.251.77.0/24), each one `ray start` with 1 CPU, so
that an N-worker job puts one worker on every host (Ray's SPREAD); the
driver runs in host 0's namespace. With N > 1 every host is joined through
our link emulator (tests/link_emulator.py: this kernel has no `netem`): a
frame leaving a host waits L ms, so node to node is L one way plus the
relays' own; the round trip is probed by TCP connects (the hosts have no
ping) after each change and L taken as half of it. Every link is also
shaped in both directions with `tc ... tbf` at the point's rate (GSO off,
so that tbf sees MTU-sized packets). On the 2-host cluster a raw TCP
stream (no Ray) is timed at each rate and latency too: what the wire gives.

A point is (hosts N, shards per worker, link rate, latency, model). Its job:
N workers, N or 2N shards of `--shard-rows` rows, float32, sgd with
momentum, no evaluation or checkpoints, one parameter server; its step time
is the mean gap between the steady steps' results at the driver (steps
after `--warmup`). Within a cluster the points are interleaved, their order
reversed every other round, `--rounds` rounds (fewer if the cluster's share
of `--budget-min` is spent; the JSON says how many), and the median kept,
with where Ray put the servers (the model counts the latencies from it).

The fit (`calibrate`): F and rho from the 1-host points (shared files, so
their reduce+apply phase holds no transfer: across nodes it includes the
servers' pulls of the rows), then c0, c_w, alpha, 1/eta and mu by
non-negative least squares on the `fit` points, each point's compute taken
as measured and h L counted from its placement; a point's bytes go at the
link's pace or the software's (mu), whichever is slower. Fit: 1, 2 and 4 hosts;
held out: every 3-host point. 1/eta and mu are seen through the two rates
(one where the link sets the pace, one where the software does), c0
against alpha through the 1-host points (no pull phase), c_w through 1, 2
and 4 workers, the bytes against c_w through the two models and the points
of 2 shards per worker. Also reported: the fit on 1-3 hosts predicting
the 4-host points, and h fitted freely, against the count.

The machine has 2 cores: with 3 or 4 hosts of 1 CPU each the workers share
them (and the relays, the servers and the driver take their share), so the
compute term from FLOPs is stretched by max(1, N / 2) here (`contention`);
projections assume cores of their own.

    .venv/bin/python bench/scaling.py [--rounds 3] [--steps 24] [--warmup 6] [--budget-min 25] [--json scaling.json]
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from tests.link_emulator import DIRECTIONS, LinkShape  # noqa: E402
from tests.netns_cluster import BENCH, ENV, GCS_PORT, NetnsCluster  # noqa: E402

from core.scaling import (FITTED, Calibration, JobShape, Network, Placement, bytes_per_step,  # noqa: E402
                          latency_hops, parameter_server_step, spans_nodes)

CORES = 2  # this machine's
RATES = {"1Gbit": 1e9 / 8, "200Mbit": 200e6 / 8}
LATENCIES_MS = (0.1, 1.0)  # shaped on leaving each host
HIDDEN = {"55k": (64, 64), "269k": (256, 256)}
FEATURES, CLASSES = 784, 10
HOSTS = (1, 2, 4, 3)  # the clusters, in the order measured (the held-out one last)
HELD_OUT_HOSTS = 3


def points(hosts: int) -> list[dict]:
    """The points of an N-host cluster. One host: the two models (no link
    is crossed, so no rate or latency). More: every rate x latency x model
    with one shard per worker, and two points of two shards per worker."""
    use = "check" if hosts == HELD_OUT_HOSTS else "fit"
    if hosts == 1:
        return [dict(hosts=1, per_worker=1, rate=None, latency_ms=None, model=m, use="fit") for m in HIDDEN]
    got = [dict(hosts=hosts, per_worker=1, rate=r, latency_ms=lat, model=m, use=use)
           for r in RATES for lat in LATENCIES_MS for m in HIDDEN]
    return got + [dict(hosts=hosts, per_worker=2, rate="1Gbit", latency_ms=LATENCIES_MS[0], model="55k", use=use),
                  dict(hosts=hosts, per_worker=2, rate="200Mbit", latency_ms=LATENCIES_MS[1], model="55k", use=use)]


def key(p: dict) -> tuple:
    return (p["hosts"], p["per_worker"], p["rate"] or "", p["latency_ms"] or 0.0, p["model"])


DRIVER = """
import json, statistics, sys, time
import ray
from core.spec import parse_spec
from workers.coordinator import Coordinator
from workers.runtime import connect_ray
connect_ray(sys.argv[1], 1)
print(json.dumps({"ready": True, "node": ray.get_runtime_context().get_node_id()}), flush=True)
for line in sys.stdin:
    raw = json.loads(line)
    arrived, where, graphs = [], {}, []
    coord = None
    def on_step(record):
        arrived.append(time.perf_counter())
        if not where:
            where.update(workers=[w["node_id"] for w in coord.worker_locations],
                         servers=[s["node_id"] for s in coord.server_locations])
        on_step.records.append(record)
    on_step.records = []
    def on_event(event):
        if getattr(event, "kind", "") == "graph":
            graphs.append(event.transport)
    began = time.perf_counter()
    try:
        coord = Coordinator(parse_spec(raw["spec"]), raw["dir"], on_step=on_step, on_event=on_event)
        coord.run()
    except Exception as err:  # one failed job is a lost run, not a lost benchmark
        print(json.dumps({"error": f"{type(err).__name__}: {err}"[:2000]}), flush=True)
        continue
    w = raw["warmup"]
    steady = on_step.records[w:]
    phases = {k: statistics.median(r["phases"][k] for r in steady) for k in steady[0]["phases"]}
    print(json.dumps({"step_s": (arrived[-1] - arrived[w]) / (len(arrived) - 1 - w), "phases": phases,
                      "placement": where, "transport": graphs, "job_s": time.perf_counter() - began}), flush=True)
"""


def spec_for(p: dict, steps: int, shard_rows: int) -> dict:
    workers, shards = p["hosts"], p["hosts"] * p["per_worker"]
    return {"name": f"scaling-{workers}-{shards}-{p['model']}", "seed": 0,
            "data": {"source": "synthetic", "samples": max(4096, 2 * shards * shard_rows), "features": FEATURES,
                     "classes": CLASSES, "validation_split": 0.0, "shards": shards},
            "model": {"hidden": list(HIDDEN[p["model"]])},
            "training": {"batch_size": shard_rows * shards, "steps": steps, "dtype": "float32", "eval_every": 0,
                         "checkpoint_every": 0, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
            "resources": {"workers": workers, "pin_cores": False}}


def shape_for(r: dict, shard_rows: int) -> JobShape:
    shards = r["hosts"] * r["per_worker"]
    return JobShape((FEATURES, *HIDDEN[r["model"]], CLASSES), True, 4, shard_rows * shards, shards)


def links(nets: NetnsCluster, i: int) -> list[tuple[list[str], str]]:
    """Host i's link: (command prefix, device) for its bridge end and its own end."""
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

WIRE_PORT = 18_999  # in host 0's own namespace
WIRE_RX = """
import socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(20)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(20)
got, began = 0, None
while True:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    began = began or time.perf_counter()
    got += len(chunk)
print(got, time.perf_counter() - began, flush=True)
"""
WIRE_TX = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
conn.sendall(bytes(int(sys.argv[3])))
conn.close()
"""
WIRE_BYTES = 4 << 20


def rtt_ms(nets: NetnsCluster) -> float | None:
    """Median TCP connect time host 1 -> host 0 (one round trip), in ms
    (the hosts have no ping)."""
    if len(nets.names) < 2:
        return None
    done = subprocess.run(nets.prefix(1) + [sys.executable, "-c", RTT_PROBE, nets.ip(0), str(GCS_PORT)],
                          capture_output=True, text=True, timeout=60)
    return float(done.stdout) if done.returncode == 0 else None


def wire_goodput(nets: NetnsCluster) -> float | None:
    """Bytes/s of one raw TCP stream of WIRE_BYTES host 1 -> host 0 (from the
    first byte in to the end), as the links are shaped now; None if it failed."""
    rx = subprocess.Popen(nets.prefix(0) + [sys.executable, "-c", WIRE_RX, nets.ip(0), str(WIRE_PORT)],
                          stdout=subprocess.PIPE, text=True)
    try:
        if rx.stdout.readline().strip() != "ready":
            return None
        subprocess.run(nets.prefix(1) + [sys.executable, "-c", WIRE_TX, nets.ip(0), str(WIRE_PORT), str(WIRE_BYTES)],
                       capture_output=True, timeout=60)
        out, _ = rx.communicate(timeout=60)
        got, seconds = out.split()
        return int(got) / float(seconds) if int(got) == WIRE_BYTES else None
    except (subprocess.TimeoutExpired, ValueError):
        return None
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()


class Cluster:
    """`hosts` namespace hosts of tests/netns_cluster.py under the bench's
    names, 1 CPU each, and a driver in host 0; with more than one, every
    host's link goes through the link emulator, so that `set_latency` can
    delay it. A job of N workers lands them on the N hosts (Ray's SPREAD);
    its servers go where Ray puts them, and each run records where."""

    def __init__(self, hosts: int, work: Path):
        self.hosts, self.work = hosts, work
        work.mkdir(parents=True, exist_ok=True)
        self.nets = NetnsCluster([1] * hosts, BENCH, system_config={},
                                 emulated=range(hosts) if hosts > 1 else ()).__enter__()
        self.driver = None
        self.latency_ms: float | None = None
        self.rtt_ms: dict[str, float | None] = {}
        try:
            no_gso(self.nets)
            self.rtt_ms["unshaped"] = rtt_ms(self.nets)
            self.driver = subprocess.Popen(self.nets.prefix(0) + [sys.executable, "-c", DRIVER, self.nets.address],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**ENV, "SHARDPROP_STEP_GRAPH": "direct"},
                                           cwd=ROOT, start_new_session=True)
            self.driver_node = self._read()["node"]
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver ended ({self.driver.wait()})")
        return json.loads(line)

    def set_latency(self, latency_ms: float | None) -> None:
        """Every frame leaving a host waits `latency_ms`; the round trip is
        probed again (after the rate is set: tbf's queue is in it too)."""
        if self.hosts > 1 and latency_ms != self.latency_ms:
            for i in range(self.hosts):
                self.nets.shape(i, LinkShape(), LinkShape(delay_ms=latency_ms or 0.0))
            self.latency_ms = latency_ms

    def shape(self, rate: str | None, latency_ms: float | None) -> float | None:
        """Links at `rate` and `latency_ms`: the round trip (ms), probed once per setting."""
        if self.hosts == 1:
            return None
        shape_links(self.nets, rate)
        self.set_latency(latency_ms)
        setting = f"{rate} +{latency_ms} ms"
        if setting not in self.rtt_ms:
            self.rtt_ms[setting] = rtt_ms(self.nets)
        return self.rtt_ms[setting]

    def relay_losses(self) -> int:
        """Frames the link emulators dropped so far (queue full, or undelivered), all links, both ways."""
        if self.hosts == 1:
            return 0
        counts = [self.nets.link_counts(i) for i in range(self.hosts)]
        return sum(c[d]["overflow"] + c[d]["undelivered"] + c[d]["dropped"] for c in counts for d in DIRECTIONS)

    def run(self, p: dict, steps: int, shard_rows: int, warmup: int) -> dict:
        rtt = self.shape(p["rate"], p["latency_ms"])
        lost = self.relay_losses()
        job = self.work / f"job-{time.monotonic_ns()}"
        self.driver.stdin.write(json.dumps({"spec": spec_for(p, steps, shard_rows), "dir": str(job),
                                            "warmup": warmup}) + "\n")
        self.driver.stdin.flush()
        got = self._read()
        shutil.rmtree(job, ignore_errors=True)
        if "error" in got:
            return got
        place = got.pop("placement")
        servers = place["servers"][0]
        got["placement"] = asdict(Placement(servers_with_driver=servers == self.driver_node,
                                            worker_with_servers=servers in place["workers"],
                                            worker_with_driver=self.driver_node in place["workers"]))
        got["worker_nodes"] = len(set(place["workers"]))
        got["rtt_ms"], got["load"] = rtt, os.getloadavg()[0]
        got["relay_lost_frames"] = self.relay_losses() - lost
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


def placement_of(r: dict) -> Placement:
    return Placement(**r["placement"])


def _terms(r: dict, cal: Calibration, shard_rows: int, link_bound: bool = True,
           free_h: bool = False) -> tuple[float, list[float]]:
    """A point's known part (its measured compute, the model's reduce+apply,
    and h L counted from its placement unless `free_h`) and the
    coefficients of the fitted constants (c0, c_w, alpha, 1/eta, mu[, h]):
    its bytes go at the link's pace when `link_bound`, else at mu's."""
    shape = shape_for(r, shard_rows)
    place = placement_of(r)
    tcp = spans_nodes(r["hosts"], place)
    moved = bytes_per_step(shape, r["hosts"], place.worker_with_servers).total if tcp else 0
    latency = r["latency_s"] if tcp else 0.0
    hops = latency_hops(r["hosts"], place, shape.servers)
    known = r["phases"]["compute"] + cal.reduce_s_per_value * (shape.shards + 1) * shape.parameters
    coef = [1.0, float(r["hosts"]), 2.0 * tcp,
            moved / r["rate_bytes_s"] if link_bound else 0.0, 0.0 if link_bound else float(moved)]
    if free_h:
        coef.append(latency)
    else:
        known += hops * latency
    return known, coef


def calibrate(rows: list[dict], shard_rows: int, fit: str = "fit", free_h: bool = False) -> tuple[Calibration, float]:
    """F and rho from the 1-host points (shared files: their reduce+apply
    holds no transfer), then c0, c_w, alpha, 1/eta and mu by non-negative
    least squares on the points whose `use` is `fit` (or, with
    fit="hosts<=3", those of 1-3 hosts), each point's compute taken as
    measured. A point's bytes go at the link's pace or at mu's, whichever
    is slower (core.scaling.seconds_per_byte): for each split of the rates
    into link-bound (the slower ones) and software-bound the fit is linear;
    the split kept is the one whose constants agree with it (1 / (eta B) >=
    mu exactly on its link-bound rates) with the least residual. Returns
    the calibration and, with `free_h`, the fitted h."""
    ones = [r for r in rows if r["hosts"] == 1]
    flop_rate = statistics.median(shape_for(r, shard_rows).shard_flops() / r["phases"]["compute"] for r in ones)
    rho = statistics.median(r["phases"]["reduce_apply"] / ((shape_for(r, shard_rows).shards + 1)
                                                           * shape_for(r, shard_rows).parameters) for r in ones)
    cal = replace(FITTED, flop_rate=flop_rate, reduce_s_per_value=rho)
    chosen = [r for r in rows if (r["use"] == "fit" if fit == "fit" else r["hosts"] <= 3)]
    rates = sorted({r["rate_bytes_s"] for r in chosen if r["rate"] is not None})
    fits = []
    for split in range(len(rates) + 1):  # rates[:split] link-bound
        a, b = [], []
        for r in chosen:
            known, coef = _terms(r, cal, shard_rows, r["rate_bytes_s"] in rates[:split], free_h)
            a.append(coef)
            b.append(r["step_s"] - known)
        # Non-negative least squares: every constant is a cost, and with few
        # noisy points plain least squares can make one negative (an
        # efficiency below zero) to chase the noise.
        x, residual = nnls(np.array(a), np.array(b))
        inv_eta, mu = x[3], x[4]
        agrees = all((rate * mu <= inv_eta) == (rate in rates[:split]) for rate in rates) and \
            (inv_eta > 0 or split == 0)
        fits.append((not agrees, residual, split, x))
    _, _, split, x = min(fits, key=lambda f: (f[0], f[1]))
    c0, cw, alpha, inv_eta, mu = (float(v) for v in x[:5])
    cal = replace(cal, step_overhead_s=c0, per_worker_s=cw, per_transfer_s=alpha, per_byte_s=mu,
                  link_efficiency=1.0 / inv_eta if inv_eta > 0 else float("inf"))
    return cal, (float(x[5]) if free_h else float("nan"))


def predict(r: dict, cal: Calibration, shard_rows: int) -> tuple[float, float]:
    """The model's step for a point: with its measured compute, and with the
    compute from its FLOPs (stretched by the workers sharing CORES cores)."""
    shape = shape_for(r, shard_rows)
    step = parameter_server_step(shape, Network(r["hosts"], r["rate_bytes_s"], r["latency_s"]), cal,
                                 contention=max(1.0, r["hosts"] / CORES), placement=placement_of(r))
    return step.total_s - step.compute_s + r["phases"]["compute"], step.total_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=6, help="steps left out of the step time")
    ap.add_argument("--shard-rows", type=int, default=256)
    ap.add_argument("--hosts", type=int, nargs="+", default=list(HOSTS), help="the clusters to measure, in order")
    ap.add_argument("--budget-min", type=float, default=25.0,
                    help="wall-clock budget: a cluster starts another round only within its share")
    ap.add_argument("--json", help="write the points and the fit here")
    ap.add_argument("--rows", help="fit again the points of an earlier --json, without measuring")
    args = ap.parse_args()
    if args.rows:
        saved = json.loads(Path(args.rows).read_text())
        report(saved["rows"], args, saved.get("meta", {}))
        return 0
    if os.geteuid() != 0:
        print("bench/scaling.py needs root (namespaces, tc)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="spscale-"))
    meta = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_start": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "rows")}}
    try:
        rows = measure(args, work, meta)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta.update(ended=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_end=os.getloadavg())
    if args.json:  # before the fit, so that a failed fit loses no measurement
        Path(args.json).write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    report(rows, args, meta)
    return 0


def measure(args, work: Path, meta: dict) -> list[dict]:
    """Every point's median step and phases, cluster by cluster, the points
    of a cluster interleaved over its rounds."""
    runs: dict[tuple, list[dict]] = {}
    began = time.monotonic()
    budget = args.budget_min * 60
    weight = {n: len(points(n)) * n for n in args.hosts}  # a round's rough cost
    print(f"{sum(len(points(n)) for n in args.hosts) * args.rounds} runs at most, in {args.budget_min:g} min",
          file=sys.stderr, flush=True)
    meta.update(rounds={}, rtt_ms={}, wire_bytes_s={}, cluster_s={})
    for h_index, hosts in enumerate(args.hosts):
        started = time.monotonic()
        cluster = Cluster(hosts, work / f"h{hosts}")
        try:
            if hosts == 2:  # the wire itself, no Ray: one raw TCP stream per setting
                for rate in RATES:
                    for lat in LATENCIES_MS:
                        cluster.shape(rate, lat)
                        meta["wire_bytes_s"][f"{rate} +{lat} ms"] = wire_goodput(cluster.nets)
            left = budget - (time.monotonic() - began)
            share = left * weight[hosts] / sum(weight[n] for n in args.hosts[h_index:])
            order = points(hosts)
            done = 0
            for rnd in range(args.rounds):
                round_began = time.monotonic()
                for p in (order if rnd % 2 == 0 else order[::-1]):
                    got = cluster.run(p, args.steps, args.shard_rows, args.warmup)
                    if "error" in got:
                        meta.setdefault("failed", []).append({**p, "round": rnd + 1, "error": got["error"]})
                        print(f"{hosts} hosts, {p}: the job failed: {got['error']}", file=sys.stderr, flush=True)
                        continue
                    runs.setdefault(key(p), []).append(got)
                    shaped = "" if p["rate"] is None else f" {p['rate']} +{p['latency_ms']} ms"
                    print(f"{hosts} hosts x {p['per_worker']} shard(s){shaped} {p['model']} round {rnd + 1}: "
                          f"{got['step_s'] * 1e3:.1f} ms, {got['transport']}, servers with driver "
                          f"{got['placement']['servers_with_driver']}, job {got['job_s']:.1f} s, "
                          f"{got['relay_lost_frames']} frames lost in the relays; "
                          f"load {got['load']:.1f}", file=sys.stderr, flush=True)
                    if args.json:  # the points so far, in case the run is cut short
                        Path(args.json + ".partial").write_text(json.dumps({"rows": _rows(runs), "meta": meta}))
                done += 1
                spent = time.monotonic() - started
                if rnd + 1 < args.rounds and spent + (time.monotonic() - round_began) > share:
                    print(f"{hosts} hosts: {done} round(s), its share of the budget ({share:.0f} s) spent",
                          file=sys.stderr, flush=True)
                    break
            meta["rounds"][str(hosts)] = done
            meta["rtt_ms"][str(hosts)] = dict(cluster.rtt_ms)
        finally:
            cluster.close()
        meta["cluster_s"][str(hosts)] = time.monotonic() - started
    return _rows(runs)


def _rows(runs: dict[tuple, list[dict]]) -> list[dict]:
    rows = []
    for k, got in sorted(runs.items(), key=lambda kv: kv[0]):
        hosts, per_worker, rate, lat, model = k
        p = next(p for p in points(hosts) if key(p) == k)
        # The servers' node varies from run to run: keep the runs of the commonest placement.
        placements = [json.dumps(g["placement"], sort_keys=True) for g in got]
        common = statistics.mode(placements)
        same = [g for g, pl in zip(got, placements) if pl == common]
        rtt = same[0]["rtt_ms"]
        rows.append({**p, "placement": json.loads(common), "runs_kept": len(same),
                     "rate_bytes_s": RATES[rate] if rate else 1.0, "latency_s": (rtt or 0.0) / 2e3, "rtt_ms": rtt,
                     "step_s": statistics.median(g["step_s"] for g in same),
                     "rounds_s": [g["step_s"] for g in got], "placements": placements,
                     "transport": sorted({t for g in got for t in g["transport"]}),
                     "load": [g["load"] for g in got], "job_s": statistics.median(g["job_s"] for g in got),
                     "relay_lost_frames": [g.get("relay_lost_frames", 0) for g in got],
                     "phases": {ph: statistics.median(g["phases"][ph] for g in same) for ph in same[0]["phases"]}})
    return rows


def _label(r: dict) -> str:
    if r["rate"] is None:
        return "one node"
    return f"{r['rate']} +{r['latency_ms']:g} ms ({r['latency_s'] * 1e3:.2f})"


def _placement_note(r: dict) -> str:
    place = placement_of(r)
    hops = latency_hops(r["hosts"], place)
    return f"{'with driver' if place.servers_with_driver else 'apart'}, h={hops}"


def report(rows: list[dict], args, meta: dict) -> None:
    cal, _ = calibrate(rows, args.shard_rows)
    print(f"\nfitted (1, 2 and 4 hosts): {json.dumps(asdict(cal))}\n")
    print("| hosts | shards | link, latency (L ms) | parameters | servers | used to | measured (ms) | rounds (ms) "
          "| model, compute as measured (ms) | error | model, compute from FLOPs (ms) | error | compute "
          "| reduce+apply |")
    print("|---|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["model_s"], r["model_flops_s"] = predict(r, cal, args.shard_rows)
        r["error"], r["error_flops"] = r["model_s"] / r["step_s"] - 1, r["model_flops_s"] / r["step_s"] - 1
        ph = r["phases"]
        print(f"| {r['hosts']} | {r['hosts'] * r['per_worker']} | {_label(r)} | {r['model']} | {_placement_note(r)} | "
              f"{r['use']} | {r['step_s'] * 1e3:.1f} | {' / '.join(f'{t * 1e3:.1f}' for t in r['rounds_s'])} | "
              f"{r['model_s'] * 1e3:.1f} | {r['error'] * 100:+.0f}% | {r['model_flops_s'] * 1e3:.1f} | "
              f"{r['error_flops'] * 100:+.0f}% | {ph['compute'] * 1e3:.1f} | {ph['reduce_apply'] * 1e3:.1f} |")
    checks = [abs(r["error"]) for r in rows if r["use"] == "check"]
    summary = {}
    if checks:
        summary["held_out"] = {"median_abs_error": statistics.median(checks), "largest_abs_error": max(checks),
                               "within_15": sum(c <= 0.15 for c in checks), "points": len(checks)}
        print(f"\nheld-out (3-host) points, compute as measured: median |error| "
              f"{statistics.median(checks) * 100:.0f}%, largest {max(checks) * 100:.0f}%, "
              f"{summary['held_out']['within_15']} of {len(checks)} within 15%")
    fours = [r for r in rows if r["hosts"] == 4]
    if fours and any(r["hosts"] == 3 for r in rows):
        cal3, _ = calibrate(rows, args.shard_rows, fit="hosts<=3")
        errs = [predict(r, cal3, args.shard_rows)[0] / r["step_s"] - 1 for r in fours]
        summary["fit_1_3_on_4"] = {"calibration": asdict(cal3), "errors": errs}
        print(f"fitted on 1-3 hosts: {json.dumps(asdict(cal3))}\n  predicts the 4-host points within "
              + ", ".join(f"{e * 100:+.0f}%" for e in errs))
    try:
        free, h = calibrate(rows, args.shard_rows, free_h=True)
        summary["free_h"] = {"h": h, "calibration": asdict(free)}
        print(f"h fitted freely (1, 2 and 4 hosts): {h:.1f} one-way latencies a step (counted: "
              f"{sorted({latency_hops(r['hosts'], placement_of(r)) for r in rows if r['hosts'] > 1})})")
    except (ValueError, IndexError) as err:
        print(f"h fitted freely: not possible ({err})")
    print(f"\nRTT host 1 -> host 0 (TCP connect, ms) by cluster and setting: {meta.get('rtt_ms')}")
    wire = meta.get("wire_bytes_s") or {}
    if wire:
        print("raw TCP stream host 1 -> host 0, 2-host cluster: "
              + ", ".join(f"{k}: {v * 8 / 1e6:.0f} Mbit/s" if v else f"{k}: failed" for k, v in wire.items()))
    print(f"rounds by cluster: {meta.get('rounds')}; seconds by cluster: "
          f"{ {k: round(v) for k, v in (meta.get('cluster_s') or {}).items()} }; "
          f"load average at start {meta.get('load_start')}, at end {meta.get('load_end')}; now {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": asdict(cal), "rows": rows, "meta": meta,
                                               "summary": summary}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
