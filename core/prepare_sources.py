"""The sources `prepare` reads, each as a stream of checked float64 row batches.

A CSV is read by pyarrow's streaming reader block by block (core/prepare_csv.py),
a Parquet file or
folder by pyarrow.parquet batch by batch, an `.npz` member by member in
chunks of rows straight from the zip (headers checked first, never
unpickled), and the built-in sets from core.data. Every batch is checked for
non-numeric, missing and non-finite cells; an error names the file, the data
row (1-based) and the column, never a cell's contents.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from core.datafiles import DataError, DataLimits, _read_header, npz_shapes
from core.spec import BUILTIN_SOURCES, DataSpec

BATCH_VALUES = 1 << 21  # values per batch of a Parquet or .npz source (16 MiB as float64)
UNBOUNDED = sys.maxsize


@dataclass
class RowSource:
    """A source opened for streaming: its shape, and its rows as float64 batches of
    shape (m, features + targets), the features first, then the label column(s)."""

    name: str
    features: int
    targets: int  # label columns: 1, or y's second dimension for a 2-D npz
    vector_labels: bool  # labels are one column (classification when all integral)
    label_column: str | int | None
    bytes: int
    batches: Iterator[np.ndarray]
    digest: "hashlib._Hash"  # complete once `batches` is exhausted
    position: Callable[[], int] | None = None  # source bytes read so far, when known
    total_rows: int | None = None  # when known up front (.npz, Parquet, built-in)

    def bytes_done(self, rows: int) -> int:
        """Source bytes read so far: counted for a CSV, else in proportion to the rows."""
        if self.position is not None:
            return self.position()
        return self.bytes * rows // self.total_rows if self.total_rows else 0

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


def open_source(source: str | DataSpec, label_column: str | int | None = None, seed: int = 0,
                limits: DataLimits = DataLimits()) -> RowSource:
    """The RowSource for a built-in name, a DataSpec of one, or a .csv/.npz/.parquet
    file or a folder of .parquet files. The row and byte limits of `limits` bound
    data held in memory, so they do not apply here; its feature, class and
    inflation limits do."""
    limits = replace(limits, max_rows=UNBOUNDED, max_data_bytes=UNBOUNDED)
    tabular = not (isinstance(source, DataSpec) or source in BUILTIN_SOURCES or str(source).lower().endswith(".npz"))
    if label_column is not None and not tabular:
        raise DataError(f"{source if isinstance(source, str) else source.source}: a label column "
                        f"({label_column!r}) applies to CSV and Parquet sources only")
    if isinstance(source, DataSpec) or source in BUILTIN_SOURCES:
        return _builtin(source if isinstance(source, DataSpec) else DataSpec(source=source), seed, limits)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet")
        if not files:
            raise DataError(f"{path}: a folder without .parquet files")
        return _parquet(path, files, label_column, limits)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path, limits)
    if suffix in (".parquet", ".pq"):
        return _parquet(path, [path], label_column, limits)
    from core.prepare_csv import csv_source

    return csv_source(path, label_column, limits)


def _file_digest(paths: list[Path], root: Path) -> tuple["hashlib._Hash", int]:
    """SHA-256 of one file's bytes; of a folder, of each file's name and hash in turn."""
    from core.prepared import sha256_file

    total = sum(p.stat().st_size for p in paths)
    if len(paths) == 1 and paths[0] == root:
        digest = hashlib.sha256()
        with open(root, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        return digest, total
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            digest.update(f"{p.name}\0{sha256_file(fh)}\n".encode())
    return digest, total


def check_finite(where: str, X: np.ndarray, first_row: int, columns) -> None:
    bad = ~np.isfinite(X)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{where}: row {first_row + r}, column {columns(c)}: NaN or infinite value")


# ------------------------------------------------------------------ built-in


def _builtin(spec: DataSpec, seed: int, limits: DataLimits) -> RowSource:
    from core.data import load_arrays

    X, y, _ = load_arrays(spec, seed, None, limits)
    described = {"builtin": spec.source}
    if spec.source == "synthetic":
        described.update(samples=spec.samples, features=spec.features, classes=spec.classes, seed=seed)
    text = json.dumps(described, sort_keys=True).encode()
    y2 = y.astype(np.float64).reshape(len(y), -1)
    return RowSource(spec.source, X.shape[1], y2.shape[1], y.ndim == 1, None, len(text),
                     iter([np.hstack([X, y2])]), hashlib.sha256(text), total_rows=len(X))


# ----------------------------------------------------------------------- npz


def _npz(path: Path, limits: DataLimits) -> RowSource:
    X_head, y_head = npz_shapes(path, limits)
    for name, head in (("X", X_head), ("y", y_head)):
        if head.fortran_order and len(head.shape) == 2 and head.shape[1] > 1:
            raise DataError(f"{path}: array {name} is stored in Fortran order; save it C-ordered "
                            f"(np.ascontiguousarray) to prepare it")
    rows, features = X_head.shape
    if rows == 0 or features == 0:
        raise DataError(f"{path}: no data (X has shape {X_head.shape})")
    targets = y_head.shape[1] if len(y_head.shape) == 2 else 1
    digest, size = _file_digest([path], path)

    def batches():
        chunk = max(1, BATCH_VALUES // (features + targets))
        try:
            with zipfile.ZipFile(path) as archive, archive.open("X.npy") as xs, archive.open("y.npy") as ys:
                _read_header(xs, f"{path}: array X")
                _read_header(ys, f"{path}: array y")
                for start in range(0, rows, chunk):
                    m = min(chunk, rows - start)
                    X = _read_rows(xs, X_head.dtype, m, features, path, "X")
                    y = _read_rows(ys, y_head.dtype, m, targets, path, "y")
                    check_finite(str(path), X, start + 1, lambda c: c + 1)
                    check_finite(f"{path}: array y", y, start + 1, lambda c: c + 1)
                    yield np.hstack([X, y])
        except (zipfile.BadZipFile, OSError, EOFError):
            raise DataError(f"{path}: not a readable .npz file (a damaged zip archive)") from None

    return RowSource(str(path), features, targets, len(y_head.shape) == 1, None, size, batches(), digest,
                     total_rows=rows)


def _read_rows(fh, dtype: np.dtype, rows: int, width: int, path: Path, name: str) -> np.ndarray:
    want = rows * width * dtype.itemsize
    raw = fh.read(want)
    if len(raw) != want:
        raise DataError(f"{path}: array {name} is shorter than its header says")
    return np.frombuffer(raw, dtype=dtype).astype(np.float64).reshape(rows, width)


# ------------------------------------------------------------------- parquet


def _parquet(root: Path, files: list[Path], label_column, limits: DataLimits) -> RowSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def schema_of(f: Path):
        try:
            return pq.ParquetFile(f).schema_arrow
        except (pa.ArrowException, OSError):
            raise DataError(f"{f}: not a readable Parquet file") from None

    schema = schema_of(files[0])
    names = schema.names
    width = len(names)
    if width < 2:
        raise DataError(f"{files[0]}: needs at least one feature column and a label column, got {width}")
    if width > limits.max_features + 1:
        raise DataError(f"{files[0]}: {width} columns, more than the limit of {limits.max_features + 1} "
                        f"(max_features + 1)")
    for f in files:
        s = schema if f == files[0] else schema_of(f)
        if s.names != names:
            raise DataError(f"{f}: its columns differ from those of {files[0].name}")
        for field in s:
            if not (pa.types.is_integer(field.type) or pa.types.is_floating(field.type)):
                raise DataError(f"{f}: column {field.name!r} has type {field.type}, not numbers")
    label = _label_index(root, names, label_column)
    stored = [j for j in range(width) if j != label] + [label]  # source column of each stored one
    digest, size = _file_digest(files, root)

    def batches():
        for f in files:
            start = 1
            try:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=max(1, BATCH_VALUES // width)):
                    cols = []
                    for j in range(width):
                        column = batch.column(j)
                        if column.null_count:
                            r = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
                            raise DataError(f"{f}: row {start + r}, column {names[j]!r}: empty (null)")
                        cols.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
                    rows = np.column_stack([cols[j] for j in stored])
                    check_finite(str(f), rows, start, lambda c: repr(names[stored[c]]))
                    start += batch.num_rows
                    yield rows
            except pa.ArrowException:
                raise DataError(f"{f}: not a readable Parquet file (a damaged page)") from None

    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return RowSource(str(root), width - 1, 1, True, names[label], size, batches(), digest, total_rows=total)


def _label_index(where, names: list[str], label_column) -> int:
    width = len(names)
    if label_column is None:
        return width - 1
    if isinstance(label_column, int):
        if not -width <= label_column < width:
            raise DataError(f"label column {label_column} is out of range for {width} columns of {where}")
        return label_column % width
    if label_column not in names:
        raise DataError(f"label column {label_column!r} is not a column of {where}")
    return names.index(label_column)
