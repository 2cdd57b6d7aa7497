"""Optimizers and schedules, each checked against something independent:
hand-derived numbers, the known minimum of a quadratic, one optimizer over the
whole vector versus k over its slices, and an uninterrupted run versus one
saved and restored through .npz."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from core.optim import Optimizer, learning_rate, make_optimizer


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = "constant"
    warmup_steps: int = 0
    step_size: int = 100
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)


def opt(schedule=None, **kw) -> OptimizerSpec:
    return OptimizerSpec(schedule=ScheduleSpec(**(schedule or {})), **kw)


VARIANTS = {
    "sgd": opt(),
    "sgd_wd": opt(weight_decay=0.01),
    "momentum": opt(momentum=0.9),
    "momentum_wd": opt(momentum=0.9, weight_decay=0.01),
    "nesterov": opt(momentum=0.9, nesterov=True, weight_decay=0.01, schedule={"name": "step", "step_size": 2}),
    "adam": opt(name="adam", lr=0.01),
    "adam_wd": opt(name="adam", lr=0.01, weight_decay=0.1, schedule={"name": "cosine", "warmup_steps": 2}),
}


def run(spec, x0, grads, dtype=np.float64, total_steps=10):
    """Apply `grads` in turn from x0; the final parameters."""
    x = np.array(x0, dtype=dtype)
    o = make_optimizer(spec, x.size, dtype, total_steps)
    for step, g in enumerate(grads):
        o.apply(x, np.array(g, dtype=dtype), step)
    return x


# ---------------------------------------------------------------- hand-derived

# x0 = 1, lr = 0.1, gradients 0.5, -0.25, 1.0 (not depending on x: only weight
# decay brings x into the update). Each expected value is worked out by hand.
G = [[0.5], [-0.25], [1.0]]


def _adam_by_hand(wd: float) -> float:
    # AdamW, b1 = 0.9, b2 = 0.999, eps = 1e-8; t counts from 1.
    x, m, v = 1.0, 0.0, 0.0
    x -= 0.1 * wd * x;  m = 0.1 * 0.5;               v = 0.001 * 0.25
    x -= 0.1 * (m / 0.1) / (math.sqrt(v / 0.001) + 1e-8)                        # m_hat = 0.5, v_hat = 0.25
    x -= 0.1 * wd * x;  m = 0.9 * m + 0.1 * -0.25;   v = 0.999 * v + 0.001 * 0.0625
    x -= 0.1 * (m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    x -= 0.1 * wd * x;  m = 0.9 * m + 0.1 * 1.0;     v = 0.999 * v + 0.001 * 1.0
    x -= 0.1 * (m / (1 - 0.9 ** 3)) / (math.sqrt(v / (1 - 0.999 ** 3)) + 1e-8)
    return x


HAND = [
    # spec, final x after the three steps
    (opt(), 1 - 0.1 * 0.5 + 0.1 * 0.25 - 0.1 * 1.0),                          # 0.875
    # v: 0.5, 0.9*0.5-0.25 = 0.2, 0.9*0.2+1 = 1.18
    (opt(momentum=0.9), 1 - 0.1 * 0.5 - 0.1 * 0.2 - 0.1 * 1.18),              # 0.812
    # update = g + 0.9 v: 0.5+0.45 = 0.95, -0.25+0.18 = -0.07, 1+1.062 = 2.062
    (opt(momentum=0.9, nesterov=True), 1 - 0.1 * 0.95 + 0.1 * 0.07 - 0.1 * 2.062),  # 0.7058
    # g = grad + 0.1 x: x = 0.94 (g 0.6), 0.9556 (g -0.156), 0.846044 (g 1.09556)
    (opt(weight_decay=0.1), 0.846044),
    # g as above but x moves differently: g 0.6 -> v 0.6, x 0.94; g -0.156 -> v 0.384,
    # x 0.9016; g 1.09016 -> v 0.3456 + 1.09016 = 1.43576, x 0.758024
    (opt(momentum=0.9, weight_decay=0.1), 0.758024),
    (opt(name="adam"), _adam_by_hand(0.0)),
    (opt(name="adam", weight_decay=0.1), _adam_by_hand(0.1)),
]


@pytest.mark.parametrize("spec, expected", HAND)
def test_three_steps_match_hand_derived_values(spec, expected):
    np.testing.assert_allclose(run(spec, [1.0], G), [expected], rtol=1e-13, atol=1e-15)


def test_first_adam_step_moves_by_lr_whatever_the_gradient_scale():
    # m_hat / sqrt(v_hat) = g / |g| on the first step: Adam's step is lr * sign(g).
    x = run(opt(name="adam", lr=0.01, eps=1e-30), [1.0, 1.0, 1.0], [[1e-6, -3.0, 1e4]])
    np.testing.assert_allclose(x, [0.99, 1.01, 0.99], rtol=1e-14)


def test_float32_sgd_is_float32_arithmetic():
    rng = np.random.default_rng(0)
    x0, g = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    x = run(opt(lr=0.3), x0, [g], np.float32)
    assert x.dtype == np.float32
    assert np.array_equal(x, x0 - g * np.float32(0.3))  # not rounded from a float64 result


# ------------------------------------------------------------------ quadratic

A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5], [1.0, 0.0, 1.0]])
B = np.array([1.0, -2.0, 0.5, 3.0])


@pytest.mark.parametrize("spec, steps, wd", [
    (opt(lr=0.05), 500, 0.0),
    (opt(lr=0.02, momentum=0.9), 500, 0.0),
    (opt(lr=0.02, momentum=0.9, nesterov=True), 500, 0.0),
    (opt(lr=0.05, momentum=0.5, weight_decay=0.5), 500, 0.5),
    (opt(name="adam", lr=0.05, schedule={"name": "cosine"}), 2000, 0.0),
])
def test_minimizes_a_quadratic(spec, steps, wd):
    # f(x) = 1/2 |Ax - b|^2 (+ wd/2 |x|^2 for coupled L2): minimum (A'A + wd I)^-1 A'b.
    x_star = np.linalg.solve(A.T @ A + wd * np.eye(3), A.T @ B)
    x = np.zeros(3)
    o = make_optimizer(spec, 3, np.float64, steps)
    for step in range(steps):
        o.apply(x, A.T @ (A @ x - B), step)
    np.testing.assert_allclose(x, x_star, atol=1e-6)


# ------------------------------------------------------ slices and checkpoints

def _grads(n_steps, size, dtype, seed=1):
    rng = np.random.default_rng(seed)
    # magnitudes spread over many decades, so any reordering shows in the bits
    return [(rng.standard_normal(size) * 10.0 ** rng.integers(-4, 4, size)).astype(dtype) for _ in range(n_steps)]


def _whole(spec, x0, grads, dtype, start=0, o=None):
    x = x0.copy()
    o = o or make_optimizer(spec, x.size, dtype, 8)
    for i, g in enumerate(grads):
        o.apply(x, g, start + i)
    return x, o


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_k_optimizers_over_k_slices_give_the_same_bits(name, dtype):
    spec, size, bounds = VARIANTS[name], 23, [(0, 5), (5, 6), (6, 17), (17, 23)]
    x0 = np.random.default_rng(2).standard_normal(size).astype(dtype)
    grads = _grads(6, size, dtype)
    whole, _ = _whole(spec, x0, grads, dtype)

    x = x0.copy()
    parts = [make_optimizer(spec, b - a, dtype, 8) for a, b in bounds]
    for step, g in enumerate(grads):
        for (a, b), o in zip(bounds, parts):
            view = x[a:b]  # a view: updated in place
            o.apply(view, g[a:b].copy(), step)
    assert x.dtype == dtype
    assert np.array_equal(x, whole)
    assert not np.array_equal(x, x0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_slice_midway_continues_with_the_same_bits(name, dtype):
    spec, size = VARIANTS[name], 11
    x0 = np.random.default_rng(3).standard_normal(size).astype(dtype)
    grads = _grads(6, size, dtype)
    whole, _ = _whole(spec, x0, grads, dtype)

    x, o = _whole(spec, x0, grads[:3], dtype)
    left, right = o.slice(0, 4), o.slice(4, size)
    for i, g in enumerate(grads[3:]):
        left.apply(x[:4], g[:4].copy(), 3 + i)
        right.apply(x[4:], g[4:].copy(), 3 + i)
    assert np.array_equal(x, whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_saved_to_npz_and_restored_continues_with_the_same_bits(name, dtype, tmp_path):
    spec, size = VARIANTS[name], 9
    x0 = np.random.default_rng(4).standard_normal(size).astype(dtype)
    grads = _grads(6, size, dtype)
    whole, _ = _whole(spec, x0, grads, dtype)

    x, o = _whole(spec, x0, grads[:3], dtype)
    np.savez(tmp_path / "opt.npz", **o.state_dict())
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    restored = make_optimizer(spec, size, dtype, 8)
    restored.load_state_dict(state)
    x, _ = _whole(spec, x, grads[3:], dtype, start=3, o=restored)
    assert np.array_equal(x, whole)


@pytest.mark.parametrize("spec, keys", [
    (opt(), set()),
    (opt(momentum=0.9), {"velocity"}),
    (opt(name="adam"), {"m", "v", "t"}),
])
def test_state_is_plain_arrays_in_the_params_dtype(spec, keys):
    o = make_optimizer(spec, 4, np.float32, 10)
    x = np.ones(4, np.float32)
    o.apply(x, np.full(4, 0.5, np.float32), 0)
    state = o.state_dict()
    assert set(state) == keys and x.dtype == np.float32
    for k, v in state.items():
        assert type(v) is np.ndarray
        assert (v.shape, v.dtype) == (((), np.int64) if k == "t" else ((4,), np.float32))
    if "t" in state:
        assert int(state["t"]) == 1
    state_before = {k: v.copy() for k, v in state.items()}
    for v in state.values():
        v += 1  # the dict is a copy: changing it leaves the optimizer alone
    assert all(np.array_equal(o.state_dict()[k], v) for k, v in state_before.items())


# ------------------------------------------------------------------ schedules

COS_PI_4 = 0.7071067811865476  # cos(pi / 4) = sqrt(2) / 2


@pytest.mark.parametrize("schedule, step, total, expected", [
    ({}, 0, 100, 0.1),
    ({}, 99, 100, 0.1),
    ({"warmup_steps": 4}, 0, 100, 0.025),
    ({"warmup_steps": 4}, 2, 100, 0.075),
    ({"warmup_steps": 4}, 3, 100, 0.1),
    ({"warmup_steps": 4}, 50, 100, 0.1),
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 9, 100, 0.1),
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 10, 100, 0.05),
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 25, 100, 0.025),
    ({"name": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 5}, 4, 100, 0.1),
    ({"name": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 5}, 14, 100, 0.1),
    ({"name": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 5}, 15, 100, 0.05),
    ({"name": "cosine"}, 0, 100, 0.1),
    ({"name": "cosine"}, 25, 100, 0.05 * (1 + COS_PI_4)),
    ({"name": "cosine"}, 50, 100, 0.05),
    ({"name": "cosine"}, 75, 100, 0.05 * (1 - COS_PI_4)),
    ({"name": "cosine"}, 100, 100, 0.0),
    ({"name": "cosine"}, 150, 100, 0.0),  # past the end it stays at min_lr
    ({"name": "cosine", "min_lr": 0.01, "warmup_steps": 10}, 4, 110, 0.05),
    ({"name": "cosine", "min_lr": 0.01, "warmup_steps": 10}, 10, 110, 0.1),
    ({"name": "cosine", "min_lr": 0.01, "warmup_steps": 10}, 60, 110, 0.01 + 0.09 * 0.5),
    ({"name": "cosine", "min_lr": 0.01, "warmup_steps": 10}, 110, 110, 0.01),
    ({"name": "cosine"}, 0, 0, 0.1),  # no steps planned: span is 1, not 0
])
def test_learning_rate_schedule(schedule, step, total, expected):
    assert learning_rate(opt(schedule), step, total) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_the_schedule_drives_the_update():
    # step 0 of a 4-step warm-up uses lr/4: x = 1 - 0.025 * 2
    assert run(opt(schedule={"warmup_steps": 4}), [1.0], [[2.0]]) == pytest.approx([0.95], rel=1e-15)


# ----------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, fragments", [
    ({"name": "rmsprop"}, ["optimizer.name", "rmsprop"]),
    ({"lr": 0.0}, ["optimizer.lr", "0.0"]),
    ({"lr": -1.0}, ["optimizer.lr", "-1.0"]),
    ({"lr": float("inf")}, ["optimizer.lr", "inf"]),
    ({"lr": float("nan")}, ["optimizer.lr", "nan"]),
    ({"momentum": 1.5}, ["optimizer.momentum must be in [0, 1), got 1.5"]),
    ({"momentum": 1.0}, ["optimizer.momentum", "1.0"]),
    ({"momentum": -0.1}, ["optimizer.momentum", "-0.1"]),
    ({"nesterov": True}, ["optimizer.nesterov", "momentum"]),
    ({"weight_decay": -0.01}, ["optimizer.weight_decay", "-0.01"]),
    ({"beta1": 1.0}, ["optimizer.beta1", "1.0"]),
    ({"beta2": -0.5}, ["optimizer.beta2", "-0.5"]),
    ({"eps": 0.0}, ["optimizer.eps", "0.0"]),
    ({"schedule": ScheduleSpec(name="linear")}, ["optimizer.schedule.name", "linear"]),
    ({"schedule": ScheduleSpec(warmup_steps=-1)}, ["optimizer.schedule.warmup_steps", "-1"]),
    ({"schedule": ScheduleSpec(step_size=0)}, ["optimizer.schedule.step_size", "0"]),
    ({"schedule": ScheduleSpec(gamma=0.0)}, ["optimizer.schedule.gamma", "0.0"]),
    ({"schedule": ScheduleSpec(min_lr=-1.0)}, ["optimizer.schedule.min_lr", "-1.0"]),
])
def test_invalid_hyperparameters_are_refused_naming_field_and_value(kw, fragments):
    with pytest.raises(ValueError) as e:
        Optimizer(replace(OptimizerSpec(), **kw), 4, np.float64, 10)
    assert all(f in str(e.value) for f in fragments), str(e.value)


@pytest.mark.parametrize("spec, state, fragments", [
    (opt(momentum=0.9), {}, ["velocity"]),
    (opt(momentum=0.9), {"velocity": np.zeros(4), "m": np.zeros(4)}, ["velocity", "'m'"]),
    (opt(momentum=0.9), {"velocity": np.zeros(5)}, ["velocity", "(4,)", "(5,)"]),
    (opt(momentum=0.9), {"velocity": np.zeros(4, np.float32)}, ["velocity", "float64", "float32"]),
    (opt(name="adam"), {"m": np.zeros(4), "v": np.zeros(4), "t": np.zeros(1, np.int64)}, ["'t'", "()", "(1,)"]),
    (opt(name="adam"), {"m": np.zeros(4), "v": np.zeros(4), "t": np.array(1.0)}, ["'t'", "int64", "float64"]),
    (opt(name="adam"), {"m": np.zeros(4), "v": np.zeros(4), "t": np.array(-1)}, ["'t'", "-1"]),
])
def test_load_state_dict_refuses_mismatches_naming_them(spec, state, fragments):
    o = make_optimizer(spec, 4, np.float64, 10)
    with pytest.raises(ValueError) as e:
        o.load_state_dict(state)
    assert all(f in str(e.value) for f in fragments), str(e.value)


@pytest.mark.parametrize("params, grad, fragments", [
    (np.ones(4, np.float32), np.ones(4, np.float64), ["grad", "float32", "float64"]),
    (np.ones(4, np.float64), np.ones(4, np.float32), ["params", "float32", "float64"]),
    (np.ones(3, np.float32), np.ones(3, np.float32), ["params", "(4,)", "(3,)"]),
])
def test_apply_refuses_vectors_of_another_shape_or_dtype(params, grad, fragments):
    o = make_optimizer(opt(), 4, np.float32, 10)
    with pytest.raises(ValueError) as e:
        o.apply(params, grad, 0)
    assert all(f in str(e.value) for f in fragments), str(e.value)


@pytest.mark.parametrize("start, stop", [(-1, 2), (2, 2), (3, 1), (0, 5)])
def test_slice_bounds_are_checked(start, stop):
    with pytest.raises(ValueError, match=r"\[%d, %d\)" % (start, stop)):
        make_optimizer(opt(momentum=0.9), 4, np.float64, 10).slice(start, stop)
