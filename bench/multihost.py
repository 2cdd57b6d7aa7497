"""Step time of whole `shardprop train` runs: private Ray, an attached
one-machine `ray start` cluster, and 2 network-namespace hosts x 1 CPU.

The protocol of issue 15: a 784-256-256-10 network, batch 1024, 2 shards,
float32, 16,384 synthetic rows. Each setup runs `shardprop train` for N and
for 2N steps; its per-step time is (T(2N) - T(N)) / N (start-up, placement
and the final checkpoint cancel out), the median of `--rounds` rounds, the
setups interleaved within each round. Rows:

- private: `shardprop train --workers 2`, its own local Ray (compiled graph);
- attached: `--address` of a `ray start --head --num-cpus 2` on loopback,
  started here on a private port with its own --temp-dir;
- 2 hosts: two network namespaces joined by a bridge, `ray start --head`
  in one and `ray start --address` in the other, 1 CPU each, on the fixed
  ports of docs/deploy.md (tests/netns_cluster.py, the multihost tests'
  cluster, under this benchmark's own names and subnet); the driver runs in
  the head's namespace. The arrays go over the TCP array transport
  (workers/transport.py);
- 2 hosts, object store: the same cluster, the driver run with
  `SHARDPROP_DATA_PORTS=off`, so the arrays go through Ray's object store
  (the path before the transport), for comparison in the same run.

Then in-process runs per setup (`--phase-steps` steps each, `--phase-rounds`
of them interleaved, their figures' medians kept) report the median
phases of a step from the job's records: compute (slowest worker), transfer
(parameters out and gradients in: the slowest worker's idle time less the
servers' reduce and apply), reduce_apply, and the fastest worker's wait;
and the steady step itself: the median gap between the ends of successive
steps (the records' `finished_at`, steps after the first fifth), a step
time without the start-up and shut-down that the whole runs' difference
must cancel.

Every Ray started here is ended by its pid (never `ray stop`); the
namespaces, bridge and links are made here under names of our own and
removed at the end. The 2-host row needs root and `ip`; without them it says
why it was not run.

    .venv/bin/python bench/multihost.py [--steps 600] [--rounds 3] [--phase-steps 200] [--phase-rounds 1]
        [--only private,attached,2hosts]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.netns_cluster import BENCH, NetnsCluster, end_group, unavailable_reason  # noqa: E402
BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT),
       "SHARDPROP_STEP_GRAPH": "direct",  # across nodes too (docs/distributed.md)
       "RAY_USAGE_STATS_ENABLED": "0"}

SPEC = {
    "name": "multihost", "seed": 0,
    "data": {"source": "synthetic", "samples": 16384, "features": 784, "classes": 10,
             "validation_split": 0.0, "shards": 2},
    "model": {"hidden": [256, 256]},
    "training": {"batch_size": 1024, "dtype": "float32", "eval_every": 0, "checkpoint_every": 0,
                 "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}},
    "resources": {"workers": 2},
}

PHASES = """
import json, statistics, sys
from core.spec import parse_spec
from workers.coordinator import Coordinator
from workers.runtime import connect_ray
address = sys.argv[1] or None
raw = json.loads(sys.argv[2])
connect_ray(address, raw["resources"]["workers"])
records, graphs = [], []
Coordinator(parse_spec(raw), sys.argv[3], on_step=records.append,
            on_event=lambda e: graphs.append(f"{e.transport}{' zero-copy' if e.zero_copy else ''}, {e.nodes} node(s)")
            if e.kind == "graph" else None).run()
steady = records[len(records) // 5:]
phases = {k: statistics.median(r["phases"][k] for r in steady) for k in steady[0]["phases"]}
done = [r["finished_at"] for r in steady]
gaps = [b - a for a, b in zip(done, done[1:])]
gap = statistics.median(gaps)  # the steady step, as the driver sees steps end
mean = (done[-1] - done[0]) / (len(done) - 1)  # the same over the steady steps' span: their rate
print(json.dumps({"phases": phases, "step_gap_s": gap, "step_mean_s": mean, "gap_deciles": statistics.quantiles(gaps, n=10),
                  "graph": graphs[-1] if graphs else "?"}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Setup:
    """How to run a driver: a command prefix (a namespace) and a Ray address."""

    def __init__(self, name: str, address: str | None = None, prefix: list[str] | None = None,
                 env: dict | None = None):
        self.name, self.address, self.prefix = name, address, prefix or []
        self.env = {**ENV, **(env or {})}
        self.procs: list[subprocess.Popen] = []

    def train(self, steps: int, work: Path) -> float:
        """Seconds of one whole `shardprop train` run of `steps` steps."""
        job = work / f"{self.name}-{steps}-{time.monotonic_ns()}"
        job.mkdir()
        (job / "job.json").write_text(json.dumps({**SPEC, "training": {**SPEC["training"], "steps": steps}}))
        cmd = [str(BIN / "shardprop"), "train", str(job / "job.json"), "--out", str(job / "model.npz"),
               "--checkpoint-dir", str(job / "ckpt")]
        cmd += ["--address", self.address] if self.address else ["--workers", "2"]
        began = time.perf_counter()
        done = subprocess.run(self.prefix + cmd, capture_output=True, text=True, env=self.env, cwd=job, timeout=3600)
        seconds = time.perf_counter() - began
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: shardprop train failed ({done.returncode}): {done.stderr[-2000:]}")
        shutil.rmtree(job, ignore_errors=True)
        return seconds

    def phases(self, steps: int, work: Path) -> dict:
        job = work / f"{self.name}-phases"
        raw = {**SPEC, "training": {**SPEC["training"], "steps": steps}}
        done = subprocess.run(self.prefix + [sys.executable, "-c", PHASES, self.address or "", json.dumps(raw), str(job)],
                              capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: phase run failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.splitlines()[-1])

    def start_ray(self, args: list[str], log: Path, prefix: list[str] | None = None, timeout: float = 120.0) -> None:
        head = ["--include-dashboard=false"] if "--head" in args else []
        proc = subprocess.Popen((prefix or []) + [str(BIN / "ray"), "start", *args, *head, "--disable-usage-stats",
                                                  "--block"],
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        self.procs.append(proc)
        end = time.monotonic() + timeout
        while "Ray runtime started" not in log.read_text(errors="replace"):  # before anyone attaches
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{self.name}: ray start did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)

    def wait_cpus(self, cpus: int, timeout: float = 60.0) -> None:
        """Until the cluster has `cpus` CPUs (asked from the driver's side)."""
        probe = ("import ray,sys,time\nray.init(address=sys.argv[1],log_to_driver=False)\n"
                 "end=time.time()+float(sys.argv[3])\n"
                 "while ray.cluster_resources().get('CPU',0)<float(sys.argv[2]) and time.time()<end: time.sleep(0.5)\n"
                 "print(ray.cluster_resources().get('CPU',0))")
        done = subprocess.run(self.prefix + [sys.executable, "-c", probe, self.address, str(cpus), str(timeout)],
                              capture_output=True, text=True, env=ENV, timeout=timeout + 60)
        got = float(done.stdout.split()[-1]) if done.returncode == 0 and done.stdout.split() else 0.0
        if got < cpus:
            raise RuntimeError(f"{self.name}: the cluster has {got:g} CPUs, not {cpus}: {done.stderr[-1500:]}")

    def close(self) -> None:
        for proc in reversed(self.procs):  # by pid (process group), never `ray stop`
            end_group(proc)


def attached(work: Path) -> Setup:
    port = free_port()
    setup = Setup("attached", f"127.0.0.1:{port}")
    setup.start_ray(["--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                     f"--temp-dir={work / 'ra'}"], work / "attached-head.log")
    try:
        setup.wait_cpus(2)
    except BaseException:
        setup.close()
        raise
    return setup


def two_hosts() -> tuple[list[Setup], NetnsCluster]:
    """Two namespace hosts of 1 CPU (tests/netns_cluster.py, under the bench's
    own names): arrays over TCP, and through the object store."""
    nets = NetnsCluster([1, 1], BENCH, system_config={}).__enter__()
    return [Setup("2 hosts x 1 CPU", nets.address, nets.prefix(0)),
            Setup("2 hosts x 1 CPU, object store", nets.address, nets.prefix(0), {"SHARDPROP_DATA_PORTS": "off"})], nets


def combined(runs: list[dict]) -> dict:
    """Phase runs of one setup as one: each figure's median, and every run's steady step."""
    return {"phases": {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]},
            "step_gap_s": statistics.median(r["step_gap_s"] for r in runs),
            "step_gaps_s": [r["step_gap_s"] for r in runs],
            "step_mean_s": statistics.median(r["step_mean_s"] for r in runs), "graph": runs[-1]["graph"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="N: runs of N and 2N steps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phase-steps", type=int, default=200, help="steps of the per-phase run (0: none)")
    ap.add_argument("--phase-rounds", type=int, default=1, help="phase runs per setup, interleaved")
    ap.add_argument("--only", default="private,attached,2hosts")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="spmh-"))
    setups: list[Setup] = []
    skipped: dict[str, str] = {}
    nets = None
    try:
        if "private" in only:
            setups.append(Setup("private 2-CPU local"))
        if "attached" in only:
            setups.append(attached(work))
        if "2hosts" in only:
            if unavailable_reason():
                skipped["2 hosts x 1 CPU"] = unavailable_reason()
            else:
                pair, nets = two_hosts()
                setups.extend(pair)
        times: dict[str, list[float]] = {s.name: [] for s in setups}
        for r in range(args.rounds):
            for s in (setups if r % 2 == 0 else setups[::-1]):
                short, long = s.train(args.steps, work), s.train(2 * args.steps, work)
                times[s.name].append((long - short) / args.steps)
                print(f"round {r + 1} {s.name}: T(N)={short:.2f} s T(2N)={long:.2f} s "
                      f"step {times[s.name][-1] * 1e3:.1f} ms", file=sys.stderr)
        runs: dict[str, list[dict]] = {s.name: [] for s in setups}
        for r in range(args.phase_rounds if args.phase_steps else 0):
            for s in (setups if r % 2 == 0 else setups[::-1]):
                runs[s.name].append(s.phases(args.phase_steps, work))
                print(f"phase run {r + 1} {s.name}: steady step {runs[s.name][-1]['step_gap_s'] * 1e3:.1f} ms",
                      file=sys.stderr)
        phases = {name: combined(got) for name, got in runs.items() if got}
    finally:
        for s in setups:
            s.close()
        if nets is not None:
            nets.close()
        shutil.rmtree(work, ignore_errors=True)
    step = {name: statistics.median(ts) if ts else None for name, ts in times.items()}
    base = step.get("private 2-CPU local")
    base_gap = phases.get("private 2-CPU local", {}).get("step_gap_s")
    print(f"\nN = {args.steps}, {args.rounds} rounds; per step (T(2N) - T(N)) / N, median; "
          f"phase runs of {args.phase_steps} steps, {args.phase_rounds} rounds, medians\n")
    print("| setup | step (ms) | rounds (ms) | speed vs private | steady step (ms) | steady rounds (ms) "
          "| steady vs private | compute | transfer | reduce+apply | wait | step graph |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, s in step.items():
        got = phases.get(name, {})
        ph = got.get("phases", {})
        cells = [f"{ph[k] * 1e3:.1f}" if k in ph else "" for k in ("compute", "transfer", "reduce_apply", "wait")]
        gap = got.get("step_gap_s")
        cells[:0] = [f"{gap * 1e3:.1f}" if gap is not None else "",
                     " / ".join(f"{g * 1e3:.1f}" for g in got.get("step_gaps_s", [])),
                     f"{base_gap / gap:.2f}x" if base_gap and gap else ""]
        whole = [f"{s * 1e3:.1f}" if s else "", " / ".join(f"{t * 1e3:.1f}" for t in times[name]),
                 f"{base / s:.2f}x" if base and s else ""]
        print(f"| {name} | " + " | ".join(whole + cells) + f" | {got.get('graph', '')} |")
        results.append({"setup": name, "step_s": s, "rounds_s": times[name],
                        "ratio": base / s if base and s else None,
                        "steady_ratio": base_gap / gap if base_gap and gap else None, **got})
    for name, why in skipped.items():
        print(f"| {name} | not run: {why} | | | | | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
