"""Losses: how far the network's outputs are from the targets, and which way to move.

A loss takes the output layer's weighted sums `a`, the targets and the output
activation, and returns the SUM over samples of the per-sample loss together
with delta = dE/da, the gradient backpropagation starts from. Where the output
activation and the loss simplify together (softmax or sigmoid with cross
entropy: delta = p - t) the two are computed as one, which is both faster and
the only numerically stable way.
"""

from __future__ import annotations

import numpy as np

from core.activations import Activation, Sigmoid, Softmax, row_sums, shift_by_row_max, stable_sigmoid


class Targets:
    """What the outputs should be: integer class labels or a float target matrix.

    Labels y of shape (n,) stand for one-hot rows t_ij = [j == y_i] without ever
    building them; `matrix` is a float (n, k) array in the network's dtype.
    Exactly one of the two is set. The two operations backprop needs are
    "subtract t" and "sum of t * x", both cheap for labels.
    """

    __slots__ = ("labels", "matrix", "rows")

    def __init__(self, labels: np.ndarray | None = None, matrix: np.ndarray | None = None):
        if (labels is None) == (matrix is None):
            raise ValueError("Targets needs exactly one of labels or matrix")
        self.labels = labels
        self.matrix = matrix
        self.rows = np.arange(len(labels)) if labels is not None else None

    def _label_entries(self, x: np.ndarray):
        """x's entries at the labels, as something to read from and write to:
        flat positions into x itself when it is contiguous (one index array is
        cheaper than two), else a (rows, labels) pair."""
        if x.flags.c_contiguous:
            return x.reshape(-1), self.rows * x.shape[1] + self.labels
        return x, (self.rows, self.labels)

    def subtract_from(self, x: np.ndarray) -> np.ndarray:
        """x -= t, in place."""
        if self.labels is not None:
            view, at = self._label_entries(x)
            view[at] -= 1
        else:
            x -= self.matrix
        return x

    def dot(self, x: np.ndarray) -> np.floating:
        """sum over all samples and units of t * x."""
        if self.labels is not None:
            view, at = self._label_entries(x)
            return view[at].sum()
        return np.multiply(self.matrix, x).sum()

    def row_sums(self, dtype) -> np.ndarray | None:
        """sum_j t_ij as an (n, 1) column, or None when every row sums to 1 (labels)."""
        if self.labels is not None:
            return None
        return self.matrix.sum(axis=1, keepdims=True, dtype=dtype)


class Loss:
    """One loss; `loss_and_delta` may overwrite `a` and may return it as delta."""

    name = ""

    def check_output(self, output: Activation) -> None:
        """Raise ValueError if this loss cannot follow `output`."""

    def loss_and_delta(self, a: np.ndarray, targets: Targets, output: Activation):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredError(Loss):
    """Per sample E = 1/2 * sum_j (z_j - t_j)^2 with z = output(a), any output."""

    name = "squared_error"

    def loss_and_delta(self, a, targets, output):
        """dE/dz_j = z_j - t_j; dE/da = output.backward(z, z - t), which is

        (z - t) for identity, (z - t) * z * (1 - z) for sigmoid, and the
        softmax Jacobian applied to (z - t) for softmax.
        """
        z = output.forward(a)
        diff = targets.subtract_from(z.copy())
        # numpy's own pairwise sum, not a BLAS dot: its bits never depend on threads.
        loss = 0.5 * np.multiply(diff, diff).sum()
        return loss, output.backward(z, diff)


class CrossEntropy(Loss):
    """Cross entropy: categorical with softmax, per-unit binary with sigmoid.

    softmax: E = -sum_j t_j log p_j with p = softmax(a)
             = sum_j t_j * (logsumexp(a) - a_j).
    sigmoid: E = -sum_j [t_j log s_j + (1 - t_j) log(1 - s_j)] with s = sigmoid(a)
             = sum_j [softplus(a_j) - t_j a_j],
             softplus(a) = log(1 + e^a) = max(a, 0) + log1p(e^-|a|).
    Both rewrites never exponentiate a positive number, so huge sums stay finite.
    """

    name = "cross_entropy"

    def check_output(self, output):
        if not isinstance(output, (Softmax, Sigmoid)):
            raise ValueError(
                f"loss 'cross_entropy' needs output 'softmax' or 'sigmoid', got output {output.name!r}"
            )

    def loss_and_delta(self, a, targets, output):
        """softmax: dE/da_j = p_j * sum_i t_i - t_j, which is p - t when rows of t sum to 1.
        sigmoid: dE/da_j = s_j - t_j.
        """
        if isinstance(output, Softmax):
            return self._softmax(a, targets)
        return self._sigmoid(a, targets)

    @staticmethod
    def _softmax(a, targets):
        shift_by_row_max(a)  # shifted sums s = a - max(a) <= 0
        p = np.exp(a)
        total = row_sums(p)
        # E_i = sum_j t_ij (log total_i - s_ij): the max cancels out.
        log_total = np.log(total)
        weights = targets.row_sums(a.dtype)
        if weights is None:
            loss = log_total.sum() - targets.dot(a)
        else:
            loss = np.multiply(log_total, weights).sum() - targets.dot(a)
        p /= total
        if weights is not None:
            p *= weights
        return loss, targets.subtract_from(p)

    @staticmethod
    def _sigmoid(a, targets):
        softplus = np.abs(a)
        np.negative(softplus, out=softplus)
        np.exp(softplus, out=softplus)
        np.log1p(softplus, out=softplus)
        loss = np.maximum(a, 0).sum() + softplus.sum() - targets.dot(a)
        s = stable_sigmoid(a, out=a)
        return loss, targets.subtract_from(s)


LOSSES = {cls.name: cls() for cls in (SquaredError, CrossEntropy)}


def loss_function(name: str) -> Loss:
    """The loss called `name` (ValueError for an unknown name)."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(sorted(LOSSES))}, got {name!r}")
    return LOSSES[name]
