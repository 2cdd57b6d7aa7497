"""Row sources: where a job's training and validation rows come from.

A trainer asks a row source for the standardized rows of a shard's batch
(`take`, by stored-row index: training rows are kept in shard order, so
shard s owns one contiguous range, core.shards.shard_range) and for
evaluation blocks of validation rows (`val_block`). Two kinds:

- `core.data.Dataset`: everything in memory, as a small built-in set or
  file is loaded.
- `PreparedRows`: a prepared data set on disk (core.prepared). A gradient
  worker `own`s the shards it is given: it checks each of their files
  against the manifest (size and SHA-256) and reads their rows, block by
  block, standardized into the job's dtype, so it holds those rows once and
  no raw copy beside them. Anything else (the reference trainer's batches,
  a shard not owned, validation blocks) is read from the memory-mapped
  blocks when asked for, each file checked the first time it is touched.

Both standardize as core.data.standardize does, with float64 statistics, so
the same rows give the same bits whichever source holds them.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

import numpy as np

from core.data import standardize
from core.prepared import PreparedSet
from core.prepared_manifest import block_name


class RowSource(Protocol):
    n_train: int
    n_val: int
    n_val_blocks: int
    n_features: int
    n_classes: int | None
    n_targets: int
    mean: np.ndarray | None
    scale: np.ndarray | None

    def own(self, ranges: Sequence[tuple[int, int]]) -> None: ...
    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def val_block(self, block: int) -> tuple[np.ndarray, np.ndarray]: ...


class PreparedRows:
    """A prepared set as a job's row source (see the module docstring)."""

    def __init__(self, prepared: PreparedSet, dtype, standardized: bool = True):
        self.prepared = prepared
        self.dtype = np.dtype(dtype)
        self.n_train, self.n_val = prepared.n_train, prepared.n_val
        self.n_features, self.n_classes, self.n_targets = prepared.n_features, prepared.n_classes, prepared.n_targets
        self.mean, self.scale = (prepared.mean, prepared.scale) if standardized else (None, None)
        self.eval_block_rows = prepared.eval_block_rows
        self.n_val_blocks = -(-self.n_val // self.eval_block_rows)
        self._owned: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._verified: set[str] = set()
        self._lock = threading.Lock()  # shards are computed on several threads

    # -- the files

    def _check(self, split: str, blocks: list[int]) -> None:
        """Every file of these blocks against the manifest, once each; a
        DataError names the first that is missing, truncated or altered."""
        for index in blocks:
            for kind in "Xy":
                path = block_name(split, kind, index)
                if path not in self._verified:
                    self.prepared.verify_file(path)
                    self._verified.add(path)

    # -- owned shards

    def own(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Hold exactly the stored training rows of `ranges` (each a shard's
        [start, stop)): forget the others, check and read the new ones."""
        wanted = {tuple(r) for r in ranges}
        with self._lock:
            for old in set(self._owned) - wanted:
                del self._owned[old]
            new = sorted(wanted - set(self._owned))
            for start, stop in new:  # every file first: no rows are read from a set that fails its check
                self._check("train", self.prepared.train_block_range(start, stop))
            for start, stop in new:
                self._owned[(start, stop)] = self._load(start, stop)

    def _load(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.prepared
        X, y = self._empty(stop - start, self.dtype)
        for index in p.train_block_range(start, stop):
            a, b = max(start, index * p.block_rows), min(stop, (index + 1) * p.block_rows)
            Xb, yb = p.read_train(a, b)
            X[a - start:b - start] = standardize(Xb, self.mean, self.scale, self.dtype)
            y[a - start:b - start] = yb
            del Xb, yb
            p.release()  # one block's raw pages mapped at a time
        return X, y

    def _empty(self, n: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        """Room for n rows' inputs (of `dtype`) and targets (int64 labels, or float64 targets)."""
        if self.n_classes is not None:
            return np.empty((n, self.n_features), dtype), np.empty(n, np.int64)
        return np.empty((n, self.n_features), dtype), np.empty((n, self.n_targets), np.float64)

    # -- rows

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardized inputs and targets of stored training rows `rows`."""
        if len(rows):
            low, high = int(rows.min()), int(rows.max())
            for (start, stop), (X, y) in list(self._owned.items()):  # `own` may change it on another thread
                if start <= low and high < stop:
                    return X[rows - start], y[rows - start]
        with self._lock:
            return self._gather(rows)

    def _gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows read from the mapped blocks (kept mapped: a bounded cache)."""
        p = self.prepared
        blocks = rows // p.block_rows
        X, y = self._empty(len(rows), p.dtype)
        for index in np.unique(blocks).tolist():
            self._check("train", [index])
            first = index * p.block_rows
            Xb, yb = p.read_train(first, min(first + p.block_rows, p.n_train))
            picked = blocks == index
            X[picked], y[picked] = Xb[rows[picked] - first], yb[rows[picked] - first]
        return standardize(X, self.mean, self.scale, self.dtype), y

    def val_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation block `block` (eval_block_rows stored validation rows,
        fewer at the end), standardized, its files checked on first use."""
        a = block * self.eval_block_rows
        b = min(a + self.eval_block_rows, self.n_val)
        with self._lock:
            self._check("val", self.prepared.val_block_range(a, b))
            X, y = self.prepared.read_val(a, b)
            X, y = standardize(X, self.mean, self.scale, self.dtype), np.array(y)
            self.prepared.release()
        return X, y
