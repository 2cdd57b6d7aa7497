"""The multilayer perceptron: forward pass, backpropagation and model files.

Every weight and bias lives in one flat vector, `params`; each layer's W and b
are views into it, and gradients come back in the same layout, so they can be
summed, averaged and shipped as one buffer. Layer l computes
a_l = y_{l-1} @ W_l + b_l and y_l = f(a_l), with W of shape (fan_in, fan_out).
"""

from __future__ import annotations

import json
import os
import tempfile
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
CONFIG_KEYS = ("sizes", "activation", "output", "loss", "bias", "init", "seed", "dtype")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_config(sizes, activation, output, loss, bias, init, seed, dtype) -> dict:
    """The architecture as a plain JSON-able dict; ValueError naming any bad argument."""
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise ValueError(f"sizes must list layer widths, got {sizes!r}")
    sizes = list(sizes)
    if len(sizes) < 2 or not all(_is_int(s) and s >= 1 for s in sizes):
        raise ValueError(f"sizes must list at least two layer widths >= 1, got {sizes!r}")
    hidden_activation(activation)
    loss_function(loss).check_output(output_activation(output))
    if output == "softmax" and sizes[-1] < 2:
        raise ValueError(f"output 'softmax' needs at least 2 output units, got sizes[-1] = {sizes[-1]}")
    if not isinstance(bias, (bool, np.bool_)):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {"sizes": [int(s) for s in sizes], "activation": activation, "output": output, "loss": loss,
            "bias": bool(bias), "init": init, "seed": int(seed), "dtype": dtype}


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
        self._setup(check_config(sizes, activation, output, loss, bias, init, seed, dtype), None)
        rng = np.random.default_rng(seed)
        for (W, _), (fan_in, fan_out) in zip(self.layers, self._shapes):
            # drawn in float64 and rounded once, so float32 and float64 nets start alike
            W[...] = rng.standard_normal((fan_in, fan_out)) * INITS[init](fan_in, fan_out)

    def _setup(self, config: dict, params: np.ndarray | None) -> None:
        self.config = config
        self.hidden = hidden_activation(config["activation"])
        self.output = output_activation(config["output"])
        self.loss = loss_function(config["loss"])
        self.dtype = np.dtype(config["dtype"])
        sizes = config["sizes"]
        self._shapes = list(zip(sizes, sizes[1:]))
        self._bias = config["bias"]
        self._n_params = sum(i * o + (o if self._bias else 0) for i, o in self._shapes)
        if params is None:
            params = np.zeros(self._n_params, dtype=self.dtype)
        self.params = self._check_flat("params", params, writeable=False)
        self.layers = self._views(params)
        self._normalizer = None

    def layer_bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of each layer's W and b in the flat vector, in layer order."""
        bounds, at = [], 0
        for fan_in, fan_out in self._shapes:
            size = fan_in * fan_out + (fan_out if self._bias else 0)
            bounds.append((at, at + size))
            at += size
        return bounds

    def _views(self, flat: np.ndarray) -> list:
        """(W, b) of every layer as views of `flat`: W row-major, then b."""
        views = []
        for (fan_in, fan_out), (at, stop) in zip(self._shapes, self.layer_bounds()):
            W = flat[at:at + fan_in * fan_out].reshape(fan_in, fan_out)
            b = flat[at + fan_in * fan_out:stop] if self._bias else None
            views.append((W, b))
        return views

    def _check_flat(self, name: str, flat, writeable: bool) -> np.ndarray:
        if not isinstance(flat, np.ndarray):
            raise ValueError(f"{name} must be a numpy array, got {type(flat).__name__}")
        if flat.ndim != 1 or flat.size != self._n_params or flat.dtype != self.dtype:
            raise ValueError(f"{name} must be a 1-D {self.dtype} array of {self._n_params} values, "
                             f"got {flat.dtype} of shape {flat.shape}")
        if not flat.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
        if writeable and not flat.flags.writeable:
            raise ValueError(f"{name} must be writeable")
        return flat

    @classmethod
    def from_config(cls, config: dict, params: np.ndarray | None = None) -> "MLP":
        """The network `config` describes; with `params`, a copy of them as its parameters."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        missing = [k for k in CONFIG_KEYS if k not in config]
        if unknown or missing:
            raise ValueError(f"config keys must be {', '.join(CONFIG_KEYS)}; unknown {unknown}, missing {missing}")
        net = cls(**config)
        if params is not None:
            net.params[:] = net._check_flat("params", np.asarray(params), writeable=False)
        return net

    def bind(self, params: np.ndarray) -> "MLP":
        """The same network computing with `params` (no copy; may be read-only)."""
        net = object.__new__(MLP)
        net._setup(self.config, params)
        net._normalizer = self._normalizer
        return net

    @property
    def normalizer(self):
        """None or (mean, scale): predict() feeds the net (x_raw - mean) / scale."""
        return self._normalizer

    @normalizer.setter
    def normalizer(self, value) -> None:
        if value is None:
            self._normalizer = None
            return
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError("normalizer must be None or a (mean, scale) pair")
        pair = []
        for name, v in zip(("mean", "scale"), value):
            # float64, like core.data.standardize, so prediction repeats training's bits
            v = np.array(v, dtype=np.float64)
            if v.shape != (self._shapes[0][0],) or not np.isfinite(v).all():
                raise ValueError(f"normalizer {name} must be {self._shapes[0][0]} finite values, got shape {v.shape}")
            v.flags.writeable = False
            pair.append(v)
        if (pair[1] == 0).any():
            raise ValueError("normalizer scale must be nonzero everywhere")
        self._normalizer = tuple(pair)

    # ------------------------------------------------------------ maths

    def _inputs(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self._shapes[0][0]:
            raise ValueError(f"X must have shape (n, {self._shapes[0][0]}), got {X.shape}")
        if X.dtype.kind not in "fiub":
            raise ValueError(f"X must be numeric, got dtype {X.dtype}")
        return X.astype(self.dtype, copy=False)  # cast once here; the maths stays in dtype

    def _targets(self, Y, n: int) -> Targets:
        Y = np.asarray(Y)
        k = self._shapes[-1][1]
        if Y.shape[0:1] != (n,):
            raise ValueError(f"Y must have one row per input row ({n}), got shape {Y.shape}")
        if Y.ndim == 1 and Y.dtype.kind in "iub":
            top = max(k, 2) - 1  # a single unit takes 0/1 labels
            if n and (Y.min() < 0 or Y.max() > top):
                raise ValueError(f"labels must be in [0, {top}], got values in [{Y.min()}, {Y.max()}]")
            if k == 1:  # a single sigmoid unit: the 0/1 labels are the targets
                return Targets(matrix=Y.astype(self.dtype).reshape(n, 1))
            return Targets(labels=Y)
        if Y.ndim == 1 and k == 1 and Y.dtype.kind == "f":
            Y = Y.reshape(n, 1)
        if Y.ndim != 2 or Y.shape[1] != k or Y.dtype.kind not in "fiub":
            raise ValueError(f"Y must be integer labels of shape ({n},) or a float matrix of shape ({n}, {k}), "
                             f"got {Y.dtype} of shape {Y.shape}")
        return Targets(matrix=Y.astype(self.dtype, copy=False))

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

    # Underflow to zero is the right answer for e^(-huge) and tiny products, so
    # it never warns; overflow, invalid and division stay the caller's to trap.
    def forward(self, X) -> np.ndarray:
        """Output activations (n, k) for network inputs (already standardized)."""
        with np.errstate(under="ignore"):
            _, a = self._forward(self._inputs(X))
            return self.output.forward(a)

    def predict(self, X) -> np.ndarray:
        """Output activations (n, k) for raw rows: the model's own standardization
        first. Class probabilities for softmax; never bare labels."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self._shapes[0][0]:
            raise ValueError(f"rows must have shape (n, {self._shapes[0][0]}), got {X.shape}")
        if self._normalizer is not None:
            from core.data import standardize  # the same arithmetic as training data
            X = standardize(X, *self._normalizer, self.dtype)
        return self.forward(X)

    def loss_sum(self, X, Y) -> float:
        """Sum over the batch of the per-sample loss (no gradient)."""
        X = self._inputs(X)
        targets = self._targets(Y, len(X))
        if len(X) == 0:
            return 0.0
        with np.errstate(under="ignore"):
            _, a = self._forward(X)
            loss, _ = self.loss.loss_and_delta(a, targets, self.output)
        return float(loss)

    def grad_sum(self, X, Y, out: np.ndarray | None = None) -> tuple[float, np.ndarray, int]:
        """SUM over the batch of per-sample losses and gradients, and the count.

        Backpropagation: with delta_L = dE/da_L from the loss, for each layer l
        from the last: dE/dW_l = y_{l-1}^T delta_l, dE/db_l = sum_rows delta_l,
        and delta_{l-1} = f'(a_{l-1}) * (delta_l W_l^T) (skipped for the input).
        Summing rather than averaging is what lets shards be added exactly.
        Every buffer is local to the call, so threads may share one network."""
        X = self._inputs(X)
        n = len(X)
        targets = self._targets(Y, n)
        grad = np.empty_like(self.params) if out is None else self._check_flat("out", out, writeable=True)
        if n == 0:
            grad.fill(0)
            return 0.0, grad, 0
        with np.errstate(under="ignore"):
            ys, a = self._forward(X)
            loss, delta = self.loss.loss_and_delta(a, targets, self.output)
            grads = self._views(grad)
            ones = np.ones(n, dtype=self.dtype) if self._bias else None
            for i in range(len(self.layers) - 1, -1, -1):
                gW, gb = grads[i]
                np.matmul(ys[i].T, delta, out=gW)  # straight into the flat buffer
                if gb is not None:
                    # the column sums of delta as 1^T delta: a third of np.sum's time
                    np.matmul(ones, delta, out=gb)
                if i > 0:
                    delta = np.matmul(delta, self.layers[i][0].T)
                    self.hidden.backward(ys[i], delta)
        return float(loss), grad, n

    def loss_and_grad(self, X, Y) -> tuple[float, np.ndarray]:
        """Mean loss over the batch and its gradient (same layout as params)."""
        loss, grad, n = self.grad_sum(X, Y)
        if n == 0:
            raise ValueError("loss_and_grad needs at least one row; grad_sum takes empty batches")
        grad /= self.dtype.type(n)
        return loss / n, grad

    # ------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        """One .npz: `params`, the architecture as JSON text, the standardization.

        Written to a temporary file that is synced and renamed over `path`, so a
        crash leaves the old file or the new one, never half of one."""
        arrays = {"params": self.params, "config": np.array(json.dumps(self.config))}
        if self._normalizer is not None:
            arrays["mean"], arrays["scale"] = self._normalizer
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "MLP":
        """Read a model file written by `save`; never unpickles, checks everything."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, EOFError, AttributeError) as err:
            raise ValueError(f"{path}: not a readable model file ({err})") from None
        missing = [k for k in ("params", "config") if k not in arrays]
        if missing:
            raise ValueError(f"{path}: model file lacks {', '.join(missing)}")
        unknown = sorted(set(arrays) - {"params", "config", "mean", "scale"})
        if unknown:
            raise ValueError(f"{path}: model file has unexpected arrays {unknown}")
        text = arrays["config"]
        if text.dtype.kind != "U" or text.size != 1:
            raise ValueError(f"{path}: config must be one JSON string, got {text.dtype} of shape {text.shape}")
        try:
            net = cls.from_config(json.loads(text.reshape(()).item()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: config is not valid JSON ({err})") from None
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: bad architecture in model file ({err})") from None
        params = arrays["params"]
        if params.dtype != net.dtype:
            raise ValueError(f"{path}: params have dtype {params.dtype}, the architecture says {net.dtype}")
        if params.shape != net.params.shape:
            raise ValueError(f"{path}: params have shape {params.shape}, the architecture needs {net.params.shape}")
        net.params[:] = params
        if ("mean" in arrays) != ("scale" in arrays):
            raise ValueError(f"{path}: model file has one of mean/scale without the other")
        if "mean" in arrays:
            for name in ("mean", "scale"):
                if arrays[name].dtype != np.float64:
                    raise ValueError(f"{path}: {name} must be float64, got {arrays[name].dtype}")
            try:
                net.normalizer = (arrays["mean"], arrays["scale"])
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
        return net

    def __repr__(self) -> str:
        c = self.config
        return (f"MLP({c['sizes']}, activation={c['activation']!r}, output={c['output']!r}, "
                f"loss={c['loss']!r}, bias={c['bias']}, dtype={c['dtype']!r})")
