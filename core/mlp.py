"""The multilayer perceptron: forward pass, backpropagation and model files.

Every weight and bias lives in one flat vector, `params`; each layer's W and b
are views into it, and gradients come back in the same layout, so they can be
summed, averaged and shipped as one buffer. Layer l computes
a_l = y_{l-1} @ W_l + b_l and y_l = f(a_l), with W of shape (fan_in, fan_out).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.activations import hidden_activation, output_activation
from core.losses import Targets, loss_function

INITS = {
    # standard deviation of the normal draw for a layer with these fan-in/fan-out
    "he": lambda fan_in, fan_out: np.sqrt(2.0 / fan_in),
    "xavier": lambda fan_in, fan_out: np.sqrt(2.0 / (fan_in + fan_out)),
    "lecun": lambda fan_in, fan_out: np.sqrt(1.0 / fan_in),
}
DTYPES = ("float32", "float64")


class MLP:
    """A fully connected network.

    sizes:      layer widths, input first: [64, 32, 10]; [4, 3] has no hidden layer.
    activation: hidden layers' nonlinearity: "relu" (default), "tanh", "sigmoid".
    output:     "softmax" (default), "sigmoid" or "identity".
    loss:       "cross_entropy" (default; softmax or sigmoid output) or "squared_error".
    bias:       whether layers add a bias (default True).
    init:       weight scale: "he" (default), "xavier" or "lecun"; biases start at 0.
    seed:       seeds the initial weights (default 0).
    dtype:      "float32" (default) or "float64"; all arithmetic stays in it.
    """

    def __init__(self, sizes, activation: str = "relu", output: str = "softmax",
                 loss: str = "cross_entropy", bias: bool = True, init: str = "he",
                 seed: int = 0, dtype: str = "float32"):
        sizes = list(sizes)
        if len(sizes) < 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in sizes):
            raise ValueError(f"sizes must list at least two layer widths >= 1, got {sizes!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.config = {"sizes": [int(s) for s in sizes], "activation": activation, "output": output,
                       "loss": loss, "bias": bool(bias), "init": init, "seed": int(seed), "dtype": str(dtype)}
        self._setup(None)
        rng = np.random.default_rng(seed)
        for (W, b), fan_in, fan_out in zip(self.layers, sizes, sizes[1:]):
            W[...] = rng.standard_normal((fan_in, fan_out)) * INITS[init](fan_in, fan_out)
            if b is not None:
                b[...] = 0

    def _setup(self, params: np.ndarray | None) -> None:
        c = self.config
        self.hidden = hidden_activation(c["activation"])
        self.output = output_activation(c["output"])
        self.loss = loss_function(c["loss"])
        self.loss.check_output(self.output)
        self.dtype = np.dtype(c["dtype"])
        sizes = c["sizes"]
        shapes = [((i, o), o if c["bias"] else 0) for i, o in zip(sizes, sizes[1:])]
        total = sum(i * o + nb for (i, o), nb in shapes)
        if params is None:
            params = np.zeros(total, dtype=self.dtype)
        elif params.ndim != 1 or params.size != total or params.dtype != self.dtype:
            raise ValueError(f"params must be a 1-D {self.dtype} array of {total} values, "
                             f"got {params.dtype} of shape {params.shape}")
        self.params = params
        self.layers = self._views(params, shapes)
        self._shapes = shapes
        self.normalizer = getattr(self, "normalizer", None)

    @staticmethod
    def _views(flat: np.ndarray, shapes) -> list:
        views, at = [], 0
        for (fan_in, fan_out), nb in shapes:
            W = flat[at:at + fan_in * fan_out].reshape(fan_in, fan_out)
            at += fan_in * fan_out
            b = flat[at:at + nb] if nb else None
            at += nb
            views.append((W, b))
        return views

    @classmethod
    def from_config(cls, config: dict, params: np.ndarray | None = None) -> "MLP":
        c = dict(config)
        net = cls(c["sizes"], c["activation"], c["output"], c["loss"], c["bias"], c["init"], c["seed"], c["dtype"])
        if params is not None:
            net.params[:] = params
        return net

    def bind(self, params: np.ndarray) -> "MLP":
        """The same network computing with `params` (no copy; may be read-only)."""
        net = object.__new__(MLP)
        net.config = self.config
        net.normalizer = self.normalizer
        net._setup(params)
        return net

    # ------------------------------------------------------------ maths

    def _inputs(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.config["sizes"][0]:
            raise ValueError(f"X must have shape (n, {self.config['sizes'][0]}), got {X.shape}")
        if X.dtype != self.dtype:
            X = X.astype(self.dtype)
        return X

    def _targets(self, Y, n: int) -> Targets:
        Y = np.asarray(Y)
        k = self.config["sizes"][-1]
        if Y.shape[0:1] != (n,):
            raise ValueError(f"Y must have one row per input row ({n}), got shape {Y.shape}")
        if Y.ndim == 1 and Y.dtype.kind in "iub":
            if n and (Y.min() < 0 or Y.max() >= max(k, 2)):
                raise ValueError(f"labels must be in [0, {max(k, 2) - 1}], got values in [{Y.min()}, {Y.max()}]")
            if k == 1:  # a single sigmoid unit: the 0/1 labels are the targets
                return Targets(matrix=Y.astype(self.dtype).reshape(n, 1))
            return Targets(labels=Y)
        if Y.ndim == 1 and k == 1:
            Y = Y.reshape(n, 1)
        if Y.ndim != 2 or Y.shape[1] != k:
            raise ValueError(f"targets must be integer labels (n,) or a float matrix (n, {k}), got shape {Y.shape}")
        return Targets(matrix=np.asarray(Y, dtype=self.dtype))

    def _forward(self, X: np.ndarray) -> tuple[list, np.ndarray]:
        """Hidden outputs y_0 = X, y_1, ... and the output layer's sums a_L."""
        ys, y = [X], X
        last = len(self.layers) - 1
        for i, (W, b) in enumerate(self.layers):
            a = np.matmul(y, W)
            if b is not None:
                a += b
            if i == last:
                return ys, a
            y = self.hidden.forward(a)
            ys.append(y)
        raise AssertionError("unreachable")

    def forward(self, X) -> np.ndarray:
        """Output activations (n, k) for network inputs (already standardized)."""
        _, a = self._forward(self._inputs(X))
        return self.output.forward(a)

    def predict(self, X) -> np.ndarray:
        """Output activations (n, k) for raw rows: the model's own standardization
        first. Class probabilities for softmax; never bare labels."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.config["sizes"][0]:
            raise ValueError(f"rows must have shape (n, {self.config['sizes'][0]}), got {X.shape}")
        if self.normalizer is not None:
            from core.data import standardize  # the same arithmetic as training data
            X = standardize(X, *self.normalizer, self.dtype)
        return self.forward(X)

    def loss_sum(self, X, Y) -> float:
        """Sum over the batch of the per-sample loss (no gradient)."""
        X = self._inputs(X)
        _, a = self._forward(X)
        loss, _ = self.loss.loss_and_delta(a, self._targets(Y, len(X)), self.output)
        return float(loss)

    def grad_sum(self, X, Y, out: np.ndarray | None = None) -> tuple[float, np.ndarray, int]:
        """SUM over the batch of per-sample losses and gradients, and the count.

        Backpropagation: with delta_L = dE/da_L from the loss, for each layer l
        from the last: dE/dW_l = y_{l-1}^T delta_l, dE/db_l = sum_rows delta_l,
        and delta_{l-1} = f'(a_{l-1}) * (delta_l W_l^T) (skipped for the input).
        Summing rather than averaging is what lets shards be added exactly."""
        X = self._inputs(X)
        n = len(X)
        targets = self._targets(Y, n)
        grad = np.empty_like(self.params) if out is None else out
        if n == 0:
            grad.fill(0)
            return 0.0, grad, 0
        ys, a = self._forward(X)
        loss, delta = self.loss.loss_and_delta(a, targets, self.output)
        grads = self._views(grad, self._shapes)
        for i in range(len(self.layers) - 1, -1, -1):
            (W, b), (gW, gb) = self.layers[i], grads[i]
            np.matmul(ys[i].T, delta, out=gW)
            if gb is not None:
                np.sum(delta, axis=0, out=gb)
            if i > 0:
                delta = np.matmul(delta, W.T)
                self.hidden.backward(ys[i], delta)
        return float(loss), grad, n

    def loss_and_grad(self, X, Y) -> tuple[float, np.ndarray]:
        """Mean loss over the batch and its gradient (same layout as params)."""
        loss, grad, n = self.grad_sum(X, Y)
        if n:
            grad /= self.dtype.type(n)
        return loss / max(n, 1), grad

    # ------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """One .npz: `params`, the architecture as JSON text, the standardization."""
        arrays = {"params": self.params, "config": np.array(json.dumps(self.config))}
        if self.normalizer is not None:
            arrays["mean"], arrays["scale"] = self.normalizer
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "MLP":
        """Read a model file written by `save`; never unpickles."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path}: not a readable model file ({err})") from None
        missing = [k for k in ("params", "config") if k not in arrays]
        if missing:
            raise ValueError(f"{path}: model file lacks {', '.join(missing)}")
        try:
            config = json.loads(str(arrays["config"]))
            net = cls.from_config(config)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: bad architecture in model file ({err})") from None
        params = arrays["params"]
        if params.shape != net.params.shape or params.dtype != net.params.dtype:
            raise ValueError(f"{path}: params hold {params.dtype}{params.shape}, the architecture needs "
                             f"{net.params.dtype}{net.params.shape}")
        net.params[:] = params
        if "mean" in arrays and "scale" in arrays:
            net.normalizer = (arrays["mean"], arrays["scale"])
        return net
