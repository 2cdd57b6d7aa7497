"""Optimizers over the flat parameter vector, and learning-rate schedules.

One general rule per family: SGD with momentum (plain SGD is momentum 0,
Nesterov a flag) and Adam with decoupled weight decay. Every update is
elementwise and runs in the parameters' dtype in a fixed order of
operations, so k optimizers over k slices of the vector give the same bits
as one over all of it. State is plain arrays that save without pickling.
"""

from __future__ import annotations

import math

import numpy as np


def learning_rate(spec, step: int, total_steps: int) -> float:
    """The learning rate for update number `step` (0-based).

    Warm-up: lr * (step + 1) / warmup_steps while step < warmup_steps. After
    it, with u = step - warmup_steps:
      constant: lr
      step:     lr * gamma ** (u // step_size)
      cosine:   min_lr + (lr - min_lr) * (1 + cos(pi * u / max(1, total_steps - warmup_steps))) / 2
    """
    s = spec.schedule
    if step < s.warmup_steps:
        return spec.lr * (step + 1) / s.warmup_steps
    u = step - s.warmup_steps
    if s.name == "step":
        return spec.lr * s.gamma ** (u // s.step_size)
    if s.name == "cosine":
        span = max(1, total_steps - s.warmup_steps)
        return s.min_lr + (spec.lr - s.min_lr) * (1 + math.cos(math.pi * min(u, span) / span)) / 2
    return spec.lr


class Optimizer:
    """SGD (momentum, Nesterov, coupled L2 weight decay) or Adam (decoupled
    weight decay, as AdamW), over a vector of `size` elements."""

    def __init__(self, spec, size: int, dtype, total_steps: int):
        assert size > 0
        self.spec, self.total_steps = spec, total_steps
        self.dtype = np.dtype(dtype)
        self.size = size
        self.state: dict[str, np.ndarray] = {}
        if spec.name == "adam":
            self.state = {"m": np.zeros(size, self.dtype), "v": np.zeros(size, self.dtype),
                          "t": np.array(0, dtype=np.int64)}
        elif spec.name == "sgd":
            if spec.momentum > 0:
                self.state = {"velocity": np.zeros(size, self.dtype)}
        else:
            raise ValueError(f"optimizer.name must be sgd or adam, got {spec.name!r}")
        self._scratch = np.empty(size, self.dtype)

    def _c(self, x: float):
        return self.dtype.type(x)

    def apply(self, params: np.ndarray, grad: np.ndarray, step: int) -> None:
        """Update `params` in place with the mean gradient `grad`."""
        lr = self._c(learning_rate(self.spec, step, self.total_steps))
        if self.spec.name == "adam":
            self._adam(params, grad, lr)
        else:
            self._sgd(params, grad, lr)

    def _sgd(self, params, grad, lr):
        s = self.spec
        g = self._scratch
        if s.weight_decay:
            np.multiply(params, self._c(s.weight_decay), out=g)  # g = grad + wd * params
            g += grad
        else:
            np.copyto(g, grad)
        if s.momentum > 0:
            v = self.state["velocity"]
            v *= self._c(s.momentum)
            v += g  # v = mu * v + g
            if s.nesterov:
                tmp = self._tmp()
                np.multiply(v, self._c(s.momentum), out=tmp)
                g += tmp  # update = g + mu * v
            else:
                np.copyto(g, v)
        g *= lr
        params -= g

    def _tmp(self) -> np.ndarray:
        if not hasattr(self, "_scratch2"):
            self._scratch2 = np.empty(self.size, self.dtype)
        return self._scratch2

    def _adam(self, params, grad, lr):
        s = self.spec
        if s.weight_decay:
            params -= params * (lr * self._c(s.weight_decay))
        m, v = self.state["m"], self.state["v"]
        self.state["t"] = np.array(int(self.state["t"]) + 1, dtype=np.int64)
        t = int(self.state["t"])
        m *= self._c(s.beta1)
        m += grad * self._c(1 - s.beta1)
        v *= self._c(s.beta2)
        v += np.square(grad) * self._c(1 - s.beta2)
        m_hat_scale = self._c(1 / (1 - s.beta1 ** t))
        v_hat_scale = self._c(1 / (1 - s.beta2 ** t))
        denom = self._tmp()
        np.multiply(v, v_hat_scale, out=denom)
        np.sqrt(denom, out=denom)
        denom += self._c(s.eps)
        step = self._scratch
        np.multiply(m, m_hat_scale, out=step)
        step /= denom
        step *= lr
        params -= step

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if set(state) != set(self.state):
            raise ValueError(f"optimizer state must hold {sorted(self.state)}, got {sorted(state)}")
        for k, v in state.items():
            v = np.asarray(v)
            if v.shape != self.state[k].shape:
                raise ValueError(f"optimizer state {k!r} has shape {v.shape}, expected {self.state[k].shape}")
            self.state[k] = v.astype(self.state[k].dtype, copy=True)


def make_optimizer(spec, size: int, dtype, total_steps: int) -> Optimizer:
    return Optimizer(spec, size, dtype, total_steps)
