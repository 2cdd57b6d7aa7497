"""The step-time model (core/scaling.py) against values worked out by hand,
and `shardprop plan`'s output and errors.

The small case: layers 3 -> 4 -> 2 with biases, so P = 3*4 + 4 + 4*2 + 2 = 26
parameters; batch 10 in 3 shards (4 rows in the largest); on 2 nodes worker 0
computes shards 0 and 2, worker 1 shard 1.
"""

from __future__ import annotations

import pytest

from core.scaling import (Calibration, JobShape, Network, ObjectStoreCalibration, Placement, bytes_per_step,
                          latency_hops, object_store_step, parameter_server_step, plan, ring_bytes_per_node,
                          ring_step, shards_per_worker)
from service.cli import main
from service.plan_command import PlanError, parse_bandwidth, parse_latency

SMALL = JobShape(sizes=(3, 4, 2), bias=True, dtype_bytes=8, batch_size=10, shards=3)
# Round numbers so that every phase can be added up by hand.
CAL = Calibration(flop_rate=384.0, step_overhead_s=0.5, per_worker_s=0.25, per_transfer_s=0.125,
                  link_efficiency=0.5, per_byte_s=1 / 416, reduce_s_per_value=0.01)
STORE = ObjectStoreCalibration(step_overhead_s=0.5, per_node_s=0.25, per_transfer_s=0.125, latency_hops=2.0,
                               link_efficiency=0.5)
NET = Network(nodes=2, bandwidth_bytes_s=208.0, latency_s=0.1)


def test_parameters_and_bytes_per_step_from_count_and_dtype():
    assert SMALL.parameters == 26
    assert JobShape((3, 4, 2), False, 4, 10, 3).parameters == 20
    assert shards_per_worker(SMALL, 2) == [2, 1]
    moved = bytes_per_step(SMALL, 2)  # one remote node: the parameters once, its one shard's row back
    assert (moved.params_out, moved.grads_in, moved.total) == (26 * 8, 26 * 8, 416)
    five = JobShape((3, 4, 2), True, 4, 10, 5)  # shards [2, 2, 1] on 3 nodes: 2 remote nodes, 3 remote shards
    assert bytes_per_step(five, 3).params_out == 2 * 26 * 4
    assert bytes_per_step(five, 3).grads_in == 3 * 26 * 4
    assert bytes_per_step(SMALL, 1).total == 0
    assert bytes_per_step(SMALL, 8).params_out == 2 * 26 * 8  # only 3 workers: a node without a shard idles
    apart = bytes_per_step(SMALL, 2, colocated=False)  # servers on a node of their own: every worker is remote
    assert (apart.params_out, apart.grads_in) == (2 * 26 * 8, 3 * 26 * 8)


def test_ring_bytes_are_2_n_minus_1_over_n_of_the_vector():
    assert ring_bytes_per_node(SMALL, 4) == pytest.approx(2 * 3 / 4 * 26 * 8)
    assert ring_bytes_per_node(SMALL, 1) == 0


def test_shard_flops():
    # 4 rows: layer 0 forward + weight gradient 2 * (2*4*3*4), layer 1 also its input gradient 3 * (2*4*4*2)
    assert SMALL.shard_flops() == 192 + 192


@pytest.mark.parametrize("workers, placement, servers, hops", [
    (1, Placement(), 1, 0),  # everything on the driver's node: shared files, no network
    # servers and driver on one node, a worker elsewhere: the parameters to it (its pull waited
    # at the servers' service), its rows back (the servers' pull waited at its service)
    (2, Placement(), 1, 1 + 1),
    (4, Placement(), 2, 2),  # the remote workers' hops run at once; k servers beside the driver add none
    (2, Placement(worker_with_servers=False), 1, 2),
    # servers on worker 0's node, the driver on worker 1's: worker 1 is off the servers' node (2);
    # the driver is on no step's path
    (1, Placement(servers_with_driver=False), 1, 0 + 0),
    (2, Placement(servers_with_driver=False), 1, 2),
    (3, Placement(servers_with_driver=False), 1, 2),
    (3, Placement(servers_with_driver=False), 2, 2 + 2),  # reduce's finite flags to the driver, commit back
])
def test_latency_hops_counted_by_hand(workers, placement, servers, hops):
    assert latency_hops(workers, placement, servers) == hops


def test_parameter_server_step_by_hand():
    step = parameter_server_step(SMALL, NET, CAL)
    assert step.compute_s == pytest.approx(2.0)  # 2 shards of 384 FLOP at 384 FLOP/s
    # 2 latencies of 0.1; 2 pull phases of 0.125; 416 bytes at 0.5 * 208 bytes/s (the link is
    # slower than the software's 416 bytes/s, so it sets the pace)
    assert step.transfer_s == pytest.approx(0.2 + 0.25 + 4.0)
    assert step.reduce_apply_s == pytest.approx(0.01 * (3 + 1) * 26)
    assert step.overhead_s == pytest.approx(0.5 + 2 * 0.25)  # c0 and 2 workers' calls
    assert step.total_s == pytest.approx(8.49)
    fast = parameter_server_step(SMALL, Network(2, 2080.0, 0.1), CAL)  # a link of 1,040 bytes/s: software's pace
    assert fast.transfer_s == pytest.approx(0.2 + 0.25 + 416 / 416)
    assert parameter_server_step(SMALL, NET, CAL, contention=2.0).compute_s == pytest.approx(4.0)
    # servers on a node of their own: 1,040 bytes over their link
    apart = parameter_server_step(SMALL, NET, CAL, placement=Placement(worker_with_servers=False))
    assert apart.transfer_s == pytest.approx(0.2 + 0.25 + 10.0)
    sliced = JobShape((3, 4, 2), True, 8, 10, 3, cpus_per_worker=2, servers=2)
    two = parameter_server_step(sliced, NET, CAL)
    assert two.reduce_apply_s == pytest.approx(0.52)  # k slices reduce in parallel
    assert two.compute_s == pytest.approx(1.0)  # 2 shards at once on 2 CPUs
    assert two.transfer_s == pytest.approx(step.transfer_s)  # the same bytes and phases, in k pieces
    one = parameter_server_step(SMALL, Network(1, 208.0, 0.1), CAL)
    assert (one.transfer_s, one.overhead_s) == (0.0, 0.75)  # one node: shared files, one worker


def test_object_store_step_by_hand():
    step = object_store_step(SMALL, NET, CAL, STORE)
    # 2 transfers of (0.125 + 2 * 0.1), one remote node's 0.25, 416 bytes at 0.5 * 208 bytes/s
    assert step.transfer_s == pytest.approx(0.65 + 0.25 + 4.0)
    assert step.total_s == pytest.approx(2.0 + 4.9 + 1.04 + 0.5)
    apart = object_store_step(SMALL, NET, CAL, STORE, colocated=False)  # 2 remote nodes, 1,040 bytes
    assert apart.transfer_s == pytest.approx(0.65 + 0.5 + 10.0)


def test_ring_step_by_hand():
    step = ring_step(SMALL, NET, CAL)
    # 2 (N - 1) = 2 pulls of (0.125 + 2 * 0.1 + 104 bytes at 104 bytes/s)
    assert step.transfer_s == pytest.approx(2 * (0.125 + 0.2 + 1.0))
    assert step.reduce_apply_s == pytest.approx(0.01 * (2 + 2) * 26)
    assert step.total_s == pytest.approx(2.0 + 2.65 + 1.04 + 1.0)
    assert ring_step(SMALL, NET, CAL, latencies_per_transfer=1).transfer_s == pytest.approx(2 * (0.125 + 0.1 + 1.0))


def test_plan_efficiency_against_one_node():
    got = plan(SMALL, NET, CAL)
    one = 3.0 + 1.04 + 0.75  # all 3 shards on one node, nothing moved, one worker's call
    assert got.samples_per_s == pytest.approx(10 / 8.49)
    assert got.efficiency == pytest.approx(one / (8.49 * 2))
    assert plan(SMALL, Network(1, 208.0, 0.1), CAL).efficiency == pytest.approx(1.0)


@pytest.mark.parametrize("text, rate", [("10Gbit", 1.25e9), ("400mbit/s", 5e7), ("1.25GB/s", 1.25e9),
                                        ("800kbit", 1e5), ("1e3Mbit", 1.25e8)])
def test_parse_bandwidth(text, rate):
    assert parse_bandwidth(text) == pytest.approx(rate)


@pytest.mark.parametrize("text, seconds", [("0.1ms", 1e-4), ("50us", 5e-5), ("1s", 1.0), ("0ms", 0.0)])
def test_parse_latency(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "10", "-1Gbit", "0Gbit", "10Gbyte"])
def test_bad_bandwidth_names_the_option(text):
    with pytest.raises(PlanError, match="--bandwidth"):
        parse_bandwidth(text)


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: small\ndata: {source: synthetic, samples: 40, features: 3, classes: 2, shards: 3}\n"
                    "model: {hidden: [4]}\ntraining: {batch_size: 10, steps: 5, dtype: float64}\n"
                    "resources: {workers: 2}\n")
    return path


def test_plan_command_prints_the_model(job, capsys):
    assert main(["plan", str(job), "--nodes", "2", "--bandwidth", "1Gbit", "--latency", "1ms"]) == 0
    out = capsys.readouterr().out
    assert "26 parameters (float64), batch 10 in 3 shards" in out
    assert "208 parameters out, 208 gradients in" in out
    got = plan(SMALL, Network(2, 1.25e8, 1e-3))
    assert f"predicted step: {got.step.total_s * 1e3:.2f} ms" in out
    assert f"efficiency: {got.efficiency:.2f}" in out
    ring = plan(SMALL, Network(2, 1.25e8, 1e-3), ring=True)
    assert f"ring all-reduce, same assumptions: step {ring.step.total_s * 1e3:.2f} ms" in out
    store = plan(SMALL, Network(2, 1.25e8, 1e-3), object_store=True)
    assert f"object store (SHARDPROP_DATA_PORTS=off; older fit): step {store.step.total_s * 1e3:.2f} ms" in out
    assert "critical path, TCP array transport: 2 one-way latencies, 2 pull phases" in out  # by hand: see the hops test


def test_plan_command_more_nodes_than_shards(job, capsys):
    assert main(["plan", str(job), "--nodes", "5", "--servers", "2"]) == 0
    out = capsys.readouterr().out
    assert "only 3 of the 5 nodes get a shard" in out and "2 parameter server(s)" in out
    assert "416 parameters out, 416 gradients in" in out  # 3 workers of a shard each: 2 remote


@pytest.mark.parametrize("args, named", [(["--nodes", "0"], "--nodes must be at least 1, got 0"),
                                         (["--nodes", "2", "--bandwidth", "lots"], "--bandwidth: cannot read 'lots'"),
                                         (["--nodes", "2", "--latency", "1parsec"], "--latency: cannot read '1parsec'"),
                                         (["--nodes", "2", "--servers", "0"], "--servers must be at least 1, got 0")])
def test_plan_command_bad_options_exit_2(job, capsys, args, named):
    assert main(["plan", str(job), *args]) == 2
    assert named in capsys.readouterr().err


def test_plan_command_bad_spec_exit_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yaml"), "--nodes", "2"]) == 2
    assert "shardprop plan: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own: not an int
        main(["plan", str(tmp_path / "missing.yaml"), "--nodes", "many"])
    assert exc.value.code == 2
