"""Training health in a job's history: the gradient norm and per-layer
update-to-weight ratios checked against numpy computed another way (from the
reference trainer's parameters before and after each step, full-batch
gradients, finite differences, the SGD update rule), the distributed
trainer's numbers against the reference's, per-worker times, and goodput's
accounting of the job's wall time."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from core.health import StepHealth
from core.mlp import MLP
from core.spec import parse_spec
from core.trainer import ShardedData, build_network, train
from spec_helpers import place

LR = 0.2


def spec(steps=3, workers=1, shards=3, optimizer=None, **fields):
    return parse_spec(place({
        "name": "health", "seed": 11,
        "data": {"source": "digits", "shards": shards},
        "model": {"hidden": [12, 8], "activation": "tanh"},
        "training": {"batch_size": 60, "steps": steps, "dtype": "float64", "eval_every": 0,
                     "checkpoint_every": 0, "optimizer": optimizer or {"name": "sgd", "lr": LR}},
    }, workers=workers, **fields))


def layer_norm(net: MLP, layer: int) -> float:
    """||(W, b)|| of one layer, from the network's own views of its parameters."""
    W, b = net.layers[layer]
    return float(np.linalg.norm(np.concatenate([W.ravel(), b])))


@pytest.fixture(scope="module")
def reference():
    """The reference run's history, and its parameters after 0, 1, 2, 3 steps
    (plain SGD at a constant rate: a shorter run is a prefix of a longer one)."""
    data = ShardedData.from_spec(spec())
    params = [build_network(spec(), data.dataset).params.copy()]
    params += [train(spec(steps=k))[0].params for k in (1, 2)]
    began = time.time()
    net, history = train(spec())
    assert began <= history[0]["finished_at"] <= history[-1]["finished_at"] <= time.time()
    params.append(net.params)
    return data, net, history, params


def test_update_ratios_match_numpy_on_the_parameters_before_and_after(reference):
    data, net, history, params = reference
    for step, record in enumerate(history):
        before = net.bind(params[step])
        delta = net.bind(params[step + 1] - params[step])
        expected = [layer_norm(delta, l) / layer_norm(before, l) for l in range(len(net.layers))]
        assert len(record["update_ratio"]) == 3  # one per layer: 64-12, 12-8, 8-10
        np.testing.assert_allclose(record["update_ratio"], expected, rtol=1e-12)


def test_gradient_norm_is_the_full_batch_gradients_and_its_finite_difference(reference):
    data, net, history, params = reference
    for step, record in enumerate(history):
        rows = np.concatenate([shard.batch(step) for shard in data.shards])
        X, y = data.dataset.X_train[rows], data.dataset.y_train[rows]
        at = net.bind(params[step].copy())
        _, grad = at.loss_and_grad(X, y)
        norm = float(np.linalg.norm(grad))
        assert record["gradient_norm"] == pytest.approx(norm, rel=1e-12)
        # the loss's slope along the gradient's direction is the gradient's norm
        u, h = grad / norm, 1e-5
        slope = (net.bind(params[step] + h * u).loss_sum(X, y) - net.bind(params[step] - h * u).loss_sum(X, y))
        assert record["gradient_norm"] == pytest.approx(slope / (2 * h * len(rows)), rel=1e-6)
        # plain SGD moves W by lr * g: the layers' updates add up to lr * ||g||
        moved = math.sqrt(sum((r * layer_norm(net.bind(params[step]), l)) ** 2
                              for l, r in enumerate(record["update_ratio"])))
        assert moved == pytest.approx(LR * record["gradient_norm"], rel=1e-12)


def test_slices_joined_give_the_whole_vectors_numbers():
    rng = np.random.default_rng(0)
    layers = [(0, 7), (7, 20), (20, 23)]
    grad, before = rng.standard_normal(23), rng.standard_normal(23)
    after = before - 0.1 * grad
    whole = StepHealth.measure(grad, before, after, layers)
    cuts = [0, 5, 16, 23]  # slices that cut layers in two
    parts = [StepHealth.measure(grad[a:b], before[a:b], after[a:b], layers, offset=a) for a, b in zip(cuts, cuts[1:])]
    joined = StepHealth.join(parts)
    assert joined.gradient_norm == pytest.approx(np.linalg.norm(grad), rel=1e-14)
    np.testing.assert_allclose(joined.update_ratio, whole.update_ratio, rtol=1e-14)
    np.testing.assert_allclose(whole.update_ratio, [np.linalg.norm(after[a:b] - before[a:b]) / np.linalg.norm(before[a:b])
                                                    for a, b in layers], rtol=1e-14)
    zero = StepHealth.measure(grad, np.zeros(23), np.zeros(23), layers)
    assert zero.update_ratio == [None, None, None]  # no weights to compare the update with


# ---------------------------------------------------------------- distributed


def job_spec(**fields):
    return spec(**{"steps": 6, "eval_every": 3, "checkpoint_every": 2, **fields})


class Timed:
    """A run's wall time as seen from outside the coordinator: from calling
    `run` to the event of its final checkpoint (the last thing goodput counts)."""

    def __init__(self, steps: int):
        self.steps, self.began, self.ended = steps, None, None

    def on_event(self, event) -> None:
        if event.kind == "checkpoint" and event.step == self.steps:
            self.ended = time.perf_counter()

    def run(self, coordinator) -> float:
        self.began = time.perf_counter()
        coordinator.run()
        return self.ended - self.began


def run_job(tmp_path, name, at_step=None, **fields):
    """A distributed job's records, its counters and its wall time (Timed);
    `at_step(record, coordinator)` is called at each step."""
    from workers.coordinator import Coordinator

    records, s = [], job_spec(**fields)
    timed = Timed(s.training.steps)

    def on_step(record):
        records.append(record)
        if at_step is not None:
            at_step(record, coordinator)

    coordinator = Coordinator(s, tmp_path / name, on_step=on_step, on_event=timed.on_event)
    return records, coordinator.counters, timed.run(coordinator)


@pytest.mark.ray
def test_distributed_health_is_the_references_and_times_are_per_worker(ray_cluster, tmp_path):
    _, history = train(job_spec())
    for workers, servers in ((1, 1), (2, 1), (2, 2)):
        records, counters, took = run_job(tmp_path, f"w{workers}ps{servers}", workers=workers,
                                          parameter_servers=servers)
        assert [r["step"] for r in records] == [r["step"] for r in history]
        if servers == 1:  # the same sums in the same order: the same bits
            assert [r["gradient_norm"] for r in records] == [r["gradient_norm"] for r in history]
            assert [r["update_ratio"] for r in records] == [r["update_ratio"] for r in history]
        else:  # a layer cut by a slice boundary is summed in two parts, then added
            np.testing.assert_allclose([r["gradient_norm"] for r in records], [r["gradient_norm"] for r in history],
                                       rtol=1e-12)
            np.testing.assert_allclose([r["update_ratio"] for r in records], [r["update_ratio"] for r in history],
                                       rtol=1e-12)
        for r in records:
            assert len(r["worker_compute_s"]) == len(r["worker_wait_s"]) == workers
            assert all(s > 0 for s in r["worker_compute_s"]) and all(s >= 0 for s in r["worker_wait_s"])
        # after the first step each worker waits for the servers (and the other worker) every step
        assert all(s > 0 for r in records[1:] for s in r["worker_wait_s"])
        assert records[0]["worker_wait_s"] == [0.0] * workers
        assert all(a["finished_at"] <= b["finished_at"] for a, b in zip(records, records[1:]))
        check_goodput(counters.goodput, took)
        assert counters.goodput["lost_s"]["evaluation"] > 0 and counters.goodput["lost_s"]["checkpoint"] > 0
        assert counters.goodput["lost_s"]["recovery"] == counters.goodput["lost_s"]["replay"] == 0


def check_goodput(goodput: dict, took: float) -> None:
    """Goodput is a fraction; steps and causes add up to the wall time (up to
    float rounding), and that is the one measured outside (Timed), within
    2% + 0.1 s: the two clocks start and stop a few statements apart in one
    thread, which a loaded machine may preempt in between."""
    assert 0 < goodput["ratio"] <= 1
    assert goodput["step_s"] + sum(goodput["lost_s"].values()) == pytest.approx(goodput["wall_s"], rel=1e-9)
    assert goodput["ratio"] == pytest.approx(goodput["step_s"] / goodput["wall_s"], rel=1e-12)
    assert goodput["wall_s"] == pytest.approx(took, rel=0.02, abs=0.1), (took, goodput)
    assert goodput["lost_s"]["startup"] > 0


@pytest.mark.ray
@pytest.mark.chaos
def test_a_killed_server_shows_as_recovery_and_replay_and_the_health_is_unchanged(ray_cluster, tmp_path):
    """The server killed after step 5 is reported: restored from step 4's
    checkpoint, step 5 (and 6, if it was in flight) made again. Their time is
    replay, the restart's recovery; every step is reported once, with the
    reference's numbers."""
    import os
    import signal

    chaos = {"steps": 8, "checkpoint_every": 4}
    _, history = train(job_spec(**chaos))

    def kill_the_server_at_step_5(record, coordinator):
        if record["step"] == 5:
            os.kill(coordinator.server_locations[0]["pid"], signal.SIGKILL)

    records, counters, took = run_job(tmp_path, "run", kill_the_server_at_step_5, workers=2, **chaos)
    assert counters.server_failures == 1 and counters.steps_replayed >= 1
    assert [r["step"] for r in records] == [r["step"] for r in history]
    assert [r["gradient_norm"] for r in records] == [r["gradient_norm"] for r in history]
    assert [r["update_ratio"] for r in records] == [r["update_ratio"] for r in history]
    goodput = counters.goodput
    check_goodput(goodput, took)
    assert goodput["lost_s"]["recovery"] > 0 and goodput["lost_s"]["replay"] > 0
    assert goodput["lost_s"]["recovery"] >= counters.recovery_seconds


@pytest.mark.ray
def test_async_updates_health_is_each_shard_batchs_computed_by_hand(ray_cluster, tmp_path):
    """Async with one worker applies shard v mod S's batch v div S at update
    v: its gradient's norm and the update's ratios, computed here with numpy
    from the same sums (plain SGD: W' = W - lr * g)."""
    from core.trainer import one_blas_thread, shard_gradient

    s = job_spec(mode="async", steps=6, max_staleness=2)
    records, counters, took = run_job(tmp_path, "async", mode="async", steps=6, max_staleness=2)
    data = ShardedData.from_spec(s)
    net = build_network(s, data.dataset)
    params = net.params.copy()
    with one_blas_thread():
        for version, record in enumerate(records):
            g = shard_gradient(net.bind(params), data, version % 3, version // 3)
            mean = g.grad_sum / g.count
            after = params - LR * mean
            expected = [layer_norm(net.bind(after - params), l) / layer_norm(net.bind(params), l) for l in range(3)]
            assert record["gradient_norm"] == pytest.approx(np.linalg.norm(mean), rel=1e-12)
            np.testing.assert_allclose(record["update_ratio"], expected, rtol=1e-10)
            assert len(record["worker_compute_s"]) == 1 and record["worker_compute_s"][0] > 0
            assert record["worker_wait_s"][0] >= 0
            params = after
    check_goodput(counters.goodput, took)
