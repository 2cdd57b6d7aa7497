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
