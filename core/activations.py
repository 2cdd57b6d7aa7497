"""Activation functions: the nonlinearity each layer applies to its weighted sums.

Every activation works in place on an (n, k) array in the network's dtype:
`forward(a)` overwrites the weighted sums `a` with `y = f(a)`, and
`backward(y, grad)` turns the gradient with respect to the outputs `y` into
the gradient with respect to the sums, again in place. Backward needs only the
outputs `y`, so the sums never have to be kept.
"""

from __future__ import annotations

import numpy as np


class Activation:
    """One activation function; subclasses fill in forward and backward."""

    name = ""

    def forward(self, a: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def backward(self, y: np.ndarray, grad: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def stable_sigmoid(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-a) without ever exponentiating a positive number.

    sigmoid(a) = e^min(a, 0) / (1 + e^-|a|): for a >= 0 that is 1 / (1 + e^-a),
    for a < 0 it is e^a / (1 + e^a); both exponents are <= 0, so nothing
    overflows. (One formula rather than a masked choice between two: masks
    that flip at random cost more here than a second exp.) `out` may be `a`.
    """
    denominator = np.abs(a)
    np.negative(denominator, out=denominator)
    np.exp(denominator, out=denominator)
    denominator += 1
    np.minimum(a, 0, out=out)
    np.exp(out, out=out)
    out /= denominator
    return out


class Sigmoid(Activation):
    name = "sigmoid"

    def forward(self, a):
        return stable_sigmoid(a, out=a)

    def backward(self, y, grad):
        """d sigmoid(a) / da = sigmoid(a) * (1 - sigmoid(a)) = y * (1 - y)."""
        one_minus_y = np.subtract(1, y, dtype=y.dtype)
        grad *= y
        grad *= one_minus_y
        return grad


class Tanh(Activation):
    name = "tanh"

    def forward(self, a):
        return np.tanh(a, out=a)

    def backward(self, y, grad):
        """d tanh(a) / da = 1 - tanh(a)^2 = 1 - y^2."""
        slope = np.multiply(y, y)
        np.subtract(1, slope, out=slope)
        grad *= slope
        return grad


class ReLU(Activation):
    name = "relu"

    def forward(self, a):
        # Against a row of zeros rather than the scalar 0: numpy's maximum takes
        # its vectorized loop only when both operands are arrays (3x faster).
        return np.maximum(a, np.zeros(a.shape[-1], dtype=a.dtype), out=a)

    def backward(self, y, grad):
        """d relu(a) / da = 1 where a > 0 (equivalently y > 0), else 0.

        At a = 0 we take the subgradient 0, as everyone does.
        """
        # A multiply by the 0/1 mask: copyto(..., where=) branches on every
        # element and is ten times slower on the random masks relu makes.
        np.multiply(grad, y > 0, out=grad)
        return grad


class Identity(Activation):
    name = "identity"

    def forward(self, a):
        return a

    def backward(self, y, grad):
        """d a / da = 1: the gradient passes through unchanged."""
        return grad


def shift_by_row_max(a: np.ndarray) -> np.ndarray:
    """a -= the maximum of each row, in place: afterwards every entry is <= 0.

    Subtracting a row constant leaves softmax and log-softmax unchanged and
    keeps every exponent <= 0, so nothing overflows and each row's sum of
    exponentials is >= 1. (argmax and a gather: three times faster than
    a.max(axis=1) on rows as narrow as a classifier's.)
    """
    if not a.flags.c_contiguous:
        a -= a.max(axis=1, keepdims=True)
        return a
    n, k = a.shape
    top = a.reshape(-1).take(a.argmax(axis=1) + np.arange(0, n * k, k))
    a -= top[:, None]
    return a


def row_sums(a: np.ndarray) -> np.ndarray:
    """The sum of each row as an (n, 1) column (a product with ones: on narrow
    rows several times faster than a.sum(axis=1))."""
    return np.matmul(a, np.ones((a.shape[1], 1), dtype=a.dtype))


class Softmax(Activation):
    """Softmax over each row: y_j = e^(a_j) / sum_i e^(a_i)."""

    name = "softmax"

    def forward(self, a):
        shift_by_row_max(a)
        np.exp(a, out=a)
        a /= row_sums(a)
        return a

    def backward(self, y, grad):
        """The softmax Jacobian is dy_j/da_m = y_j (delta_jm - y_m), so

        dL/da_m = sum_j dL/dy_j * y_j (delta_jm - y_m) = y_m (g_m - sum_j g_j y_j)
        with g = dL/dy. Softmax is not elementwise: every output moves every sum.
        """
        inner = np.einsum("ij,ij->i", grad, y)[:, None]
        grad -= inner
        grad *= y
        return grad


HIDDEN = {cls.name: cls() for cls in (Sigmoid, Tanh, ReLU)}
OUTPUT = {cls.name: cls() for cls in (Softmax, Sigmoid, Identity)}


def _lookup(table: dict, argument: str, name) -> Activation:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{argument} must be one of {', '.join(sorted(table))}, got {name!r}")
    return table[name]


def hidden_activation(name: str) -> Activation:
    """The hidden-layer activation called `name` (ValueError for an unknown name)."""
    return _lookup(HIDDEN, "activation", name)


def output_activation(name: str) -> Activation:
    """The output-layer activation called `name` (ValueError for an unknown name)."""
    return _lookup(OUTPUT, "output", name)
