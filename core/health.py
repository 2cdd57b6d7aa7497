"""Training health of one step: the gradient's norm and each layer's
update-to-weight ratio.

Both are measured from flat vectors in the MLP's layout (each layer's W then
b, one contiguous range: `MLP.layer_bounds`), as per-layer sums of squares in
float64. Sums of squares rather than norms, because a slice of the vector
can measure its part alone: k parameter servers each measure their slice and
`StepHealth.join` adds the parts in slice order before any square root. With
one slice the numbers are those of the whole vector, bit for bit.

    gradient_norm    = ||g||_2, g the mean gradient the step applied
    update_ratio[l]  = ||W_l' - W_l||_2 / ||W_l||_2 over layer l's weights and bias,
                       W before the step and W' after (None while ||W_l|| is 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Bounds = Sequence[tuple[int, int]]


def _part(vec: np.ndarray, start: int, stop: int, offset: int) -> slice:
    """The positions in `vec` (elements [offset, offset + vec.size) of the
    flat vector) of the flat range [start, stop)."""
    lo, hi = max(start, offset) - offset, min(stop, offset + vec.size) - offset
    return slice(lo, max(lo, hi))


def squares(vec: np.ndarray, layers: Bounds, offset: int = 0) -> tuple[float, ...]:
    """Per layer, the float64 sum of squares of the part of it `vec` holds.

    numpy's pairwise sum over a contiguous float64 array, never BLAS: its
    result depends on the data alone, not on a thread count."""
    return tuple(float(np.square(vec[_part(vec, a, b, offset)], dtype=np.float64).sum()) for a, b in layers)


def difference_squares(after: np.ndarray, before: np.ndarray, layers: Bounds, offset: int = 0) -> tuple[float, ...]:
    """Per layer, the float64 sum of squares of `after - before`."""
    out = []
    for a, b in layers:
        part = _part(after, a, b, offset)
        delta = np.subtract(after[part], before[part], dtype=np.float64)
        out.append(float(np.square(delta).sum()))
    return tuple(out)


@dataclass(frozen=True)
class StepHealth:
    """A step's per-layer sums of squares (of a slice of the vector, or of all of it)."""

    gradient_sq: tuple[float, ...]  # ||g_l||^2
    update_sq: tuple[float, ...]  # ||W_l' - W_l||^2
    weight_sq: tuple[float, ...]  # ||W_l||^2, before the step

    @staticmethod
    def measure(grad: np.ndarray, before: np.ndarray, after: np.ndarray, layers: Bounds,
                offset: int = 0) -> "StepHealth":
        """The step that turned `before` into `after` with mean gradient
        `grad`, all three holding the flat vector's elements from `offset` on."""
        return StepHealth(squares(grad, layers, offset), difference_squares(after, before, layers, offset),
                          squares(before, layers, offset))

    @staticmethod
    def join(parts: Sequence["StepHealth"]) -> "StepHealth":
        """The whole vector's from its slices', added in slice order."""
        if len(parts) == 1:
            return parts[0]

        def add(field: str) -> tuple[float, ...]:
            return tuple(sum(values) for values in zip(*(getattr(p, field) for p in parts)))

        return StepHealth(add("gradient_sq"), add("update_sq"), add("weight_sq"))

    @property
    def gradient_norm(self) -> float:
        """||g||: inf or nan for a non-finite gradient (a skipped step)."""
        return math.sqrt(sum(self.gradient_sq))

    @property
    def update_ratio(self) -> list[float | None]:
        return [math.sqrt(u) / math.sqrt(w) if w > 0 else None for u, w in zip(self.update_sq, self.weight_sq)]

    def fields(self) -> dict:
        """The step record's fields (core.trainer.step_record)."""
        return {"gradient_norm": self.gradient_norm, "update_ratio": self.update_ratio}
