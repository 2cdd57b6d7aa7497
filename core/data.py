"""Data sets: the built-in ones, user files, the split and the standardization.

`load_dataset` turns a spec's `data` section into training and validation
arrays. The split is deterministic in the seed, the training rows are kept in
shard order (core.shards: the order a prepared set stores them in, so the
two give the same bits), inputs are standardized with statistics of the
training rows only, and every file is checked (shape,
finiteness, labels) before any training starts. Nothing is read past
`DataLimits` (a file is judged by its headers and streamed: core/datafiles.py),
and files are never unpickled.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.datafiles import FLOAT64, DataError, DataLimits, classes_of, npz_shapes, read_csv
from core.prepared_manifest import EVAL_BLOCK_ROWS
from core.shards import shard_order
from core.spec import BUILTIN_SOURCES, DataSpec, validation_rows

__all__ = ["DataError", "DataLimits", "Dataset", "load_dataset", "load_arrays", "resolve_data_path",
           "split_rows", "standardize", "synthetic", "synthetic_bytes"]


@dataclass(frozen=True)
class Dataset:
    """Standardized training and validation arrays, held in memory: a row
    source (core.rows.RowSource) whose every row is always at hand.

    The training rows are in shard order. `y` holds integer class labels of shape (n,) for classification, or float
    targets of shape (n, k) for regression. `mean` and `scale` are the
    standardization (float64) that the trained model carries so that it can
    predict on raw rows; both are None when standardization is off.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_features: int
    n_classes: int | None  # None for regression
    mean: np.ndarray | None
    scale: np.ndarray | None

    @property
    def n_targets(self) -> int:
        return self.n_classes if self.n_classes is not None else self.y_train.shape[1]

    # -- the row-source interface (core.rows)

    @property
    def n_train(self) -> int:
        return len(self.X_train)

    @property
    def n_val(self) -> int:
        return len(self.X_val)

    @property
    def n_val_blocks(self) -> int:
        return -(-self.n_val // EVAL_BLOCK_ROWS)

    def own(self, ranges) -> None:
        """Every row is held already."""

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardized inputs and targets of stored training rows `rows`."""
        return self.X_train[rows], self.y_train[rows]

    def val_block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation block `block`: EVAL_BLOCK_ROWS validation rows (fewer at the end)."""
        a = block * EVAL_BLOCK_ROWS
        return self.X_val[a:a + EVAL_BLOCK_ROWS], self.y_val[a:a + EVAL_BLOCK_ROWS]


# ----------------------------------------------------------------- sources


def resolve_data_path(source: str, data_roots: list[str | Path] | None) -> Path:
    """The file a spec's `source` names, confined to `data_roots` when given.

    With roots, a relative path is looked up under each root in turn, an
    absolute one must lie inside a root after resolving symlinks, and `..`
    is refused outright.
    """
    path = Path(source)
    if data_roots is None:
        return path
    if ".." in path.parts:
        raise DataError(f"data.source must not contain '..', got {source!r}")
    roots = [Path(r).resolve() for r in data_roots]
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        try:
            real = candidate.resolve()  # follows symlinks, so a link cannot lead outside
            if not any(real == root or root in real.parents for root in roots):
                raise DataError(f"data.source {source!r} lies outside the allowed data roots")
            if real.exists():
                return real
        except DataError:
            raise
        except (OSError, ValueError) as err:  # a name too long for the file system, a NUL byte
            reason = getattr(err, "strerror", None) or "not a usable file name"
            raise DataError(f"data.source: {reason} ({len(source)} characters)") from None
    raise DataError(f"data.source {source!r} was not found under the data roots")


def _builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # imported lazily: it is slow to import

    loader = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }[name]
    X, y = loader(return_X_y=True)
    return X.astype(np.float64), y.astype(np.int64)


def _teacher_width(classes: int) -> int:
    return max(8, 2 * classes)


def synthetic_bytes(samples: int, features: int, classes: int) -> int:
    """The peak bytes `synthetic` allocates: X, the teacher's two weight
    matrices, its hidden activations (twice: product and tanh) and its scores,
    all float64, and the labels."""
    hidden = _teacher_width(classes)
    values = samples * features + features * hidden + hidden * classes + 2 * samples * hidden + samples * classes
    return (values + samples) * FLOAT64


def synthetic(samples: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs labelled by a random teacher network (tanh hidden layer).

    Deterministic in `seed`. The labels are the teacher's argmax, so a student
    MLP can learn them well; class balance follows from the teacher.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    X = rng.standard_normal((samples, features))
    hidden = _teacher_width(classes)
    W1 = rng.standard_normal((features, hidden)) / math.sqrt(features)
    W2 = rng.standard_normal((hidden, classes)) * 2.0
    scores = np.tanh(X @ W1 * 2.0) @ W2
    return X, np.argmax(scores, axis=1).astype(np.int64)


def _read_npz(path: Path, limits: DataLimits) -> tuple[np.ndarray, np.ndarray]:
    npz_shapes(path, limits)  # refused here, before anything is decompressed, when too large
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["X"], archive["y"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError(f"{path}: not a readable .npz file (a damaged array)") from None


def _check(X: np.ndarray, y: np.ndarray, where: str,
           limits: DataLimits) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Validated float64 inputs, targets and the class count (None: regression)."""
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DataError(f"{where}: X and y must be numeric arrays, got dtypes {X.dtype} and {y.dtype}")
    if X.ndim != 2:
        raise DataError(f"{where}: X must be 2-D (rows, features), got shape {X.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise DataError(f"{where}: y must have one row per row of X ({X.shape[0]}), got shape {y.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{where}: no data (X has shape {X.shape})")
    limits.check_size(where, X.shape[0], X.shape[1], y.shape[1] if y.ndim == 2 else 1)
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{where}: X holds a non-finite value at row {r}, column {c}")
    yf = y.astype(np.float64)
    if not np.isfinite(yf).all():
        r = int(np.argwhere(~np.isfinite(yf.reshape(len(yf), -1)))[0][0])
        raise DataError(f"{where}: y holds a non-finite value at row {r}")
    if y.ndim == 1 and (y.dtype.kind in "biu" or np.array_equal(yf, np.round(yf))):
        classes = classes_of(where, yf.min(), yf.max(), limits)
        return X, yf.astype(np.int64), classes
    return X, yf.reshape(len(yf), -1), None


def load_arrays(spec: DataSpec, seed: int, data_roots: list[str | Path] | None = None,
                limits: DataLimits = DataLimits()):
    """Raw (X, y, classes) for a data spec, validated, and refused before it
    is read when `limits` say it is too large."""
    if spec.source == "synthetic":
        check_synthetic(spec, limits)
        X, y = synthetic(spec.samples, spec.features, spec.classes, data_seed(spec, seed))
        return X, y, spec.classes
    if spec.source in BUILTIN_SOURCES:
        X, y = _builtin(spec.source)
        return _check(X, y, spec.source, limits)
    path = resolve_data_path(spec.source, data_roots)
    if not path.is_file():
        raise DataError(f"data.source {spec.source!r}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"data.source {spec.source!r}: the file is empty")
    if path.suffix.lower() == ".npz":
        X, y = _read_npz(path, limits)
    else:
        X, y = read_csv(path, spec.label_column, limits)
    return _check(X, y, str(spec.source), limits)


def check_synthetic(spec: DataSpec, limits: DataLimits) -> int:
    """The bytes generating a synthetic set takes, refused past the limits."""
    where = "synthetic data"
    limits.check_size(where, spec.samples, spec.features)
    limits.check_classes(where, spec.classes)
    size = synthetic_bytes(spec.samples, spec.features, spec.classes)
    if size > limits.max_data_bytes:
        raise DataError(f"{where}: generating {spec.samples} x {spec.features} samples of {spec.classes} classes "
                        f"needs {size} bytes, more than the limit of {limits.max_data_bytes} (max_data_bytes)")
    return size


def data_seed(spec: DataSpec, seed: int) -> int:
    """The seed of the data itself (the split, a synthetic set): `split_seed`,
    which a JobSpec always fills in (the job's seed unless given), else `seed`."""
    return seed if spec.split_seed is None else spec.split_seed


def split_rows(n_rows: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) row indices."""
    order = np.random.default_rng([seed, 0x5917]).permutation(n_rows)
    n_val = validation_rows(n_rows, validation_split)
    return order[n_val:], order[:n_val]


def load_dataset(spec: DataSpec, seed: int, dtype: str = "float32",
                 data_roots: list[str | Path] | None = None, limits: DataLimits = DataLimits()) -> Dataset:
    """Load, check, split and standardize the data a spec names, within `limits`.
    A prepared set (named, or made from a large raw source: core/data_source.py)
    is read whole, in its stored order."""
    from core.data_source import load_prepared, resolve

    if spec.split_seed is None:  # a DataSpec on its own: the seed given splits it
        spec = spec.model_copy(update={"split_seed": seed})
    prepared = resolve(spec, dtype=dtype, data_roots=data_roots, limits=limits)
    if prepared is not None:
        dataset = load_prepared(prepared, spec, dtype, limits)
    else:
        dataset = _load_raw(spec, seed, dtype, data_roots, limits)
    if len(dataset.X_train) < spec.shards:
        raise DataError(
            f"data.shards ({spec.shards}) exceeds the training rows ({len(dataset.X_train)}) of {spec.source!r}"
        )
    return dataset


def _load_raw(spec: DataSpec, seed: int, dtype: str, data_roots, limits: DataLimits) -> Dataset:
    X, y, classes = load_arrays(spec, seed, data_roots, limits)
    train, val = split_rows(len(X), spec.validation_split, data_seed(spec, seed))
    train = train[shard_order(len(train), data_seed(spec, seed))]
    mean = scale = None
    if spec.standardize:
        mean = X[train].mean(axis=0)
        scale = X[train].std(axis=0)
        scale[scale == 0] = 1.0  # a constant column carries no information; leave it centred
    return Dataset(
        X_train=standardize(X[train], mean, scale, dtype),
        y_train=y[train],
        X_val=standardize(X[val], mean, scale, dtype),
        y_val=y[val],
        n_features=X.shape[1],
        n_classes=classes,
        mean=mean,
        scale=scale,
    )


def standardize(X: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None, dtype) -> np.ndarray:
    """(X - mean) / scale in float64, then cast: the same bits at training and prediction."""
    X = np.asarray(X, dtype=np.float64)
    if mean is not None:
        X = (X - mean) / scale
    return np.ascontiguousarray(X, dtype=dtype)
