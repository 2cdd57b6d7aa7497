"""User data files (`.npz`, `.csv`), read within limits.

Every read here is bounded before it happens: an `.npz` is judged by its zip
directory and each member's `.npy` header (shape, dtype) before anything is
decompressed, and a CSV is streamed line by line with a cap on each line's
length. The same functions serve the metadata pass at submit (which never
loads the whole set) and the loader in every worker (which does, once the
limits say it fits). Errors name the file, the line or column and the kind of
problem, never the file's contents; nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MiB = 1 << 20
FLOAT64 = 8  # bytes per value once loaded: every data set is read as float64
MAX_CELL_CHARS = 64  # a CSV line may hold at most this many characters per allowed column
MAX_ZIP_DIRECTORY = 64 * 1024  # an .npz of X and y has a directory of a few hundred bytes
INFLATION_FLOOR = MiB  # members smaller than this uncompressed are not judged by their ratio


class DataError(ValueError):
    """Data that cannot be trained on; the message says which file and why."""


@dataclass(frozen=True)
class DataLimits:
    """What a data set may be, checked before its bytes are read.

    `max_data_bytes` bounds the set as loaded (float64 X and y); an `.npz`
    member may inflate to at most `max_inflation` times its compressed size.
    A `.csv` or `.npz` file larger than `prepare_above_bytes` is not loaded
    whole but prepared once into a cache and read shard by shard
    (core/data_source.py)."""

    max_data_bytes: int = 512 * MiB
    max_inflation: float = 100.0
    max_rows: int = 10_000_000
    max_features: int = 100_000
    max_classes: int = 100_000
    prepare_above_bytes: int = 64 * MiB  # a CSV this size holds at most 256 MiB of float64 cells

    def check_size(self, where: str, rows: int, features: int, targets: int = 1) -> int:
        """The loaded size of rows x (features + targets) float64 values; a
        DataError naming the figure and the limit when one is exceeded."""
        if rows > self.max_rows:
            raise DataError(f"{where}: {rows} rows, more than the limit of {self.max_rows} (max_rows)")
        self.check_features(where, features)
        size = rows * (features + targets) * FLOAT64
        if size > self.max_data_bytes:
            raise DataError(f"{where}: {rows} rows x {features + targets} columns need {size} bytes as float64, "
                            f"more than the limit of {self.max_data_bytes} (max_data_bytes)")
        return size

    def check_features(self, where: str, features: int) -> int:
        if features > self.max_features:
            raise DataError(f"{where}: {features} feature columns, more than the limit of "
                            f"{self.max_features} (max_features)")
        return features

    def check_classes(self, where: str, classes: int) -> int:
        if classes > self.max_classes:
            raise DataError(f"{where}: the largest label makes {classes} classes, more than the limit of "
                            f"{self.max_classes} (max_classes)")
        return classes


def classes_of(where: str, lowest: float, highest: float, limits: DataLimits) -> int:
    """The class count of integer labels lowest..highest (max label + 1), checked."""
    if lowest < 0:
        raise DataError(f"{where}: class labels must be >= 0; some label is negative")
    if highest < 1:
        raise DataError(f"{where}: classification needs at least 2 classes, all labels are the same")
    return limits.check_classes(where, int(highest) + 1)


# ------------------------------------------------------------------- .npz


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _read_header(fh, where: str) -> NpyHeader:
    try:
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported")
        shape, fortran_order, dtype = read[version](fh)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError(f"{where}: not a readable .npy array (bad header)") from None
    if dtype.hasobject:
        raise DataError(f"{where}: holds pickled objects, which are never loaded; store plain numeric arrays")
    return NpyHeader(tuple(shape), dtype, fortran_order)


def _zip_directory_size(fh) -> int | None:
    """The size of a zip file's central directory, from its end record (the
    last 22 bytes, or up to 64 KiB more when the archive has a comment);
    None when there is no end record. A ZIP64 archive (its size field all
    ones) is larger than any data limit, so its size is given as such."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    tail_start = max(0, size - (22 + 0xFFFF))
    fh.seek(tail_start)
    tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    (directory,) = struct.unpack_from("<I", tail, at + 12)
    return directory


def inspect_npz(path: Path, limits: DataLimits) -> dict[str, NpyHeader]:
    """The headers of an .npz's `X` and `y`, from its zip directory and
    each member's .npy header, refusing (before anything is decompressed) a
    member that inflates past `max_inflation` times its compressed size or
    past `max_data_bytes`, and pickled or non-numeric arrays. (zipfile never
    inflates a member past the size its directory states, so the stated
    sizes bound what a later read allocates.)"""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":  # np.load would try anything else as a pickle
                raise DataError(f"{path}: not a readable .npz file (no zip archive header)")
            directory = _zip_directory_size(fh)  # ZipFile would read the whole directory
        if directory is None:
            raise DataError(f"{path}: not a readable .npz file (no zip directory)")
        if directory > MAX_ZIP_DIRECTORY:
            raise DataError(f"{path}: its zip directory is {directory} bytes, more than "
                            f"{MAX_ZIP_DIRECTORY}; an .npz of X and y needs a few hundred")
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            missing = [k for k in ("X", "y") if f"{k}.npy" not in members]
            if missing:
                raise DataError(f"{path}: .npz must hold arrays 'X' and 'y'; missing {', '.join(missing)}")
            headers = {}
            for name in ("X", "y"):
                info, where = members[f"{name}.npy"], f"{path}: array {name}"
                _check_inflation(info, where, limits)
                with archive.open(info) as member:
                    headers[name] = _read_header(member, where)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise DataError(f"{path}: not a readable .npz file (a damaged or unsupported zip archive)") from None
    for name, header in headers.items():
        if header.dtype.kind not in "biuf":
            raise DataError(f"{path}: X and y must be numeric arrays, got dtype {header.dtype} for {name}")
    return headers


def _check_inflation(info: zipfile.ZipInfo, where: str, limits: DataLimits) -> None:
    if info.file_size > limits.max_data_bytes:
        raise DataError(f"{where} inflates to {info.file_size} bytes, more than the limit of "
                        f"{limits.max_data_bytes} (max_data_bytes)")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > INFLATION_FLOOR and ratio > limits.max_inflation:
        raise DataError(f"{where} inflates {ratio:.0f}x ({info.compress_size} bytes to {info.file_size}), "
                        f"more than the limit of {limits.max_inflation:g}x (max_inflation)")


def npz_shapes(path: Path, limits: DataLimits) -> tuple[NpyHeader, NpyHeader]:
    """X's and y's headers, checked for shape and loaded size."""
    headers = inspect_npz(path, limits)
    X, y = headers["X"], headers["y"]
    if len(X.shape) != 2:
        raise DataError(f"{path}: X must be 2-D (rows, features), got shape {X.shape}")
    if len(y.shape) not in (1, 2) or y.shape[0] != X.shape[0]:
        raise DataError(f"{path}: y must have one row per row of X ({X.shape[0]}), got shape {y.shape}")
    targets = y.shape[1] if len(y.shape) == 2 else 1
    limits.check_size(str(path), X.shape[0], X.shape[1], targets)
    return X, y


def label_range(path: Path, header: NpyHeader, chunk: int = 1 << 20) -> tuple[float, float, bool]:
    """(lowest, highest, all integral) of a 1-D `y`, streamed `chunk` values at a time."""
    lowest, highest, integral = np.inf, -np.inf, True
    left = header.shape[0]
    try:
        with zipfile.ZipFile(path) as archive, archive.open("y.npy") as member:
            _read_header(member, f"{path}: array y")
            while left:
                n = min(chunk, left)
                raw = member.read(n * header.dtype.itemsize)
                if len(raw) != n * header.dtype.itemsize:
                    raise DataError(f"{path}: array y is shorter than its header says")
                values = np.frombuffer(raw, dtype=header.dtype).astype(np.float64)
                if not np.isfinite(values).all():
                    row = header.shape[0] - left + int(np.argmin(np.isfinite(values)))
                    raise DataError(f"{path}: y holds a non-finite value at row {row}")
                lowest, highest = min(lowest, values.min()), max(highest, values.max())
                integral = integral and bool(np.array_equal(values, np.round(values)))
                left -= n
    except (zipfile.BadZipFile, OSError, EOFError):
        raise DataError(f"{path}: not a readable .npz file (a damaged zip archive)") from None
    return float(lowest), float(highest), integral


# -------------------------------------------------------------------- .csv


@dataclass(frozen=True)
class CsvLayout:
    """A CSV's shape as its first lines give it."""

    header: list[str] | None
    width: int
    label: int  # the label column's index


def _capped_lines(fh, path: Path, cap: int, max_columns: int) -> Iterator[str]:
    """The file's lines, each read with at most `cap` characters: a longer
    line is refused (naming its number, and its column count when it already
    has too many commas) before it is read whole."""
    number = 0
    while True:
        line = fh.readline(cap)
        if not line:
            return
        number += 1
        if len(line) == cap and not line.endswith("\n"):
            columns = line.count(",") + 1
            if columns > max_columns:
                raise DataError(f"{path}: line {number} has more than {max_columns} columns, the limit is "
                                f"{max_columns} (max_features + 1)")
            raise DataError(f"{path}: line {number} is longer than {cap} characters")
        yield line


def _numeric(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
        return True
    except ValueError:
        return False


def csv_rows(path: Path, label_column: str | int | None,
             limits: DataLimits) -> Iterator[CsvLayout | tuple[int, list[str]]]:
    """Stream a CSV: first its CsvLayout, then (line number, cells) for each
    data row, each checked for width, the rows so far checked against the
    limits. Blank lines are skipped; a first row that is not all numbers is
    the header."""
    max_columns = limits.max_features + 1
    cap = max_columns * MAX_CELL_CHARS
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(_capped_lines(fh, path, cap, max_columns))
            layout, count = None, 0
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if layout is None:
                    if len(row) > max_columns:
                        raise DataError(f"{path}: line {line} has {len(row)} columns, more than the limit of "
                                        f"{max_columns} (max_features + 1)")
                    layout = _layout(path, row, label_column)
                    yield layout
                    if layout.header is not None:
                        continue
                if len(row) != layout.width:
                    raise DataError(f"{path}: line {line} has {len(row)} columns, expected {layout.width}")
                count += 1
                if count % 4096 == 0:  # stop as soon as the rows read pass the limits
                    limits.check_size(str(path), count, layout.width - 1)
                yield line, row
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (a bad byte at offset {err.start} of a read)") from None
    except csv.Error as err:
        raise DataError(f"{path}: not a readable CSV file ({type(err).__name__})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read CSV ({err.strerror})") from None
    if layout is None:
        raise DataError(f"{path}: the file is empty")
    if not count:
        raise DataError(f"{path}: has a header but no data rows")
    limits.check_size(str(path), count, layout.width - 1)


def _layout(path: Path, first: list[str], label_column: str | int | None) -> CsvLayout:
    header = None if _numeric(first) else [c.strip() for c in first]
    width = len(first)
    if width < 2:
        raise DataError(f"{path}: needs at least one feature column and a label column, got {width} column(s)")
    if label_column is None:
        label = width - 1
    elif isinstance(label_column, int):
        if not -width <= label_column < width:
            raise DataError(f"data.label_column {label_column} is out of range for {width} columns")
        label = label_column % width
    else:
        if header is None or label_column not in header:
            raise DataError(f"data.label_column {label_column!r} is not a column of {path}'s header")
        label = header.index(label_column)
    return CsvLayout(header, width, label)


def cell(path: Path, line: int, row: list[str], column: int) -> float:
    try:
        return float(row[column])
    except ValueError:
        raise DataError(f"{path}: line {line}, column {column + 1}: not a number") from None


def read_csv(path: Path, label_column: str | int | None, limits: DataLimits) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of a CSV, read in blocks of rows; refused as soon as the rows
    read pass the limits."""
    rows = csv_rows(path, label_column, limits)
    layout = next(rows)
    blocks, block = [], []
    for line, row in rows:
        try:
            block.append([float(c) for c in row])
        except ValueError:
            for j in range(layout.width):
                cell(path, line, row, j)
        if len(block) == 4096:
            blocks.append(np.array(block, dtype=np.float64))
            block = []
    values = np.concatenate(blocks + [np.array(block, dtype=np.float64).reshape(-1, layout.width)])
    return np.delete(values, layout.label, axis=1), values[:, layout.label]
