"""Logical shards: the unit of work and of determinism.

The training rows are kept in *shard order* (`shard_order`: a seeded
permutation of the split's training rows, which is also how a prepared data
set stores them, docs/data.md), so shard s of any shard count S owns one
contiguous range of them (`shard_range`). `(seed, epoch, s)`
fixes the order in which it visits them; step t takes the shard's next slice
of that order, running on into the next epoch's order when one is used up.
Because a shard takes the same number of rows every step, where it is in its
data is a pure function of the step: a resumed job needs nothing but the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


SHARD_ORDER_KEY = 0x54A2D


def shard_order(n_train: int, seed: int) -> np.ndarray:
    """The permutation putting the split's training rows in shard order:
    stored row i is training row `shard_order(...)[i]`."""
    return np.random.default_rng([seed, SHARD_ORDER_KEY]).permutation(n_train)


def shard_rows(n_train: int, shards: int, seed: int) -> list[np.ndarray]:
    """The training-row indices each shard owns: the shard order cut into
    `shards` nearly equal parts (sizes differ by at most one, larger first)."""
    _check_count(n_train, shards)
    return np.array_split(shard_order(n_train, seed), shards)


def shard_range(n_train: int, shards: int, shard: int) -> tuple[int, int]:
    """The stored rows [start, stop) shard `shard` of `shards` owns: the same
    cut as `shard_rows` (`np.array_split`), made on rows in shard order."""
    _check_count(n_train, shards)
    size, extra = divmod(n_train, shards)
    start = shard * size + min(shard, extra)
    return start, start + size + (1 if shard < extra else 0)


def _check_count(n_train: int, shards: int) -> None:
    if not 1 <= shards <= n_train:
        raise ValueError(f"shards must be in [1, {n_train}] (the training rows), got {shards}")


def shard_batch_size(batch_size: int, shards: int, shard: int) -> int:
    """Rows shard `shard` contributes to each step: the global batch spread
    over the shards, the remainder going one row each to the first shards."""
    return batch_size // shards + (1 if shard < batch_size % shards else 0)


@dataclass
class Shard:
    """One logical shard: its rows and how it walks through them step by step.

    It owns stored rows [start, stop) and holds no per-row array but the
    orders of the epochs its steps are in, so a driver or a worker can hold
    every shard of a job however large its data."""

    index: int
    start: int
    stop: int  # owns stored (shard-ordered) training rows [start, stop)
    batch_size: int  # rows per step
    seed: int
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def order(self, epoch: int) -> np.ndarray:
        """The shard's rows in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            if len(self._orders) > 2:  # keep a few epochs: a step spans at most a couple
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, 0xE90C, epoch, self.index])
            self._orders[epoch] = self.start + rng.permutation(self.stop - self.start)
        return self._orders[epoch]

    def batch(self, step: int) -> np.ndarray:
        """Stored-row indices of this shard's mini-batch for step `step` (0-based)."""
        n = self.stop - self.start
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
    """All S logical shards of a job over `n_train` rows in shard order;
    `seed` fixes each shard's walk through its rows."""
    return [Shard(s, *shard_range(n_train, shards, s), shard_batch_size(batch_size, shards, s), seed)
            for s in range(shards)]
