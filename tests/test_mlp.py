"""The MLP's gradients against central finite differences, and its contract:
flat parameters with layer views, sums that add across batches, model files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from core.mlp import MLP

COMBOS = [("softmax", "cross_entropy"), ("sigmoid", "cross_entropy"), ("softmax", "squared_error"),
          ("sigmoid", "squared_error"), ("identity", "squared_error")]


def targets_for(output, loss, n, k, rng, labels):
    if labels and output == "softmax":
        return rng.integers(0, k, n)
    if output == "identity":
        return rng.standard_normal((n, k))
    return rng.random((n, k))  # soft targets in [0, 1] for sigmoid/softmax


def finite_difference(net, X, Y, h=1e-6):
    fd = np.empty_like(net.params)
    for i in range(net.params.size):
        keep = net.params[i]
        net.params[i] = keep + h
        up, _ = net.loss_and_grad(X, Y)
        net.params[i] = keep - h
        down, _ = net.loss_and_grad(X, Y)
        net.params[i] = keep
        fd[i] = (up - down) / (2 * h)
    return fd


def relative_error(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("output, loss", COMBOS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [[], [5], [4, 3]])
def test_gradient_matches_central_differences(activation, output, loss, bias, hidden):
    rng = np.random.default_rng(len(hidden) * 7 + bias)
    net = MLP([3, *hidden, 4], activation, output, loss, bias, init="xavier", seed=2, dtype="float64")
    net.params[:] += rng.normal(0, 0.1, net.params.size)  # biases away from 0 too
    X = rng.standard_normal((6, 3))
    for labels in (True, False):
        Y = targets_for(output, loss, 6, 4, rng, labels)
        _, grad = net.loss_and_grad(X, Y)
        assert relative_error(grad, finite_difference(net, X, Y)) < 1e-7


def test_single_sigmoid_unit_takes_binary_labels():
    rng = np.random.default_rng(0)
    net = MLP([3, 4, 1], "tanh", "sigmoid", "cross_entropy", dtype="float64")
    X, y = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    _, grad = net.loss_and_grad(X, y)
    assert relative_error(grad, finite_difference(net, X, y)) < 1e-7
    p = net.forward(X)[:, 0]  # binary cross entropy by hand
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert net.loss_and_grad(X, y)[0] == pytest.approx(expected, rel=1e-12)


def test_logistic_regression_loss_by_hand():
    net = MLP([2, 3], output="softmax", loss="cross_entropy", dtype="float64")
    W, b = net.layers[0]
    W[:] = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    b[:] = [0.1, 0.2, 0.3]
    x, label = np.array([[1.0, 1.0]]), 1
    a = np.array([1.0 + 0.5 + 0.1, 0.0 + 2.0 + 0.2, -1.0 + 0.0 + 0.3])
    p = np.exp(a) / np.exp(a).sum()
    loss, grad = net.loss_and_grad(x, np.array([label]))
    assert loss == pytest.approx(-np.log(p[label]), rel=1e-12)
    delta = p - np.eye(3)[label]  # dE/da = p - t; dE/dW = x^T delta; dE/db = delta
    np.testing.assert_allclose(grad, np.concatenate([np.outer(x[0], delta).ravel(), delta]), rtol=1e-12)


@given(n=st.integers(1, 40), split=st.integers(1, 39), sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_sums_add_across_batches_and_the_mean_divides_them(n, split, sizes, seed):
    rng = np.random.default_rng(seed)
    k = sizes[-1] if sizes[-1] > 1 else 2
    net = MLP([*sizes[:-1], k], "tanh", "softmax", "cross_entropy", seed=seed, dtype="float64")
    X, y = rng.standard_normal((n, sizes[0])), rng.integers(0, k, n)
    loss_sum, grad_sum, count = net.grad_sum(X, y)
    assert count == n and grad_sum.shape == net.params.shape
    cut = min(split, n)
    l1, g1, _ = net.grad_sum(X[:cut], y[:cut])
    l2, g2, _ = net.grad_sum(X[cut:], y[cut:])
    np.testing.assert_allclose(g1 + g2, grad_sum, rtol=1e-10, atol=1e-12)
    assert l1 + l2 == pytest.approx(loss_sum, rel=1e-10)
    mean_loss, mean_grad = net.loss_and_grad(X, y)
    assert mean_loss == pytest.approx(loss_sum / n, rel=1e-12)
    np.testing.assert_allclose(mean_grad, grad_sum / n, rtol=1e-12)


@given(sizes=st.lists(st.integers(1, 12), min_size=2, max_size=5), bias=st.booleans())
@settings(max_examples=40, deadline=None)
def test_parameter_layout_and_views(sizes, bias):
    net = MLP(sizes, bias=bias)
    expected = sum(i * o + (o if bias else 0) for i, o in zip(sizes, sizes[1:]))
    assert net.params.shape == (expected,) and net.params.flags.c_contiguous
    for (W, b), fan_in, fan_out in zip(net.layers, sizes, sizes[1:]):
        assert W.shape == (fan_in, fan_out) and np.shares_memory(W, net.params)
        assert (b is None) == (not bias) and (b is None or np.shares_memory(b, net.params))
    net.params[:] = np.arange(expected)  # W then b, layer after layer, row-major
    at = 0
    for W, b in net.layers:
        assert W.ravel()[0] == at and W[0, -1] == at + W.shape[1] - 1
        at += W.size
        if b is not None:
            assert b[0] == at
            at += b.size


def test_bind_shares_memory_and_works_on_read_only_params():
    net = MLP([4, 3, 2], seed=1)
    frozen = net.params.copy()
    frozen.flags.writeable = False
    bound = net.bind(frozen)
    assert bound.params is frozen and np.shares_memory(bound.layers[0][0], frozen)
    X, y = np.ones((2, 4), np.float32), np.array([0, 1])
    assert np.array_equal(bound.grad_sum(X, y)[1], net.grad_sum(X, y)[1])


def test_float32_stays_float32():
    net = MLP([5, 4, 3], "sigmoid", "softmax", "squared_error")
    X = np.random.default_rng(0).standard_normal((7, 5))  # float64 input is cast once
    loss, grad = net.loss_and_grad(X, np.arange(7) % 3)
    assert net.params.dtype == grad.dtype == net.forward(X).dtype == np.float32


@pytest.mark.parametrize("output, loss", COMBOS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_logits_give_finite_values_without_warnings(output, loss, dtype, scale):
    net = MLP([2, 3], output=output, loss=loss, dtype=dtype)
    net.params[:] = [scale, -scale, scale, -scale, scale, -scale, 0, 0, 0]
    X = np.array([[1.0, -1.0], [-1.0, 1.0]])
    Y = np.array([0, 2]) if output == "softmax" else np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        if loss == "cross_entropy" or output != "identity":
            l, g = net.loss_and_grad(X, Y)
            assert np.isfinite(l) and np.isfinite(g).all()
        assert np.isfinite(net.forward(X)).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"output": "identity", "loss": "cross_entropy"}, "cross_entropy"),
    ({"activation": "swish"}, "activation"),
    ({"output": "relu"}, "output"),
    ({"loss": "hinge"}, "loss"),
    ({"init": "zeros"}, "init"),
    ({"dtype": "float16"}, "dtype"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLP([3, 2], **kwargs)


def test_bad_batches_are_refused():
    net = MLP([3, 4])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        net.loss_and_grad(np.ones((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        net.loss_and_grad(np.ones((2, 3)), np.array([0, 4]))
    with pytest.raises(ValueError, match="one row per input row"):
        net.loss_and_grad(np.ones((2, 3)), np.array([0, 1, 2]))


def test_save_and_load_round_trip_exact_bits(tmp_path):
    net = MLP([4, 6, 3], "tanh", "softmax", "cross_entropy", seed=5)
    net.params[:] += np.random.default_rng(1).standard_normal(net.params.size).astype(np.float32)
    net.normalizer = (np.array([1.0, 2, 3, 4]), np.array([0.5, 1, 2, 4]))
    net.save(tmp_path / "m.npz")
    loaded = MLP.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.params, net.params) and loaded.config == net.config
    rows = np.random.default_rng(2).standard_normal((5, 4)) * 3
    assert np.array_equal(loaded.predict(rows), net.predict(rows))
    # predict standardizes raw rows with the carried statistics
    assert np.array_equal(net.predict(rows), net.forward(((rows - net.normalizer[0]) / net.normalizer[1]).astype(np.float32)))


def test_load_refuses_damaged_or_pickled_files(tmp_path):
    np.savez(tmp_path / "pickled.npz", params=np.array([object()], dtype=object), config=np.array("{}"))
    np.savez(tmp_path / "missing.npz", params=np.zeros(3, np.float32))
    net = MLP([2, 2])
    np.savez(tmp_path / "short.npz", params=np.zeros(3, np.float32), config=np.array(__import__("json").dumps(net.config)))
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    for name, message in [("pickled", "not a readable"), ("missing", "lacks config"), ("short", "architecture needs"),
                          ("junk", "not a readable")]:
        with pytest.raises(ValueError, match=message):
            MLP.load(tmp_path / f"{name}.npz")
