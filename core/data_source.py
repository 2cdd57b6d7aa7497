"""Where a job's rows come from: memory, or a prepared data set.

`resolve` reads a spec's `data` section and answers None for a source small
enough to be loaded whole, as it always was (a built-in set, a `.csv` or
`.npz` file up to `DataLimits.prepare_above_bytes`), or the `PreparedSet` to
read shard by shard: the prepared directory or `s3://bucket/prefix` the
spec names, or, for a larger raw source (or any Parquet source), the set
prepared from it once into a cache keyed by the source's content hash and
the split settings, and reused by every later job on the same bytes.

A prepared set fixes its split; a spec that says otherwise (another split
seed, validation split or label column, or float64 training on float32
rows) is refused naming the field, the spec's value and the manifest's.
The row partition of a prepared set (and of an in-memory one, core.data)
is `core.shards.shard_rows` keyed by the split seed (`data.split_seed`),
which is what lets a job vary its own `seed` (initialization, each shard's
batch order) over one prepared set.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.data import resolve_data_path
from core.datafiles import DataError, DataLimits
from core.prepared import MANIFEST, PreparedSet, cache_root
from core.spec import BUILTIN_SOURCES, DataSpec

if TYPE_CHECKING:
    from core.data import Dataset

# the cache's layout: one prepared set per key, a lock per key, and a memo of file hashes
FROM_SOURCE = "from-source"
CACHE_FORMAT = 1  # bumped when a cached set's content for the same key would change

Status = Callable[[str], None]


class SplitMismatch(DataError):
    """A spec's split settings that contradict its prepared set's manifest."""


class NotPrepared(DataError):
    """A large raw source whose prepared copy is not in the cache yet."""


def resolve(data: DataSpec, *, dtype: str = "float32", data_roots: list[str | Path] | None = None,
            limits: DataLimits = DataLimits(), on_status: Status | None = None,
            prepare: bool = True) -> PreparedSet | None:
    """None for a small in-memory source; else the PreparedSet the job reads
    (preparing a large raw source into the cache first, with `on_status`
    told the progress; with `prepare` False, NotPrepared instead when it is
    not cached yet). DataError when it cannot be read, SplitMismatch when
    its split contradicts the spec."""
    prepared = open_named(data, data_roots)
    if prepared is not None:
        check_split(data, dtype, prepared)
        return prepared
    if data.source in BUILTIN_SOURCES:
        return None
    path = resolve_data_path(data.source, data_roots)
    if not needs_preparing(path, limits):
        return None
    if not prepare:
        found = cached(path, data, dtype)
        if found is None:
            raise NotPrepared(f"data.source {data.source!r}: prepared into the cache when the job starts")
        return found
    return prepare_cached(path, data, dtype, limits, on_status)


def open_named(data: DataSpec, data_roots: list[str | Path] | None = None) -> PreparedSet | None:
    """The prepared set `data.source` names (s3://, or a folder holding a
    manifest), or None when it names anything else."""
    source = data.source
    if source.startswith("s3://"):
        return PreparedSet.open(source)
    if source in BUILTIN_SOURCES:
        return None
    path = resolve_data_path(source, data_roots)
    if path.is_dir() and (path / MANIFEST).is_file():
        return PreparedSet.open(path)
    return None


def needs_preparing(path: Path, limits: DataLimits) -> bool:
    """Whether a raw source is prepared rather than loaded whole: a Parquet
    file or folder always (there is no in-memory reader for it), a `.csv` or
    `.npz` past `limits.prepare_above_bytes`."""
    if path.is_dir():
        return True
    if not path.is_file():
        raise DataError(f"data.source {str(path)!r}: no such file or folder")
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    return path.stat().st_size > limits.prepare_above_bytes


# ---------------------------------------------------------------- the split


def check_split(data: DataSpec, dtype: str, prepared: PreparedSet) -> None:
    """Refuse a spec whose split settings contradict the set's manifest."""
    m = prepared.manifest
    label = m.get("label_column")
    problems = []
    if data.split_seed is not None and data.split_seed != prepared.split_seed:
        problems.append(("data.split_seed", data.split_seed, prepared.split_seed))
    if data.validation_split != prepared.validation_split:
        problems.append(("data.validation_split", data.validation_split, prepared.validation_split))
    if data.label_column is not None and data.label_column != label:
        problems.append(("data.label_column", data.label_column, label))
    if dtype == "float64" and prepared.dtype.name == "float32":
        problems.append(("training.dtype", dtype, "float32 rows (prepare with --dtype float64)"))
    if problems:
        said = "; ".join(f"{field} is {mine!r} in the spec, {theirs!r} in its manifest"
                         for field, mine, theirs in problems)
        raise SplitMismatch(f"data.source {data.source!r} is a prepared set whose split the spec contradicts: {said}")


# ---------------------------------------------------------------- the cache


def cache_key(source_sha256: str, data: DataSpec, dtype: str) -> str:
    """What a prepared copy of a source depends on: its bytes and the split settings."""
    settings = {"format": CACHE_FORMAT, "source": source_sha256, "split_seed": data.split_seed or 0,
                "validation_split": data.validation_split, "label_column": data.label_column, "dtype": dtype}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    return cache_root() / FROM_SOURCE


def cached(path: Path, data: DataSpec, dtype: str) -> PreparedSet | None:
    """The cached prepared copy of the raw source at `path`, if made already."""
    out = cache_dir() / cache_key(source_sha256(path), data, dtype)
    return PreparedSet.open(out) if (out / MANIFEST).is_file() else None


def prepare_cached(path: Path, data: DataSpec, dtype: str, limits: DataLimits,
                   on_status: Status | None = None) -> PreparedSet:
    """The prepared copy of the raw source at `path`, made once: under a lock
    per key (a second job on the same source waits, then reuses it), written
    by `prepare` beside its place and renamed into it whole."""
    from core.prepare_writer import prepare

    report = on_status or (lambda text: None)
    report("preparing data: hashing the source")
    key = cache_key(source_sha256(path), data, dtype)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    out = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / MANIFEST).is_file():
            return PreparedSet.open(out)
        prepared = prepare(path, out, label_column=data.label_column, validation_split=data.validation_split,
                           seed=data.split_seed or 0, dtype=dtype, limits=limits,
                           progress=lambda p: report(progress_text(p)))
    report("preparing data: done")
    return prepared


def progress_text(p) -> str:
    """A prepare Progress as a status line."""
    if p.stage == "read":
        share = f"{100 * p.bytes / p.total_bytes:.0f}%, " if p.total_bytes else ""
        return f"preparing data: reading ({share}{p.rows} rows)"
    if p.stage == "write":
        return f"preparing data: writing blocks ({p.blocks} of {p.total_blocks})"
    return f"preparing data: {p.rows} rows prepared"


def source_sha256(path: Path) -> str:
    """The SHA-256 `prepare` records for the source (a file's bytes; a
    folder's .parquet files' names and hashes), remembered per file identity
    (path, device, inode, size, modification and change times) so later jobs
    do not read gigabytes again to find their cached copy."""
    from core.prepare_sources import _file_digest

    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet") if path.is_dir() else [path]
    identity = json.dumps([_identity(p) for p in files]).encode()
    memo = cache_dir() / "hashes" / hashlib.sha256(identity).hexdigest()
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    if not files:
        raise DataError(f"{path}: a folder without .parquet files")
    digest = _file_digest(files, path)[0].hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=f".{memo.name}.")  # one of its own per thread and process
    with os.fdopen(fd, "w") as fh:
        fh.write(digest)
    os.replace(tmp, memo)
    return digest


def _identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# ------------------------------------------------------- held in memory whole


def load_prepared(prepared: PreparedSet, data: DataSpec, dtype: str, limits: DataLimits) -> "Dataset":
    """A prepared set as a whole in-memory `Dataset`, its training rows in
    stored (shard) order as an in-memory source keeps them too, standardized
    with the manifest's statistics; within `limits`, like any in-memory
    source. The same rows and bits a worker reading its shards' blocks
    computes (core.rows.PreparedRows)."""
    from core.data import Dataset, standardize

    n, F = prepared.n_train + prepared.n_val, prepared.n_features
    limits.check_size(str(data.source), n, F, 1 if prepared.n_classes is not None else prepared.n_targets)
    X_train, y_train = prepared.read_train(0, prepared.n_train)
    X_val, y_val = prepared.read_val(0, prepared.n_val)
    mean, scale = (prepared.mean, prepared.scale) if data.standardize else (None, None)
    return Dataset(X_train=standardize(X_train, mean, scale, dtype), y_train=np.array(y_train),
                   X_val=standardize(X_val, mean, scale, dtype), y_val=np.array(y_val),
                   n_features=F, n_classes=prepared.n_classes, mean=mean, scale=scale)
