"""The MLP's gradients against central finite differences, and its contract:
flat parameters with layer views, sums that add across batches, model files."""

from __future__ import annotations

import json
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
@settings(max_examples=30, deadline=None)
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
@settings(max_examples=30, deadline=None)
def test_parameter_layout_and_views(sizes, bias):
    net = MLP(sizes, output="identity", loss="squared_error", bias=bias)
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


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("output, loss", COMBOS)
def test_float32_stays_float32(activation, output, loss):
    net = MLP([5, 4, 3], activation, output, loss, seed=4)
    wide = MLP.from_config({**net.config, "dtype": "float64"}, net.params.astype(np.float64))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 5))  # float64 input is cast once, at the edge
    Y = np.arange(7) % 3 if output == "softmax" else rng.random((7, 3))
    loss32, grad32 = net.loss_and_grad(X, Y)
    loss64, grad64 = wide.loss_and_grad(X.astype(np.float32), Y)
    assert net.params.dtype == grad32.dtype == net.forward(X).dtype == net.predict(X).dtype == np.float32
    # float32 rounding, not float64 arithmetic cast back at the end
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-5)
    assert not np.array_equal(grad32, grad64.astype(np.float32))


@pytest.mark.parametrize("output, loss", COMBOS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("hidden", [[], [3]])
def test_huge_logits_give_finite_values_without_warnings(output, loss, dtype, scale, hidden):
    net = MLP([2, *hidden, 3], "tanh", output=output, loss=loss, dtype=dtype)
    net.layers[-1][1][:] = [scale, -scale, 0]  # the output sums are +-scale plus O(1)
    X = np.array([[1.0, -1.0], [-1.0, 1.0]])
    Ys = [np.array([1, 2]), np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])]
    if output == "identity" and dtype == "float32" and scale == 1e30:
        Ys = []  # the true loss, (1e30)^2 / 2, is beyond float32: only the outputs can be finite
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for Y in Ys:
            l, g = net.loss_and_grad(X, Y)
            assert np.isfinite(l) and np.isfinite(g).all() and g.dtype == dtype
        assert np.isfinite(net.forward(X)).all()


def test_cross_entropy_at_huge_logits_is_the_exact_margin():
    # log-softmax by max-subtraction: loss = logsumexp(a) - a_y = 2e30 exactly here
    net = MLP([1, 2], output="softmax", loss="cross_entropy", dtype="float64")
    net.params[:] = [0.0, 0.0, 1e30, -1e30]
    assert net.loss_sum(np.zeros((1, 1)), np.array([1])) == 2e30
    sig = MLP([1, 1], output="sigmoid", loss="cross_entropy", dtype="float64")
    sig.params[:] = [0.0, -1e4]  # softplus form: -log sigmoid(-1e4) = log(1 + e^1e4) = 1e4
    assert sig.loss_sum(np.zeros((1, 1)), np.array([1])) == 1e4


def test_threads_sharing_one_network_get_the_bits_of_one_thread():
    from concurrent.futures import ThreadPoolExecutor
    from threadpoolctl import threadpool_limits

    net = MLP([20, 32, 16, 5], "tanh", seed=3)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((64, 20)).astype(np.float32), rng.integers(0, 5, 64)) for _ in range(8)]
    with threadpool_limits(limits=1, user_api="blas"):
        alone = [net.grad_sum(X, y) for X, y in batches]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                together = list(pool.map(lambda b: net.grad_sum(*b), batches))
                for (l1, g1, n1), (l2, g2, n2) in zip(alone, together):
                    assert l1 == l2 and n1 == n2 and np.array_equal(g1, g2)


def test_grad_sum_writes_into_out_and_refuses_a_wrong_buffer():
    net = MLP([3, 4, 2], seed=1)
    X, y = np.ones((5, 3), np.float32), np.array([0, 1, 1, 0, 1])
    out = np.full_like(net.params, np.nan)
    loss, grad, n = net.grad_sum(X, y, out=out)
    assert grad is out and np.array_equal(out, net.grad_sum(X, y)[1])
    for bad in (np.empty(net.params.size + 1, np.float32), np.empty(net.params.size, np.float64),
                np.empty((2, net.params.size), np.float32)[:, 0]):
        with pytest.raises(ValueError, match="out must be"):
            net.grad_sum(X, y, out=bad)


def test_empty_batch_sums_to_zero_and_has_no_mean():
    net = MLP([3, 2])
    loss, grad, n = net.grad_sum(np.empty((0, 3)), np.empty(0, np.int64))
    assert (loss, n) == (0.0, 0) and not grad.any()
    with pytest.raises(ValueError, match="at least one row"):
        net.loss_and_grad(np.empty((0, 3)), np.empty(0, np.int64))


@pytest.mark.parametrize("kwargs, message", [
    ({"output": "identity", "loss": "cross_entropy"}, "cross_entropy"),
    ({"activation": "swish"}, "activation"),
    ({"output": "relu"}, "output"),
    ({"loss": "hinge"}, "loss"),
    ({"init": "zeros"}, "init"),
    ({"dtype": "float16"}, "dtype"),
    ({"bias": "yes"}, "bias"),
    ({"seed": -1}, "seed"),
    ({"output": "softmax", "sizes": [3, 1]}, "at least 2 output units"),
    ({"sizes": [3]}, "sizes"),
    ({"sizes": [3, 0]}, "sizes"),
])
def test_bad_arguments_are_refused(kwargs, message):
    kwargs = {"sizes": [3, 2], **kwargs}
    with pytest.raises(ValueError, match=message):
        MLP(**kwargs)


def test_bad_batches_are_refused():
    net = MLP([3, 4])
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        net.loss_and_grad(np.ones((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        net.loss_and_grad(np.ones((2, 3)), np.array([0, 4]))
    with pytest.raises(ValueError, match="one row per input row"):
        net.loss_and_grad(np.ones((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\], got values in \[-1, 1\]"):
        net.loss_and_grad(np.ones((2, 3)), np.array([-1, 1]))
    with pytest.raises(ValueError, match=r"float matrix of shape \(2, 4\), got float64 of shape \(2, 3\)"):
        net.loss_and_grad(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"float matrix of shape \(2, 4\), got float64 of shape \(2,\)"):
        net.loss_and_grad(np.ones((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        MLP([3, 1], output="sigmoid").loss_and_grad(np.ones((2, 3)), np.array([0, 2]))


def test_save_and_load_round_trip_exact_bits(tmp_path):
    net = MLP([4, 6, 3], "tanh", "softmax", "cross_entropy", seed=5)
    net.params[:] += np.random.default_rng(1).standard_normal(net.params.size).astype(np.float32)
    net.normalizer = (np.array([1.0, 2, 3, 4]), np.array([0.5, 1, 2, 4]))
    net.save(tmp_path / "m.npz")
    loaded = MLP.load(tmp_path / "m.npz")
    assert np.array_equal(loaded.params, net.params) and loaded.config == net.config
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded.normalizer, net.normalizer))
    rows = np.random.default_rng(2).standard_normal((5, 4)) * 3
    assert np.array_equal(loaded.predict(rows), net.predict(rows))
    # predict standardizes raw rows with the carried statistics
    assert np.array_equal(net.predict(rows), net.forward(((rows - net.normalizer[0]) / net.normalizer[1]).astype(np.float32)))


def test_load_takes_a_one_element_config_array(tmp_path):
    net = MLP([3, 2], seed=7)
    np.savez(tmp_path / "m.npz", params=net.params, config=np.array([json.dumps(net.config)]))
    assert np.array_equal(MLP.load(tmp_path / "m.npz").params, net.params)


def test_load_refuses_damaged_or_pickled_files(tmp_path):
    net = MLP([2, 2])
    config = np.array(json.dumps(net.config))
    files = {
        "pickled": dict(params=np.array([object()], dtype=object), config=config),
        "missing": dict(params=net.params),
        "short": dict(params=np.zeros(3, np.float32), config=config),
        "wide": dict(params=net.params.astype(np.float64), config=config),
        "json": dict(params=net.params, config=np.array("{sizes: [2, 2]")),
        "bytes": dict(params=net.params, config=np.frombuffer(b"{}", np.uint8)),
        "arch": dict(params=net.params, config=np.array(json.dumps({**net.config, "loss": "hinge"}))),
        "half": dict(params=net.params, config=config, mean=np.zeros(2)),
        "extra": dict(params=net.params, config=config, optimizer=np.zeros(2)),
        "normalizer": dict(params=net.params, config=config, mean=np.zeros(3), scale=np.ones(3)),
    }
    for name, arrays in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    for name, message in [("pickled", "not a readable"), ("missing", "lacks config"), ("short", "architecture needs"),
                          ("wide", "dtype float64, the architecture says float32"), ("json", "not valid JSON"),
                          ("bytes", "one JSON string"), ("arch", "loss must be"), ("half", "without the other"),
                          ("extra", "unexpected arrays"), ("normalizer", "mean must be 2 finite values"),
                          ("junk", "not a readable")]:
        with pytest.raises(ValueError, match=message):
            MLP.load(tmp_path / f"{name}.npz")
