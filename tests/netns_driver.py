"""A job's driver on a namespace host (tests/test_multihost.py runs it there).

    python tests/netns_driver.py ADDRESS SPEC.json RESULT.json [--pause STEP:NAME ...]
        [--pause-placed NAME] [--servers-on IP] [--store STORE.db]

It runs one job through the Coordinator, attached to ADDRESS, and writes what
the test checks: the trained parameters (an .npy beside RESULT), each step
reported, each event with the time it came, every worker's location and the
counters. The test's faults land where it asks, through files in RESULT's
folder: at a pause the driver writes `at-NAME` and waits for `go-NAME`.

- `--pause STEP:NAME`: after step STEP is reported;
- `--pause-placed NAME`: once the first workers have started, before the
  pool asks them where they are (a cut there is a cut during placement);
- `--servers-on IP`: the parameter servers start on the node at IP while
  it is alive (a restore goes elsewhere once Ray has declared it dead): the
  fault of a server's host, on purpose.
- `--store STORE.db`: the job's step records and events also go to a job
  store (service/store.py), as the service's scheduler writes them.
- `--linger SECONDS`: once past its last pause, the driver takes SECONDS
  over each step's report (steps of this test job take milliseconds, and
  the pool looks for new capacity at most once a second, so a host that
  rejoins gets a worker only if some steps are left by then).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers import pool as pool_module  # noqa: E402
from workers import servers as servers_module  # noqa: E402
from workers.coordinator import Coordinator  # noqa: E402
from workers.runtime import connect_ray  # noqa: E402
from service.store import Store  # noqa: E402


def pause(folder: Path, name: str) -> None:
    (folder / f"at-{name}").write_text(str(time.time()))
    while not (folder / f"go-{name}").exists():
        time.sleep(0.1)


def servers_preferring(ip: str):
    """ParameterServer, placed on the node at `ip` while Ray holds it alive,
    anywhere once it is dead (Ray 2.60's soft node affinity was seen placing
    elsewhere with the node alive and idle, so it is not used)."""
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip)
    actor_class = servers_module.ParameterServer

    class Preferring:
        @staticmethod
        def options(**kw):
            if any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
                kw["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
            return actor_class.options(**kw)

    return Preferring


def pausing_at_placement(folder: Path, name: str, count: int):
    """A start_worker that, once `count` workers have been asked for, waits
    until they run and then pauses: the test cuts a host, and the pool's own
    question (`location`) meets the cut."""
    started = []

    def start(spec, index, data_roots, cpus, limits):
        actor = pool_module.start_gradient_worker(spec, index, data_roots, cpus, limits)
        started.append(actor)
        if len(started) == count:
            ray.get([a.location.remote() for a in started])
            pause(folder, name)
        return actor

    return start


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("spec")
    ap.add_argument("result")
    ap.add_argument("--pause", action="append", default=[])
    ap.add_argument("--pause-placed")
    ap.add_argument("--servers-on")
    ap.add_argument("--store")
    ap.add_argument("--linger", type=float, default=0.0)
    args = ap.parse_args()
    result = Path(args.result)
    folder = result.parent
    pauses = {int(step): name for step, name in (p.split(":") for p in args.pause)}
    raw = json.loads(Path(args.spec).read_text())
    connect_ray(args.address)
    if args.servers_on:
        servers_module.ParameterServer = servers_preferring(args.servers_on)
    steps, events, first_servers = [], [], []
    store = Store(args.store) if args.store else None
    job_id = store.create_job(raw)[0]["id"] if store else None

    def on_step(record: dict) -> None:
        steps.append(record["step"])
        if store:
            store.record_metric(job_id, record)
        if len(steps) == 1:
            first_servers.extend(coordinator.server_locations)
        if record["step"] in pauses:
            pause(folder, pauses[record["step"]])
        elif args.linger and pauses and record["step"] > max(pauses):
            time.sleep(args.linger)

    def on_event(event) -> None:
        events.append({"time": time.time(), "kind": event.kind, **asdict(event)})
        if store:
            store.record_event(job_id, event.kind, getattr(event, "step", None), event.detail())

    extra = {}
    if args.pause_placed:
        extra["start_worker"] = pausing_at_placement(folder, args.pause_placed, raw["resources"]["workers"])
    coordinator = Coordinator(raw, folder / "ckpt", on_step=on_step, on_event=on_event, **extra)
    net = coordinator.run()
    if store:
        store.close()
    np.save(folder / "params.npy", net.params, allow_pickle=False)
    # A host that was cut and rejoined is two nodes at one address, the dead
    # one and its successor: the living one is the host's now.
    nodes = {n["NodeManagerAddress"]: n["NodeID"] for n in sorted(ray.nodes(), key=lambda n: n["Alive"])}
    result.write_text(json.dumps({
        "steps": steps, "events": events, "locations": coordinator.locations,
        "servers": {"first": first_servers, "last": coordinator.server_locations},
        "counters": asdict(coordinator.counters),
        "nodes": nodes, "job_id": job_id}, default=list))
    return 0


if __name__ == "__main__":
    sys.exit(main())
