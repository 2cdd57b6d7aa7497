"""Logical shards: the unit of work and of determinism.

Shard s of S owns a fixed subset of the training rows. `(seed, epoch, s)`
fixes the order in which it visits them; step t takes the shard's next slice
of that order, running on into the next epoch's order when one is used up.
Because a shard takes the same number of rows every step, where it is in its
data is a pure function of the step: a resumed job needs nothing but the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def shard_rows(n_train: int, shards: int, seed: int) -> list[np.ndarray]:
    """The training-row indices each shard owns: a seeded permutation cut into
    `shards` nearly equal parts (sizes differ by at most one, larger first)."""
    if not 1 <= shards <= n_train:
        raise ValueError(f"shards must be in [1, {n_train}] (the training rows), got {shards}")
    order = np.random.default_rng([seed, 0x54A2D]).permutation(n_train)
    return np.array_split(order, shards)


def shard_batch_size(batch_size: int, shards: int, shard: int) -> int:
    """Rows shard `shard` contributes to each step: the global batch spread
    over the shards, the remainder going one row each to the first shards."""
    return batch_size // shards + (1 if shard < batch_size % shards else 0)


@dataclass
class Shard:
    """One logical shard: its rows and how it walks through them step by step."""

    index: int
    rows: np.ndarray  # indices into the training split
    batch_size: int  # rows per step
    seed: int
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def order(self, epoch: int) -> np.ndarray:
        """The shard's rows in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            if len(self._orders) > 4:  # keep a few epochs: a step spans at most a couple
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, 0xE90C, epoch, self.index])
            self._orders[epoch] = self.rows[rng.permutation(len(self.rows))]
        return self._orders[epoch]

    def batch(self, step: int) -> np.ndarray:
        """Training-row indices of this shard's mini-batch for step `step` (0-based)."""
        n = len(self.rows)
        start = step * self.batch_size
        parts, remaining = [], self.batch_size
        while remaining:
            epoch, position = divmod(start, n)
            take = min(n - position, remaining)
            parts.append(self.order(epoch)[position:position + take])
            start += take
            remaining -= take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def make_shards(n_train: int, shards: int, batch_size: int, seed: int) -> list[Shard]:
    """All S logical shards of a job."""
    return [
        Shard(s, rows, shard_batch_size(batch_size, shards, s), seed)
        for s, rows in enumerate(shard_rows(n_train, shards, seed))
    ]
