"""Jobs spanning the raylets of the test cluster move their arrays over the
TCP array transport (workers.transport), and end with the reference
trainer's bits, undisturbed and with a worker or a server killed mid-run."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from core.spec import parse_spec
from core.trainer import train
from workers.coordinator import Coordinator
from run_helpers import by_kind, fault_plan
from spec_helpers import place

pytestmark = [pytest.mark.ray, pytest.mark.cluster]


def spec(**fields):
    return parse_spec(place({
        "name": "tcp", "seed": 11,
        "data": {"source": "digits", "shards": 4},
        "model": {"hidden": [32]},
        "training": {"batch_size": 64, "steps": 12, "eval_every": 6, "checkpoint_every": 4,
                     "optimizer": {"name": "adam", "lr": 0.01}},
    }, **{"workers": 2, **fields}))


def run(job_spec, tmp_path, at_step=None, action=None):
    graphs, events, nodes = [], [], set()

    def on_step(record):
        nodes.update(w["node_id"] for w in coordinator.worker_locations)
        if record["step"] == at_step:
            action(coordinator)

    def on_event(kind, detail):
        events.append(kind)
        if kind == "graph":
            graphs.append(detail)

    coordinator = Coordinator(job_spec, tmp_path / "run", on_step=on_step, on_event=by_kind(on_event))
    return coordinator.run(), coordinator, graphs, events, nodes


@pytest.mark.parametrize("servers", [1, 2])
def test_a_job_across_nodes_sends_its_arrays_over_tcp_with_the_reference_bits(ray_cluster, tmp_path, servers):
    job_spec = spec(parameter_servers=servers)
    net, coordinator, graphs, _, nodes = run(job_spec, tmp_path)
    assert np.array_equal(net.params, train(job_spec)[0].params)
    assert [(g["transport"], g["zero_copy"], g["fallback"]) for g in graphs] == [("tcp", False, None)]
    assert graphs[0]["nodes"] >= 2
    assert len(nodes) == 2, "the workers shared a node"


@pytest.mark.chaos
@pytest.mark.parametrize("victim", ["worker", "server"])
def test_a_peer_killed_mid_run_over_tcp_is_recovered_with_the_reference_bits(ray_cluster, tmp_path, victim):
    job_spec = spec()

    def kill(c):
        location = c.worker_locations[1] if victim == "worker" else c.server_locations[0]
        os.kill(location["pid"], signal.SIGKILL)

    net, coordinator, graphs, events, _ = run(job_spec, tmp_path, 5, kill)
    assert np.array_equal(net.params, train(job_spec)[0].params)
    assert coordinator.counters.recoveries == 1 and "recovery" in events
    if victim == "worker":
        assert coordinator.counters.worker_failures == 1
    else:
        assert coordinator.counters.server_failures == 1
    assert len(graphs) == 2 and all(g["transport"] == "tcp" for g in graphs)


@pytest.mark.chaos
def test_a_cut_array_connection_with_every_actor_alive_makes_the_step_again(ray_cluster, tmp_path):
    """Worker 1's array service closes (its connections cut) once step 6's
    gradients are offered: the servers' pull fails though every actor still
    answers Ray, the step is made again over a new service, same bits."""
    job_spec = spec()
    graphs, events = [], []
    coordinator = Coordinator(job_spec, tmp_path / "run", start_worker=fault_plan({1: {"cut_arrays_at": 5}}),
                              on_event=by_kind(lambda kind, detail: (events.append(kind),
                                                                     kind == "graph" and graphs.append(detail))))
    net = coordinator.run()
    assert np.array_equal(net.params, train(job_spec)[0].params)
    assert coordinator.counters.recoveries == 1 and coordinator.counters.worker_failures == 0
    assert [g["transport"] for g in graphs] == ["tcp", "tcp"]


def test_with_the_transport_off_on_the_driver_the_arrays_go_through_the_object_store(ray_cluster, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("SHARDPROP_DATA_PORTS", "off")
    job_spec = spec()
    net, _, graphs, _, _ = run(job_spec, tmp_path)
    assert np.array_equal(net.params, train(job_spec)[0].params)
    assert [(g["transport"], g["zero_copy"], g["fallback"]) for g in graphs] == [
        ("object store", False, "SHARDPROP_DATA_PORTS=off where the job's driver runs")]
