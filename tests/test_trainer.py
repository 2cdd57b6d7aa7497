"""The reference trainer: it learns, it is deterministic, and its step is the
definition the distributed trainer reproduces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.spec import parse_spec
from core.trainer import (ShardGradient, ShardedData, TrainingError, build_network, one_blas_thread,
                          reduce_gradients, shard_gradient, train)

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits.yaml"


def test_digits_example_reaches_96_percent_and_is_bit_identical_run_after_run():
    net, history = train(DIGITS)
    assert history[-1]["val_accuracy"] >= 0.96
    again, history_again = train(DIGITS, threads=1)  # another thread count: same bits
    assert np.array_equal(net.params, again.params)
    assert [r["loss"] for r in history] == [r["loss"] for r in history_again]


def test_a_step_is_shard_sums_added_in_shard_order_then_divided():
    spec = parse_spec({"data": {"source": "wine", "shards": 3}, "training": {"steps": 1, "batch_size": 31,
                                                                            "dtype": "float64"},
                       "resources": {"workers": 1}})
    data = ShardedData.from_spec(spec)
    net = build_network(spec, data.dataset)
    with one_blas_thread():
        grads = [shard_gradient(net, data, s, 0) for s in range(3)]
    assert [g.count for g in grads] == [11, 10, 10]  # 31 rows spread over 3 shards
    mean, loss, count = reduce_gradients(grads)
    expected = ((grads[0].grad_sum + grads[1].grad_sum) + grads[2].grad_sum) / 31
    assert count == 31 and np.array_equal(mean, expected)
    # the same as one batch holding all three shards' rows, up to rounding
    rows = np.concatenate([data.shards[s].batch(0) for s in range(3)])
    whole_loss, whole_grad = net.loss_and_grad(data.dataset.X_train[rows], data.dataset.y_train[rows])
    np.testing.assert_allclose(mean, whole_grad, rtol=1e-10, atol=1e-13)
    assert loss == pytest.approx(whole_loss, rel=1e-12)


def test_gradients_out_of_shard_order_are_refused():
    g = [ShardGradient(s, 0, np.ones(2), 1, 0.0) for s in (1, 0)]
    with pytest.raises(AssertionError):
        reduce_gradients(g)


def test_the_reference_fails_after_k_non_finite_steps_in_a_row():
    spec = parse_spec({"data": {"source": "iris", "shards": 2},
                       "model": {"hidden": [4], "output": "identity", "loss": "squared_error"},
                       "training": {"steps": 50, "batch_size": 20, "max_nonfinite_steps": 2,
                                    "optimizer": {"name": "sgd", "lr": 1e4}},
                       "resources": {"workers": 1}})
    seen = []
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        train(spec, on_step=seen.append)
    assert seen[-1]["skipped"] and not seen[0]["skipped"]


@pytest.mark.parametrize("source, extra", [("breast_cancer", {"output": "sigmoid"}), ("iris", {}), ("wine", {})])
def test_builtin_sets_are_learnable(source, extra):
    spec = parse_spec({"data": {"source": source, "shards": 2}, "model": {"hidden": [16], **extra},
                       "training": {"steps": 150, "batch_size": 32,
                                    "optimizer": {"name": "adam", "lr": 0.01}, "eval_every": 50},
                       "resources": {"workers": 1}})
    _, history = train(spec)
    assert history[-1]["val_accuracy"] >= 0.85
