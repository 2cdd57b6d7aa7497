"""A driver attached to a one-machine `ray start --head` cluster: the step
runs as actor calls on object refs with the parameters and gradients in the
job's files on /dev/shm (only handles through Ray), and gives the reference
bits with 1 and 2 servers, and after a worker is killed mid-run.

The head is our own (private port, its own --temp-dir) and is ended by its
pid, never by `ray stop`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.spec import parse_spec
from core.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

SPEC = {"name": "attached", "seed": 5, "data": {"source": "digits", "shards": 4, "validation_split": 0.2},
        "model": {"hidden": [32, 16], "activation": "tanh"},
        "training": {"batch_size": 101, "steps": 14, "dtype": "float32",
                     "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 1e-3},
                     "eval_every": 5, "checkpoint_every": 4},
        "resources": {"workers": 2}}

# Runs one job attached to argv[1]; argv[3] is a JSON object of resources to
# use and, under "kill_at", a step after which worker 0 is killed. Prints the
# graph events and writes the final parameters to argv[2]/params.npy.
DRIVER = """
import json, sys, threading
import numpy as np, ray
from core.spec import parse_spec
from workers.coordinator import Coordinator
from workers.runtime import connect_ray, started_here, kill_actor
connect_ray(sys.argv[1])
assert not started_here()
raw, extra = json.loads(sys.argv[3]), json.loads(sys.argv[4])
raw["resources"].update(extra.get("resources", {}))
graphs, box = [], {}
def on_step(record):
    if record["step"] == extra.get("kill_at"):
        kill_actor(box["c"]._job.pool.actors[0])
def on_event(e):
    if e.kind == "graph":
        graphs.append({"transport": e.transport, "nodes": e.nodes, "zero_copy": e.zero_copy})
c = box["c"] = Coordinator(parse_spec(raw), sys.argv[2] + "/run", on_event=on_event, on_step=on_step)
net = c.run()
np.save(sys.argv[2] + "/params.npy", net.params)
print(json.dumps(graphs))
"""


def run_attached(address: str, where: Path, **extra) -> tuple[list, np.ndarray]:
    where.mkdir()
    done = subprocess.run([sys.executable, "-c", DRIVER, address, str(where), json.dumps(SPEC), json.dumps(extra)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), np.load(where / "params.npy", allow_pickle=False)


def test_an_attached_driver_takes_the_direct_graph_on_one_node_and_gives_the_reference_bits(ray_head, tmp_path):
    reference, _ = train(parse_spec(SPEC))
    for servers in (1, 2):
        graphs, params = run_attached(ray_head.address, tmp_path / f"ps{servers}", resources={"parameter_servers": servers})
        assert graphs == [{"transport": "tcp", "nodes": 1, "zero_copy": True}]
        assert params.dtype == reference.params.dtype
        assert np.array_equal(params, reference.params), f"{servers} servers differ from the reference"


def test_an_attached_driver_recovers_a_killed_worker_with_the_reference_bits(ray_head, tmp_path):
    reference, _ = train(parse_spec(SPEC))
    graphs, params = run_attached(ray_head.address, tmp_path / "killed", kill_at=6)
    assert len(graphs) >= 2 and all(g == {"transport": "tcp", "nodes": 1, "zero_copy": True} for g in graphs)
    assert np.array_equal(params, reference.params)
