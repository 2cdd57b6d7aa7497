"""`prepare`: stream a source into a prepared data set, in bounded memory.

Three sequential passes over plain files, so memory holds a batch or a block
at a time whatever the source's size (plus 8 bytes per row for where each
row goes, and the split's permutations while they are computed):

1. the source's checked float64 rows are appended, in source order, to a
   work file (the row count is known only at its end);
2. once the split is known, that file is read in chunks; each chunk's rows
   are grouped by block (a radix sort) and appended to their blocks' work
   files, with their positions in the block;
3. each block is assembled once, in memory, from its work file, in stored
   order, and written as `.npy` (hashed as it is written).

The standardization statistics are two sums over the training blocks in
stored order, each a sequential float64 sum row after row (the order numpy's
own axis-0 sum takes, so mean and std equal numpy's of the stored rows to the
bit): the first as each block is assembled, the second over the same float64
rows read again from the written block when it holds them exactly (float64,
or float32 that round-trips), else from a float64 copy written beside it.
Work files are read into buffers reused from block to block and written a
WRITE_PIECE at a time. Everything is written under OUT.tmp-<random> beside
OUT and renamed into place: OUT is never a half-written set.
"""

from __future__ import annotations

import hashlib
import io
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
WRITE_PIECE = 256 << 10  # bytes a write() at most: measured, one of tens of MB costs the kernel ~10x the CPU


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
    with open(work / "rows", "wb", buffering=0) as fh:
        for rows in src.batches:
            _write_all(fh, rows)
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
    dest = _destinations(n, n_train, validation_split, seed)
    _route(work, dest, n_train, nb_train, nb_train + nb_val, B, width, _position_dtype(B))
    del dest
    (work / "rows").unlink()

    # pass 3: blocks in stored order, and the statistics of the training rows
    plan = [("train", i, i, min(B, n_train - i * B)) for i in range(nb_train)]
    plan += [("val", i, nb_train + i, min(B, n_val - i * B)) for i in range(nb_val)]
    files, total, again = [], None, []
    X64 = np.empty((min(B, max(n_train, n_val)) + 1, F))  # row 0 holds the running sum
    rows = np.empty((len(X64) - 1, width))
    at = np.empty(len(rows), dtype=_position_dtype(B))
    narrow = np.empty((len(rows), F), dtype=dtype) if dtype != np.float64 else None
    for number, (split, i, k, count) in enumerate(plan):
        _read_exactly(work / f"{k}.rows", rows[:count])
        _read_exactly(work / f"{k}.at", at[:count])
        (work / f"{k}.rows").unlink()
        (work / f"{k}.at").unlink()
        pos = at[:count]
        X = X64[1:count + 1]
        X[pos] = rows[:count, :F]
        if classes is not None:
            y = np.empty(count, dtype=np.int64)
            y[pos] = rows[:count, F]
        else:
            y = np.empty((count, T))
            y[pos] = rows[:count, F:]
        if split == "train":
            total = _running_sum(total, X64, count)
        stored = X
        if narrow is not None:
            stored = narrow[:count]
            np.copyto(stored, X, casting="same_kind")  # as astype: rounded to nearest
        X_name = block_name(split, "X", i)
        files.append(_write_npy(tmp, X_name, stored))
        files.append(_write_npy(tmp, block_name(split, "y", i), y))
        if split == "train":
            again.append(_float64_copy(tmp, work, X_name, k, X, stored))
        report(Progress("write", n, src.bytes, src.bytes, number + 1, len(plan)))
    mean = total / n_train
    squares = None
    for (_, _, _, count), (path, offset, kind) in zip(plan, again):
        X = X64[1:count + 1]
        _read_exactly(path, X if kind == np.float64 else narrow[:count], offset)
        if kind != np.float64:
            np.copyto(X, narrow[:count])
        np.subtract(X, mean, out=X)
        np.multiply(X, X, out=X)
        squares = _running_sum(squares, X64, count)
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


def _destinations(n: int, n_train: int, validation_split: float, seed: int) -> np.ndarray:
    """Each source row's stored position: training rows first, in shard order, then validation rows."""
    train, val = split_rows(n, validation_split, seed)
    dest = np.empty(n, dtype=np.int64)
    order = np.random.default_rng([seed, SHARD_ORDER_KEY]).permutation(n_train)
    n_val = n - n_train
    for a in range(0, n, INDEX_CHUNK):  # in chunks: no temporary of 8 bytes a row beside the three
        dest[train[order[a:a + INDEX_CHUNK]]] = np.arange(a, min(a + INDEX_CHUNK, n_train))
        dest[val[a:a + INDEX_CHUNK]] = n_train + np.arange(a, min(a + INDEX_CHUNK, n_val))
    return dest


def _position_dtype(B: int) -> np.dtype:
    return np.dtype(np.int32 if B <= np.iinfo(np.int32).max else np.int64)


def _route(work: Path, dest: np.ndarray, n_train: int, nb_train: int, blocks: int, B: int, width: int,
           position: np.dtype) -> None:
    """Pass 2: the rows file read in chunks, each chunk's rows grouped by block
    (a stable sort, so a block's rows stay in source order) and appended to
    that block's work file, with their positions in the block."""
    n = len(dest)
    chunk = min(n, max(1, ROUTE_BYTES // (width * 8)))
    rows, grouped = np.empty((chunk, width)), np.empty((chunk, width))
    small = np.int16 if blocks < 1 << 15 else np.int64  # numpy's stable sort of int16 is a radix sort
    with open(work / "rows", "rb", buffering=0) as fh:
        for r0 in range(0, n, chunk):
            m = min(chunk, n - r0)
            _read_into(fh, rows[:m])
            at = dest[r0:r0 + m]
            val = at >= n_train
            block, pos = np.divmod(at - val * n_train, B)  # a validation row's block counts from nb_train
            block += val * nb_train
            by_block = np.argsort(block.astype(small), kind="stable")
            np.take(rows[:m], by_block, axis=0, out=grouped[:m], mode="clip")  # "raise" copies out first
            pos = pos[by_block].astype(position)
            counts = np.bincount(block, minlength=blocks)
            a = 0
            for k in np.flatnonzero(counts):
                b = a + int(counts[k])
                with open(work / f"{k}.rows", "ab", buffering=0) as r, \
                        open(work / f"{k}.at", "ab", buffering=0) as p:
                    _write_all(r, grouped[a:b])
                    _write_all(p, pos[a:b])
                a = b


def _float64_copy(tmp: Path, work: Path, X_name: str, k: int, X: np.ndarray, stored: np.ndarray):
    """Where the squares pass reads a training block's float64 rows again: its
    written block when that holds them exactly (float64, or float32 that
    round-trips), else a float64 work file. (path, byte offset, dtype there)."""
    if stored is X or (np.array_equal(stored[:1], X[:1]) and np.array_equal(stored, X)):
        return tmp / X_name, len(_npy_header(stored)), stored.dtype
    spill = work / f"{k}.float64"
    with open(spill, "wb", buffering=0) as fh:
        _write_all(fh, X)
    return spill, 0, np.dtype(np.float64)


def _write_all(fh, data) -> None:
    """`data` (bytes or a C-contiguous array) to an unbuffered file, WRITE_PIECE bytes a call."""
    view = memoryview(data).cast("B")
    for a in range(0, len(view), WRITE_PIECE):
        piece = view[a:a + WRITE_PIECE]
        while piece:
            piece = piece[fh.write(piece):]


def _read_into(fh, array: np.ndarray) -> None:
    view, done = memoryview(array).cast("B"), 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise DataError(f"{fh.name}: a work file is shorter than written (was it changed meanwhile?)")
        done += got


def _read_exactly(path: Path, array: np.ndarray, offset: int = 0) -> None:
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        _read_into(fh, array)


def _running_sum(total: np.ndarray | None, rows: np.ndarray, count: int) -> np.ndarray:
    """total + X[0] + X[1] + ... in that order, X being rows[1:count + 1]; rows[0]
    is overwritten with total (numpy's axis-0 sum of a C array is sequential)."""
    if total is None:
        return np.add.reduce(rows[1:count + 1], axis=0)
    rows[0] = total
    return np.add.reduce(rows[:count + 1], axis=0)


def _npy_header(array: np.ndarray) -> bytes:
    """The .npy header np.save writes for `array` (format 1.0: our headers are short)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
    return out.getvalue()


def _write_npy(root: Path, name: str, array: np.ndarray) -> dict:
    """`array` (C-contiguous) as the .npy file np.save writes, hashed as written."""
    path = root / name
    path.parent.mkdir(exist_ok=True)
    header, data = _npy_header(array), memoryview(array).cast("B")
    digest = hashlib.sha256(header)
    digest.update(data)
    with open(path, "wb", buffering=0) as fh:
        _write_all(fh, header)
        _write_all(fh, data)
    return {"path": name, "bytes": len(header) + len(data), "sha256": digest.hexdigest()}
