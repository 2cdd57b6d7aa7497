"""`prepare`: stream a source into a prepared data set, in bounded memory.

Three sequential passes over plain files, so memory holds a batch or a block
at a time whatever the source's size (plus 8 bytes per row for where each
row goes, and the split's permutations while they are computed):

1. the source's checked float64 rows are appended, in source order, to a
   work file (the row count is known only at its end);
2. once the split is known, that file is read in chunks and each row is
   appended to the work file of the block it belongs to, with its position;
3. each block is assembled in memory from its work file, in stored order,
   and written as `.npy` (hashed as it is written).

The standardization statistics are two passes over the training blocks in
stored order, each a sequential float64 sum row after row (the order numpy's
own axis-0 sum takes, so mean and std equal numpy's of the stored rows to the
bit). Everything is written under OUT.tmp-<random> beside OUT and renamed
into place: OUT is never a half-written set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.data import split_rows
from core.datafiles import DataError, DataLimits, classes_of
from core.prepare_sources import open_source
from core.prepared import EVAL_BLOCK_ROWS, FORMAT, MANIFEST, PreparedSet, block_name
from core.spec import DataSpec, validation_rows

SHARD_ORDER_KEY = 0x54A2D  # core.shards.shard_rows's permutation key
BLOCK_BYTES = 16 << 20  # a block's features, as stored, when block_rows is not given
ROUTE_BYTES = 64 << 20  # rows read at a time in pass 2
INDEX_CHUNK = 1 << 20


@dataclass(frozen=True)
class Progress:
    """What `prepare` has done: `stage` "read" (rows and source bytes so far of
    `total_bytes`), "write" (blocks written of `total_blocks`) or "done"."""

    stage: str
    rows: int
    bytes: int
    total_bytes: int
    blocks: int = 0
    total_blocks: int = 0


def default_block_rows(features: int, dtype: np.dtype) -> int:
    rows = BLOCK_BYTES // (features * dtype.itemsize)
    return max(1024, min(1 << 20, rows // 1024 * 1024))


def prepare(source: str | Path | DataSpec, out: str | Path, *, label_column: str | int | None = None,
            validation_split: float = 0.2, seed: int = 0, dtype: str = "float32",
            block_rows: int | None = None, limits: DataLimits = DataLimits(), progress=None) -> PreparedSet:
    """Prepare `source` (a built-in name or DataSpec, a .csv, .npz or .parquet
    file, or a folder of .parquet files) into the directory `out`, which must
    not exist. Training rows are split off with `split_rows(n, validation_split,
    seed)` and stored in shard order (docs/data.md); `progress`, when given, is
    called with a Progress now and then."""
    out = Path(out)
    if not 0.0 <= validation_split < 1.0:
        raise DataError(f"validation split must be in [0, 1), got {validation_split!r}")
    if dtype not in ("float32", "float64"):
        raise DataError(f"dtype must be float32 or float64, got {dtype!r}")
    if block_rows is not None and block_rows < 1:
        raise DataError(f"block rows must be at least 1, got {block_rows}")
    if out.exists():
        raise DataError(f"{out}: already exists; prepare into a new folder")
    if not out.parent.is_dir():
        raise DataError(f"{out.parent}: no such folder to prepare into")
    report = progress or (lambda p: None)
    src = open_source(str(source) if isinstance(source, Path) else source, label_column, seed, limits)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _write(src, tmp, np.dtype(dtype), block_rows, validation_split, seed, limits, report)
        text = json.dumps(manifest, indent=1).encode() + b"\n"
        (tmp / MANIFEST).write_bytes(text)
        try:
            os.rename(tmp, out)
        except OSError:
            raise DataError(f"{out}: was created while this set was prepared; not replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedSet.open(out)


def _write(src, tmp: Path, dtype: np.dtype, block_rows, validation_split: float, seed: int,
           limits: DataLimits, report) -> dict:
    work = tmp / "work"
    work.mkdir()
    F, T = src.features, src.targets
    width = F + T

    # pass 1: source order
    n, lowest, highest, integral = 0, math.inf, -math.inf, True
    with open(work / "rows", "wb") as fh:
        for rows in src.batches:
            rows.tofile(fh)
            n += len(rows)
            if src.vector_labels:
                y = rows[:, F]
                lowest, highest = min(lowest, float(y.min())), max(highest, float(y.max()))
                integral = integral and bool((y == np.floor(y)).all())
            report(Progress("read", n, src.bytes_done(n), src.bytes))
    if n == 0:
        raise DataError(f"{src.name}: the source holds no rows")
    classes = classes_of(src.name, lowest, highest, limits) if src.vector_labels and integral else None
    n_val = validation_rows(n, validation_split)
    n_train = n - n_val
    if n_train < 1:
        raise DataError(f"{src.name}: {n} rows leave no training row with validation split {validation_split}")
    B = block_rows or default_block_rows(F, dtype)
    nb_train, nb_val = math.ceil(n_train / B), math.ceil(n_val / B)

    # pass 2: each row to its block's work file
    train, val = split_rows(n, validation_split, seed)
    dest = np.empty(n, dtype=np.int64)
    order = np.random.default_rng([seed, SHARD_ORDER_KEY]).permutation(n_train)
    for a in range(0, n, INDEX_CHUNK):  # in chunks: no temporary of 8 bytes a row beside the three
        dest[train[order[a:a + INDEX_CHUNK]]] = np.arange(a, min(a + INDEX_CHUNK, n_train))
        dest[val[a:a + INDEX_CHUNK]] = n_train + np.arange(a, min(a + INDEX_CHUNK, n_val))
    del train, val, order
    chunk = max(1, ROUTE_BYTES // (width * 8))
    with open(work / "rows", "rb") as fh:
        for r0 in range(0, n, chunk):
            rows = np.fromfile(fh, dtype=np.float64, count=min(chunk, n - r0) * width).reshape(-1, width)
            at = dest[r0:r0 + len(rows)]
            blocks = np.where(at < n_train, at // B, nb_train + (at - n_train) // B)
            by_block = np.argsort(blocks, kind="stable")
            ids, starts = np.unique(blocks[by_block], return_index=True)
            for k, a, b in zip(ids, starts, list(starts[1:]) + [len(rows)]):
                picked = by_block[a:b]
                with open(work / f"{k}.rows", "ab") as r, open(work / f"{k}.at", "ab") as p:
                    rows[picked].tofile(r)
                    at[picked].tofile(p)
    del dest
    (work / "rows").unlink()

    # pass 3: blocks in stored order, and the statistics of the training rows
    def assemble(k: int, first: int, count: int) -> np.ndarray:
        rows = np.fromfile(work / f"{k}.rows", dtype=np.float64).reshape(-1, width)
        at = np.fromfile(work / f"{k}.at", dtype=np.int64)
        assert len(rows) == count == len(at), (k, len(rows), count)
        block = np.empty_like(rows)
        block[at - first] = rows
        return block

    plan = [("train", i, i, i * B, min(B, n_train - i * B)) for i in range(nb_train)]
    plan += [("val", i, nb_train + i, n_train + i * B, min(B, n_val - i * B)) for i in range(nb_val)]
    files, total = [], None
    for number, (split, i, k, first, count) in enumerate(plan):
        block = assemble(k, first, count)
        X = np.ascontiguousarray(block[:, :F])
        if split == "train":
            total = _running_sum(total, X)
        y = block[:, F].astype(np.int64) if classes is not None else np.ascontiguousarray(block[:, F:])
        files.append(_write_npy(tmp, block_name(split, "X", i), X.astype(dtype)))
        files.append(_write_npy(tmp, block_name(split, "y", i), y))
        report(Progress("write", n, src.bytes, src.bytes, number + 1, len(plan)))
    mean = total / n_train
    squares = None
    for split, i, k, first, count in plan[:nb_train]:
        d = assemble(k, first, count)[:, :F] - mean
        squares = _running_sum(squares, np.multiply(d, d, out=d))
    scale = np.sqrt(squares / n_train)
    scale[scale == 0] = 1.0  # as core.data: a constant column is only centred
    shutil.rmtree(work)
    report(Progress("done", n, src.bytes, src.bytes, len(plan), len(plan)))
    return {
        "format": FORMAT,
        "source": {"name": src.name, "sha256": src.sha256, "bytes": src.bytes},
        "task": "classification" if classes is not None else "regression",
        "features": F,
        "classes": classes,
        "targets": None if classes is not None else T,
        "label_column": src.label_column,
        "dtype": dtype.name,
        "split": {"seed": seed, "validation_split": float(validation_split)},
        "rows": {"train": n_train, "validation": n_val},
        "block_rows": B,
        "eval_block_rows": EVAL_BLOCK_ROWS,
        "standardization": {"mean": mean.tolist(), "scale": scale.tolist()},
        "files": files,
    }


def _running_sum(total: np.ndarray | None, X: np.ndarray) -> np.ndarray:
    """total + X[0] + X[1] + ... in that order (numpy's axis-0 sum of a C array is sequential)."""
    if total is None:
        return np.add.reduce(X, axis=0)
    return np.add.reduce(np.concatenate([total[None, :], X]), axis=0)


class _HashingWriter:
    def __init__(self, fh):
        self.fh, self.digest, self.bytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.bytes += len(view)
        return self.fh.write(view)


def _write_npy(root: Path, name: str, array: np.ndarray) -> dict:
    path = root / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as fh:
        out = _HashingWriter(fh)
        np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return {"path": name, "bytes": out.bytes, "sha256": out.digest.hexdigest()}
