"""A CSV source for `prepare`: pyarrow's streaming reader, block by block.

The first non-blank line decides the layout as core.datafiles does for an
in-memory CSV (a header when not all numbers; the label column by name or
index, the last by default). Cells are converted by pyarrow; from the first
cell it cannot convert on, the rows are read again as text and converted as
Python's float() reads them, which also names a bad cell's data row and
column. Ragged rows are named by data row. The bytes are hashed as pyarrow
reads them, so the file is read once.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np

from core.datafiles import MAX_CELL_CHARS, DataError, DataLimits, _layout
from core.prepare_sources import RowSource, check_finite

CSV_BLOCK_BYTES = 1 << 20  # pyarrow parses blocks in parallel: small ones keep both cores busy


class _HashingReader:
    """A read-only file that hashes and counts the bytes pyarrow reads through it."""

    def __init__(self, fh):
        self.fh, self.digest, self.done, self.closed = fh, hashlib.sha256(), 0, False

    def read(self, n=-1):
        data = self.fh.read(n)
        self.digest.update(data)
        self.done += len(data)
        return data

    def readable(self):
        return True

    def seekable(self):
        return False

    def tell(self):
        return self.done

    def close(self):
        self.closed = True


def _first_line(path: Path, limits: DataLimits) -> tuple[list[str], int, int]:
    """The first non-blank line's cells, how many lines precede it, and its length."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    cap = (limits.max_features + 1) * MAX_CELL_CHARS
    with open(path, "rb") as fh:
        skipped = 0
        while True:
            line = fh.readline(cap)
            if not line:
                raise DataError(f"{path}: the file is empty")
            if len(line) == cap and not line.endswith(b"\n"):
                raise DataError(f"{path}: line {skipped + 1} is longer than {cap} characters")
            if line.strip():
                break
            skipped += 1
    try:
        line.decode("utf-8")
        opts = pacsv.ReadOptions(autogenerate_column_names=True)
        width = pacsv.read_csv(io.BytesIO(line), read_options=opts).num_columns
        types = {f"f{i}": pa.string() for i in range(width)}
        table = pacsv.read_csv(io.BytesIO(line), read_options=opts,
                               convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (line {skipped + 1})") from None
    except pa.ArrowException:
        raise DataError(f"{path}: line {skipped + 1} is not readable CSV") from None
    return [table.column(i)[0].as_py() for i in range(width)], skipped, len(line)


def csv_source(path: Path, label_column, limits: DataLimits) -> RowSource:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    first, skipped, length = _first_line(path, limits)
    block = max(CSV_BLOCK_BYTES, 16 * length)  # a row must fit in one block
    if len(first) > limits.max_features + 1:
        raise DataError(f"{path}: line {skipped + 1} has {len(first)} columns, more than the limit of "
                        f"{limits.max_features + 1} (max_features + 1)")
    layout = _layout(path, first, label_column)
    width, label = layout.width, layout.label
    names = [f"c{i}" for i in range(width)]
    shown = (lambda j: repr(layout.header[j])) if layout.header else (lambda j: str(j + 1))
    stored = [j for j in range(width) if j != label] + [label]  # source column of each stored one
    skip = skipped + (1 if layout.header else 0)
    size = path.stat().st_size
    reader = _HashingReader(open(path, "rb"))

    def batches():
        ragged = []

        def on_ragged(row):
            if row.text is not None and not row.text.replace(",", "").strip():
                return "skip"  # a line of spaces and commas is blank, as in core.datafiles
            ragged.append(row)
            return "skip"

        def csv_stream(cells, use_threads: bool, source):
            return pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=skip, block_size=block,
                                               use_threads=use_threads),
                parse_options=pacsv.ParseOptions(invalid_row_handler=on_ragged),
                convert_options=pacsv.ConvertOptions(column_types={n: cells for n in names},
                                                     null_values=[], strings_can_be_null=False,
                                                     quoted_strings_can_be_null=False))

        def checked(rows, start):
            if ragged:
                raise DataError(_ragged_message(path, width, skip, ragged, csv_stream))
            check_finite(str(path), rows, start, lambda c: shown(stored[c]))
            return rows

        def as_text_rows(batch, start):
            rows = np.empty((batch.num_rows, width))
            for c, j in enumerate(stored):
                rows[:, c] = _numbers(batch.column(j), path, start, shown(j))
            return rows

        # Fast: pyarrow converts the cells. On the first cell it cannot (a bad
        # value, or one float() reads but pyarrow does not, such as " 1.5"),
        # the rows from there on are read again as text and converted
        # the way float() does, which also finds the bad cell's row and column.
        start = 1
        try:
            try:
                for batch in csv_stream(pa.float64(), True, reader):
                    # one row-major copy in pyarrow, the label column moved last
                    rows = checked(np.asarray(batch.select(stored).to_tensor(row_major=True)), start)
                    start += len(rows)
                    yield rows
            except pa.ArrowInvalid:
                while reader.read(8 << 20):  # the source's hash takes every byte
                    pass
                ragged.clear()
                with open(path, "rb") as fh:
                    done = 0
                    for batch in csv_stream(pa.string(), True, fh):
                        if done + batch.num_rows < start:  # yielded already
                            done += batch.num_rows
                            continue
                        batch, done = batch.slice(start - 1 - done), start - 1
                        rows = checked(as_text_rows(batch, start), start)
                        start += len(rows)
                        done += len(rows)
                        yield rows
            if ragged:
                raise DataError(_ragged_message(path, width, skip, ragged, csv_stream))
        except pa.ArrowInvalid as err:
            if "UTF8" in str(err) or "utf8" in str(err).lower():
                raise DataError(f"{path}: not UTF-8 text (after data row {start - 1})") from None
            if "straddling" in str(err) or "block" in str(err):
                raise DataError(f"{path}: a row after data row {start - 1} is longer than {block} bytes "
                                f"(16 times the first row)") from None
            raise DataError(f"{path}: not readable CSV after data row {start - 1}") from None
        finally:
            reader.fh.close()
        if start == 1:
            raise DataError(f"{path}: has a header but no data rows")

    return RowSource(str(path), width - 1, 1, True, layout.header[label] if layout.header else label,
                     size, batches(), reader.digest, lambda: reader.done)


def _ragged_message(path: Path, width: int, skip: int, ragged, csv_stream) -> str:
    """The first ragged row, found again single-threaded when pyarrow did not number it."""
    import pyarrow as pa

    row = min(ragged, key=lambda r: r.number if r.number is not None else sys.maxsize)
    if row.number is None:
        ragged.clear()
        with open(path, "rb") as fh:
            for _ in csv_stream(pa.string(), False, fh):
                if ragged:
                    break
        row = ragged[0] if ragged else row
    where = f"row {row.number - skip}" if row.number is not None else "a row"
    return f"{path}: {where} has {row.actual_columns} columns, expected {width}"


def _numbers(column, path: Path, first_row: int, shown: str) -> np.ndarray:
    """A text column as float64, read as Python's float() reads it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.cast(pc.utf8_trim_whitespace(column), pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        pass
    values = column.to_pylist()
    out = np.empty(len(values))
    for i, text in enumerate(values):
        try:
            out[i] = float(text)
        except ValueError:
            what = "empty" if not text.strip() else "not a number"
            raise DataError(f"{path}: row {first_row + i}, column {shown}: {what}") from None
    return out
