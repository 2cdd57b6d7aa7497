"""Optimizers over the flat parameter vector, and learning-rate schedules.

One general rule per family: SGD with momentum (plain SGD is momentum 0,
Nesterov a flag, coupled L2 weight decay) and Adam with decoupled weight decay
(AdamW). Every update is elementwise and runs in the parameters' dtype in a
fixed order of operations, so k optimizers over k slices of the vector give the
same bits as one over all of it. State is plain arrays that save without pickle.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


def learning_rate(opt_spec, step: int, total_steps: int) -> float:
    """The learning rate used for update number `step` (0-based).

    With W = schedule.warmup_steps and lr the base rate:

      step < W (linear warm-up):  lr * (step + 1) / W
      otherwise, with u = step - W:
        constant:  lr
        step:      lr * gamma ** (u // step_size)
        cosine:    min_lr + (lr - min_lr) * (1 + cos(pi * u / S)) / 2,
                   S = max(1, total_steps - W); u is capped at S, so updates
                   past the planned end stay at min_lr instead of rising again.
    """
    s = opt_spec.schedule
    if step < s.warmup_steps:
        return opt_spec.lr * (step + 1) / s.warmup_steps
    u = step - s.warmup_steps
    if s.name == "step":
        return opt_spec.lr * s.gamma ** (u // s.step_size)
    if s.name == "cosine":
        span = max(1, total_steps - s.warmup_steps)
        return s.min_lr + (opt_spec.lr - s.min_lr) * (1 + math.cos(math.pi * min(u, span) / span)) / 2
    return opt_spec.lr


def _require(ok: bool, field: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"optimizer.{field} must be {rule}, got {value!r}")


def check_optimizer_spec(opt_spec) -> None:
    """Raise ValueError naming the first hyperparameter out of range.

    The job spec already validates these at the edge; this guards callers that
    build an optimizer from any other object with the same attributes."""
    o, s = opt_spec, opt_spec.schedule
    finite = lambda x: isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    _require(o.name in OPTIMIZERS, "name", " or ".join(OPTIMIZERS), o.name)
    _require(finite(o.lr) and o.lr > 0, "lr", "finite and > 0", o.lr)
    _require(finite(o.momentum) and 0 <= o.momentum < 1, "momentum", "in [0, 1)", o.momentum)
    _require(isinstance(o.nesterov, bool), "nesterov", "a bool", o.nesterov)
    if o.nesterov and o.momentum <= 0:
        raise ValueError(f"optimizer.nesterov needs optimizer.momentum > 0, got momentum {o.momentum!r}")
    _require(finite(o.weight_decay) and o.weight_decay >= 0, "weight_decay", "finite and >= 0", o.weight_decay)
    _require(finite(o.beta1) and 0 <= o.beta1 < 1, "beta1", "in [0, 1)", o.beta1)
    _require(finite(o.beta2) and 0 <= o.beta2 < 1, "beta2", "in [0, 1)", o.beta2)
    _require(finite(o.eps) and o.eps > 0, "eps", "finite and > 0", o.eps)
    _require(s.name in SCHEDULES, "schedule.name", " or ".join(SCHEDULES), s.name)
    is_int = lambda x: isinstance(x, Integral) and not isinstance(x, bool)  # noqa: E731
    _require(is_int(s.warmup_steps) and s.warmup_steps >= 0, "schedule.warmup_steps", "an int >= 0", s.warmup_steps)
    _require(is_int(s.step_size) and s.step_size > 0, "schedule.step_size", "an int > 0", s.step_size)
    _require(finite(s.gamma) and 0 < s.gamma <= 1, "schedule.gamma", "in (0, 1]", s.gamma)
    _require(finite(s.min_lr) and s.min_lr >= 0, "schedule.min_lr", "finite and >= 0", s.min_lr)


class Optimizer:
    """SGD or Adam over a vector of `size` elements of `dtype`.

    SGD (PyTorch's SGD with dampening 0), with wd = weight_decay, mu = momentum:
        g = grad + wd * params                        (coupled L2)
        mu = 0:  params -= lr * g
        mu > 0:  v = mu * v + g;  update = g + mu * v if nesterov else v
                 params -= lr * update
    Adam (PyTorch's AdamW), t = number of updates applied so far, this one included:
        params -= lr * wd * params                    (decoupled, first)
        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g**2
        params -= lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

    Python-float coefficients are rounded to the dtype once, and every array
    operation runs in the dtype, in place, in the order written in `_sgd` and
    `_adam`: that order is part of the definition (the distributed trainer must
    reproduce it bit for bit)."""

    def __init__(self, opt_spec, size: int, dtype, total_steps: int):
        check_optimizer_spec(opt_spec)
        if size <= 0:
            raise ValueError(f"optimizer size must be > 0, got {size}")
        self.spec, self.size, self.total_steps = opt_spec, int(size), total_steps
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"optimizer dtype must be float32 or float64, got {self.dtype}")
        self.state: dict[str, np.ndarray] = {}
        if opt_spec.name == "adam":
            self.state = {"m": np.zeros(size, self.dtype), "v": np.zeros(size, self.dtype),
                          "t": np.array(0, np.int64)}
        elif opt_spec.momentum > 0:
            self.state = {"velocity": np.zeros(size, self.dtype)}
        # Work buffers, so that a step on a 10M-element vector allocates nothing.
        self._buf = np.empty(size, self.dtype)
        needs_second = opt_spec.name == "adam" or opt_spec.nesterov
        self._buf2 = np.empty(size, self.dtype) if needs_second else None

    def _c(self, x: float):
        """A python-float coefficient rounded to the dtype, so no op promotes."""
        return self.dtype.type(x)

    def apply(self, params: np.ndarray, grad: np.ndarray, step: int) -> None:
        """Update `params` in place with the mean gradient `grad` for update number `step`."""
        for name, a in (("params", params), ("grad", grad)):
            if a.shape != (self.size,) or a.dtype != self.dtype:
                raise ValueError(f"{name} must be a ({self.size},) {self.dtype} vector, "
                                 f"got {a.shape} {a.dtype}")
        lr = self._c(learning_rate(self.spec, step, self.total_steps))
        if self.spec.name == "adam":
            self._adam(params, grad, lr)
        else:
            self._sgd(params, grad, lr)

    def _sgd(self, params, grad, lr) -> None:
        s, g = self.spec, self._buf
        if s.weight_decay:
            np.multiply(params, self._c(s.weight_decay), out=g)
            g += grad                                   # g = wd * params + grad
        else:
            np.copyto(g, grad)
        if s.momentum > 0:
            mu, v = self._c(s.momentum), self.state["velocity"]
            v *= mu
            v += g                                      # v = mu * v + g
            if s.nesterov:
                np.multiply(v, mu, out=self._buf2)
                g += self._buf2                         # update = g + mu * v
            else:
                np.copyto(g, v)                         # update = v
        g *= lr
        params -= g

    def _adam(self, params, grad, lr) -> None:
        s, m, v = self.spec, self.state["m"], self.state["v"]
        a, b = self._buf, self._buf2
        if s.weight_decay:
            np.multiply(params, lr * self._c(s.weight_decay), out=a)
            params -= a                                 # params -= (lr * wd) * params
        t = int(self.state["t"]) + 1
        self.state["t"] = np.array(t, np.int64)
        m *= self._c(s.beta1)
        np.multiply(grad, self._c(1 - s.beta1), out=a)
        m += a                                          # m = b1 * m + (1 - b1) * g
        v *= self._c(s.beta2)
        np.multiply(grad, grad, out=a)
        a *= self._c(1 - s.beta2)
        v += a                                          # v = b2 * v + (1 - b2) * g * g
        np.multiply(v, self._c(1 / (1 - s.beta2 ** t)), out=b)
        np.sqrt(b, out=b)
        b += self._c(s.eps)                             # b = sqrt(v_hat) + eps
        np.multiply(m, self._c(1 / (1 - s.beta1 ** t)), out=a)
        a /= b
        a *= lr
        params -= a                                     # params -= (m_hat / b) * lr

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state: per-element vectors and 0-d scalars, no objects."""
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replace the state with copies of `state`, which must match this
        optimizer's keys, shapes and dtypes exactly (nothing is cast)."""
        if set(state) != set(self.state):
            raise ValueError(f"{self.spec.name} optimizer state must have keys {sorted(self.state)}, "
                             f"got {sorted(state)}")
        for k, own in self.state.items():
            given = np.asarray(state[k])
            if given.shape != own.shape:
                raise ValueError(f"optimizer state {k!r} must have shape {own.shape}, got {given.shape}")
            if given.dtype != own.dtype:
                raise ValueError(f"optimizer state {k!r} must have dtype {own.dtype}, got {given.dtype}")
        if "t" in state and int(state["t"]) < 0:
            raise ValueError(f"optimizer state 't' must be >= 0, got {int(state['t'])}")
        self.state = {k: np.array(state[k], copy=True) for k in self.state}

    def slice(self, start: int, stop: int) -> "Optimizer":
        """A new optimizer for params[start:stop], owning copies of that part
        of the state (scalars such as Adam's t are copied whole)."""
        if not 0 <= start < stop <= self.size:
            raise ValueError(f"slice must satisfy 0 <= start < stop <= {self.size}, got [{start}, {stop})")
        part = Optimizer(self.spec, stop - start, self.dtype, self.total_steps)
        part.load_state_dict({k: (v[start:stop] if v.ndim == 1 else v) for k, v in self.state.items()})
        return part


def make_optimizer(opt_spec, size: int, dtype, total_steps: int) -> Optimizer:
    """The optimizer `opt_spec` names, over `size` elements of `dtype`."""
    return Optimizer(opt_spec, size, dtype, total_steps)
