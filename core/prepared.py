"""A prepared data set: training and validation rows on disk, in shard order.

`prepare` (core/prepare_writer.py) writes one; `PreparedSet` reads it. The
training rows are stored in the order `core.shards.shard_rows` cuts them, so
shard s of any shard count owns one contiguous range of stored rows, held in
`.npy` blocks of `block_rows` rows that are memory-mapped (or, from
`s3://bucket/prefix`, downloaded once into a local cache and mapped). The
manifest holds the standardization statistics and every file's size and
SHA-256; `verify_train`/`verify_val` check the files holding a range against
it before they are trusted. The format is docs/data.md's.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from core.datafiles import DataError
from core.prepared_manifest import EVAL_BLOCK_ROWS, FORMAT, MANIFEST, block_name, check_manifest

HASH_CHUNK = 8 << 20
MAPPED_BLOCKS = 64

__all__ = ["DataError", "EVAL_BLOCK_ROWS", "FORMAT", "MANIFEST", "PreparedSet", "block_name", "prepare",
           "sha256_file"]


def sha256_file(fh) -> str:
    """SHA-256 of an open binary file, streamed."""
    digest = hashlib.sha256()
    while chunk := fh.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def is_prepared(location: str | Path) -> bool:
    """Whether `location` names a prepared set (s3:// or a folder holding a manifest)."""
    text = str(location)
    return text.startswith("s3://") or (Path(text) / MANIFEST).is_file()


# ----------------------------------------------------------------- storage


class _Local:
    """Files under a local directory, read in place."""

    def __init__(self, root: Path):
        self.root = root

    def where(self, path: str) -> str:
        return str(self.root / path)

    def read_bytes(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def local(self, path: str) -> Path:
        return self.root / path


class _Remote:
    """Files under a prefix of a pyarrow filesystem (S3), each fetched once
    into a local cache directory and read there."""

    def __init__(self, fs, prefix: str, display: str, cache: Path | None):
        self.fs, self.prefix, self.display, self.cache = fs, prefix.rstrip("/"), display.rstrip("/"), cache

    def where(self, path: str) -> str:
        return f"{self.display}/{path}"

    def read_bytes(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(f"{self.prefix}/{path}") as fh:
                return fh.read()
        except (OSError, FileNotFoundError) as err:
            raise DataError(f"{self.where(path)}: missing or unreadable ({type(err).__name__})") from None

    def local(self, path: str) -> Path:
        target = self.cache / path
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(f"{self.prefix}/{path}") as src:
                while chunk := src.read(HASH_CHUNK):
                    out.write(chunk)
            os.replace(tmp, target)
        except FileNotFoundError:
            os.unlink(tmp)
            raise DataError(f"{self.where(path)}: missing (listed in the manifest, not in the bucket)") from None
        except OSError as err:
            os.unlink(tmp)
            raise DataError(f"{self.where(path)}: cannot be fetched ({type(err).__name__})") from None
        return target


def s3_filesystem(**options):
    """pyarrow's S3 filesystem; the endpoint from SHARDPROP_S3_ENDPOINT (e.g.
    http://127.0.0.1:9000), credentials and region from the standard AWS_* variables;
    `options` go to pyarrow.fs.S3FileSystem as they are."""
    from pyarrow import fs

    endpoint = os.environ.get("SHARDPROP_S3_ENDPOINT") or None
    kw = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1", **options}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kw.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    return fs.S3FileSystem(**kw)


def cache_root() -> Path:
    return Path(os.environ.get("SHARDPROP_CACHE") or Path.home() / ".cache" / "shardprop") / "prepared"


# ------------------------------------------------------------------- reader


class PreparedSet:
    """A prepared data set opened for reading (see the module docstring)."""

    def __init__(self, manifest: dict, manifest_bytes: bytes, storage):
        self.manifest = manifest
        self.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
        self._storage = storage
        self._files = {f["path"]: f for f in manifest["files"]}
        self.n_train = manifest["rows"]["train"]
        self.n_val = manifest["rows"]["validation"]
        self.n_features = manifest["features"]
        self.n_classes = manifest["classes"] if manifest["task"] == "classification" else None
        self.n_targets = self.n_classes if self.n_classes is not None else manifest["targets"]
        self.dtype = np.dtype(manifest["dtype"])
        self.mean = np.array(manifest["standardization"]["mean"], dtype=np.float64)
        self.scale = np.array(manifest["standardization"]["scale"], dtype=np.float64)
        self.split_seed = manifest["split"]["seed"]
        self.validation_split = float(manifest["split"]["validation_split"])
        self.block_rows = manifest["block_rows"]
        self.eval_block_rows = manifest["eval_block_rows"]
        self._mapped: dict[str, np.ndarray] = {}  # the blocks mapped lately, newest last

    @classmethod
    def open(cls, location: str | Path, filesystem=None) -> "PreparedSet":
        text = str(location)
        if text.startswith("s3://") or filesystem is not None:
            prefix = text.removeprefix("s3://")
            fs = filesystem or s3_filesystem()
            storage = _Remote(fs, prefix, text, None)
        else:
            root = Path(text)
            if not root.is_dir():
                raise DataError(f"{text}: not a prepared data set (no such directory)")
            storage = _Local(root)
        where = storage.where(MANIFEST)
        try:
            raw = storage.read_bytes(MANIFEST)
        except OSError:
            raise DataError(f"{where}: missing (not a prepared data set)") from None
        try:
            manifest = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{where}: not valid JSON") from None
        check_manifest(manifest, where)
        prepared = cls(manifest, raw, storage)
        if isinstance(storage, _Remote):
            storage.cache = cache_root() / prepared.manifest_sha256
        return prepared

    # -- which blocks hold which rows

    def _rows(self, split: str) -> int:
        return self.n_train if split == "train" else self.n_val

    def _blocks(self, split: str, start: int, stop: int) -> list[int]:
        n = self._rows(split)
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows [{start}, {stop}) are outside the {n} stored {split} rows")
        if start == stop:
            return []
        return list(range(start // self.block_rows, (stop - 1) // self.block_rows + 1))

    def train_block_range(self, start: int, stop: int) -> list[int]:
        """The indices of the blocks holding stored training rows [start, stop)."""
        return self._blocks("train", start, stop)

    def val_block_range(self, start: int, stop: int) -> list[int]:
        return self._blocks("val", start, stop)

    # -- reading

    def _load(self, split: str, kind: str, index: int) -> np.ndarray:
        """A block, memory-mapped and checked against the manifest's shape; the
        last MAPPED_BLOCKS stay mapped, so reading a shard's batches step by step
        does not open its files again each step."""
        path = block_name(split, kind, index)
        if path in self._mapped:
            self._mapped[path] = self._mapped.pop(path)
            return self._mapped[path]
        array = self._map(split, kind, index, path)
        self._mapped[path] = array
        if len(self._mapped) > MAPPED_BLOCKS:
            self._mapped.pop(next(iter(self._mapped)))
        return array

    def _map(self, split: str, kind: str, index: int, path: str) -> np.ndarray:
        where = self._storage.where(path)
        local = self._storage.local(path)
        rows = min(self.block_rows, self._rows(split) - index * self.block_rows)
        if kind == "X":
            shape, dtype = (rows, self.n_features), self.dtype
        elif self.n_classes is not None:
            shape, dtype = (rows,), np.dtype(np.int64)
        else:
            shape, dtype = (rows, self.n_targets), np.dtype(np.float64)
        try:
            array = np.load(local, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{where}: missing (listed in the manifest)") from None
        except (ValueError, OSError, EOFError):
            raise DataError(f"{where}: truncated or altered (not a readable .npy block)") from None
        if array.shape != shape or array.dtype != dtype or not array.flags.c_contiguous:
            raise DataError(f"{where}: holds shape {array.shape} of {array.dtype}, the manifest says "
                            f"{shape} of {dtype} (altered)")
        return array

    def _read(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for index in self._blocks(split, start, stop):
            first = index * self.block_rows
            a, b = max(start, first) - first, min(stop, first + self.block_rows) - first
            parts.append((self._load(split, "X", index)[a:b], self._load(split, "y", index)[a:b]))
        if not parts:
            y_shape = (0,) if self.n_classes is not None else (0, self.n_targets)
            return (np.empty((0, self.n_features), self.dtype),
                    np.empty(y_shape, np.int64 if self.n_classes is not None else np.float64))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def read_train(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw features (self.dtype) and labels of stored training rows [start, stop):
        a memory-mapped view when they lie in one block, else a copy."""
        return self._read("train", start, stop)

    def read_val(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._read("val", start, stop)

    def release(self) -> None:
        """Unmap the blocks kept mapped, so that the pages read through them
        stop counting in this process's resident memory (views still held
        keep theirs)."""
        self._mapped.clear()

    # -- verification

    def _verify(self, split: str, start: int, stop: int) -> None:
        for index in self._blocks(split, start, stop):
            for kind in "Xy":
                self.verify_file(block_name(split, kind, index))

    def verify_file(self, path: str) -> None:
        """One file against the manifest: present, its size, then its SHA-256."""
        entry, where = self._files[path], self._storage.where(path)
        local = self._storage.local(path)
        try:
            with open(local, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != entry["bytes"]:
                    state = "truncated" if size < entry["bytes"] else "altered"
                    raise DataError(f"{where}: {state}: {size} bytes, the manifest says {entry['bytes']}")
                if sha256_file(fh) != entry["sha256"]:
                    raise DataError(f"{where}: altered: its SHA-256 differs from the manifest's")
        except FileNotFoundError:
            raise DataError(f"{where}: missing (listed in the manifest)") from None
        except OSError as err:
            raise DataError(f"{where}: unreadable ({err.strerror})") from None

    def verify_train(self, start: int, stop: int) -> None:
        """Check every file holding stored training rows [start, stop); DataError naming
        the first that is missing, truncated or altered."""
        self._verify("train", start, stop)

    def verify_val(self, start: int, stop: int) -> None:
        self._verify("val", start, stop)

    def verify(self) -> None:
        """Every file of the set."""
        self.verify_train(0, self.n_train)
        self.verify_val(0, self.n_val)


def __getattr__(name: str):
    # `prepare` lives in core/prepare_writer.py, which builds on this module's names;
    # found here on first use, so either module may be imported first.
    if name == "prepare":
        from core.prepare_writer import prepare

        return prepare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
