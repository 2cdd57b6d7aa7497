"""The seed article's 2-2-2 sigmoid network under squared error: the engine's
gradient against the corrected closed form (docs/backprop.md), written here
in plain Python, and against central finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.mlp import MLP

# w[L][i][j]: layer L, from unit i to unit j of the next layer (the engine's W_L[i, j])
W0 = [[0.15, -0.25], [0.35, 0.45]]
W1 = [[0.55, -0.65], [0.75, 0.2]]
X, T = [0.3, -0.8], [0.9, 0.1]


def sigmoid(s):
    return 1 / (1 + math.exp(-s))


def corrected_gradient():
    """docs/backprop.md, term by term."""
    y = [sigmoid(W0[0][j] * X[0] + W0[1][j] * X[1]) for j in range(2)]
    z = [sigmoid(W1[0][k] * y[0] + W1[1][k] * y[1]) for k in range(2)]
    dz = [(z[k] - T[k]) * z[k] * (1 - z[k]) for k in range(2)]
    dy = [(dz[0] * W1[j][0] + dz[1] * W1[j][1]) * y[j] * (1 - y[j]) for j in range(2)]
    g0 = [[dy[j] * X[i] for j in range(2)] for i in range(2)]
    g1 = [[dz[k] * y[j] for k in range(2)] for j in range(2)]
    loss = 0.5 * ((z[0] - T[0]) ** 2 + (z[1] - T[1]) ** 2)
    return loss, g0, g1, y, z


def seed_network():
    net = MLP([2, 2, 2], activation="sigmoid", output="sigmoid", loss="squared_error", bias=False, dtype="float64")
    net.layers[0][0][:] = W0
    net.layers[1][0][:] = W1
    return net


def test_engine_matches_the_corrected_closed_form_and_finite_differences():
    net = seed_network()
    loss, grad = net.loss_and_grad(np.array([X]), np.array([T]))
    expected_loss, g0, g1, _, _ = corrected_gradient()
    expected = np.array(g0 + g1).ravel()  # W0 row-major, then W1: the params layout without biases
    assert loss == pytest.approx(expected_loss, rel=1e-14)
    np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-15)
    fd = np.empty(8)
    for i in range(8):
        keep = net.params[i]
        net.params[i] = keep + 1e-6
        up = net.loss_and_grad(np.array([X]), np.array([T]))[0]
        net.params[i] = keep - 1e-6
        down = net.loss_and_grad(np.array([X]), np.array([T]))[0]
        net.params[i] = keep
        fd[i] = (up - down) / 2e-6
    assert np.max(np.abs(fd - grad) / np.abs(grad)) < 1e-7  # every weight, relative to its own slope
    assert np.max(np.abs(fd - expected) / np.abs(expected)) < 1e-7


def test_the_articles_output_weight_formula_does_not_match():
    _, _, g1, y, z = corrected_gradient()
    z0s = W1[0][0] * y[0] + W1[1][0] * y[1]
    article = (T[0] - z[0]) * (z0s * (1 - z0s)) * y[0]  # 'w100 as the article writes it
    assert not math.isclose(article, g1[0][0], rel_tol=1e-3)
    assert not math.isclose(-article, g1[0][0], rel_tol=1e-3)  # not just the sign: the slope too


def test_the_articles_logistic_function_is_the_mirror_image():
    s = 1.3
    assert 1 / (1 + math.exp(s)) == pytest.approx(1 - sigmoid(s))


def test_one_gradient_descent_step_by_hand():
    net = seed_network()
    lr = 0.5
    _, grad = net.loss_and_grad(np.array([X]), np.array([T]))
    before, _, _, _, _ = corrected_gradient()
    net.params -= lr * grad
    _, g0, g1, _, _ = corrected_gradient()
    expected = np.array(W0 + W1).ravel() - lr * np.array(g0 + g1).ravel()
    np.testing.assert_allclose(net.params, expected, rtol=1e-13)
    after = net.loss_and_grad(np.array([X]), np.array([T]))[0]
    assert after < before  # descending lowers the error


def test_weight_index_convention_w_L_i_j_is_W_L_i_j():
    """w110 (from y1 to z0) is layers[1][0][1, 0]: changing it moves z0 and leaves z1 alone."""
    net = seed_network()
    before = net.forward(np.array([X]))[0]
    net.layers[1][0][1, 0] += 0.1
    after = net.forward(np.array([X]))[0]
    assert after[0] != before[0] and after[1] == before[1]
    net = seed_network()
    net.layers[0][0][1, 0] += 0.1  # w010: from x1 to y0; y1 and so z keep only y0's change
    _, _, _, y, _ = corrected_gradient()
    y0 = sigmoid((W0[0][0]) * X[0] + (W0[1][0] + 0.1) * X[1])
    z = [sigmoid(W1[0][k] * y0 + W1[1][k] * y[1]) for k in range(2)]
    np.testing.assert_allclose(net.forward(np.array([X]))[0], z, rtol=1e-14)


def test_a_hidden_weight_needs_both_outputs():
    """'and so on': dropping the z1 term from dE/dy0 (only the article's shown term) is wrong."""
    _, g0, _, y, z = corrected_gradient()
    dz0 = (z[0] - T[0]) * z[0] * (1 - z[0])
    only_z0 = dz0 * W1[0][0] * y[0] * (1 - y[0]) * X[0]
    assert not math.isclose(only_z0, g0[0][0], rel_tol=1e-3)
