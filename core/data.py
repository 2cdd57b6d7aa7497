"""Data sets: the built-in ones, user files, the split and the standardization.

`load_dataset` turns a spec's `data` section into training and validation
arrays. The split is deterministic in the seed, inputs are standardized with
statistics of the training rows only, and every file is checked (shape,
finiteness, labels) before any training starts. Files are never unpickled.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.spec import BUILTIN_SOURCES, DataSpec, validation_rows


class DataError(ValueError):
    """Data that cannot be trained on; the message says which file and why."""


@dataclass(frozen=True)
class Dataset:
    """Standardized training and validation arrays.

    `y` holds integer class labels of shape (n,) for classification, or float
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
        real = candidate.resolve()  # follows symlinks, so a link cannot lead outside
        if not any(real == root or root in real.parents for root in roots):
            raise DataError(f"data.source {source!r} lies outside the allowed data roots")
        if real.exists():
            return real
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


def synthetic(samples: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs labelled by a random teacher network (tanh hidden layer).

    Deterministic in `seed`. The labels are the teacher's argmax, so a student
    MLP can learn them well; class balance follows from the teacher.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    X = rng.standard_normal((samples, features))
    hidden = max(8, 2 * classes)
    W1 = rng.standard_normal((features, hidden)) / math.sqrt(features)
    W2 = rng.standard_normal((hidden, classes)) * 2.0
    scores = np.tanh(X @ W1 * 2.0) @ W2
    return X, np.argmax(scores, axis=1).astype(np.int64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would try anything else as a pickle
            raise DataError(f"{path}: not a readable .npz file (no zip archive header)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: .npz must hold arrays 'X' and 'y'; missing {', '.join(missing)}")
            return archive["X"], archive["y"]
    except DataError:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(f"{path}: holds pickled objects, which are never loaded; store plain numeric arrays") from None
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None


def _read_csv(path: Path, label_column: str | int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, newline="") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read CSV ({err})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")

    def numeric(row: list[str]) -> bool:
        try:
            [float(c) for c in row]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if not body:
        raise DataError(f"{path}: has a header but no data rows")
    width = len(header) if header is not None else len(body[0])
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
            raise DataError(f"data.label_column {label_column!r} is not a column of {path} (header: {header})")
        label = header.index(label_column)
    values = np.empty((len(body), width), dtype=np.float64)
    for i, row in enumerate(body):
        line = i + 1 + (header is not None)
        if len(row) != width:
            raise DataError(f"{path}: line {line} has {len(row)} columns, expected {width}")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise DataError(f"{path}: line {line}, column {j + 1}: {cell!r} is not a number") from None
    X = np.delete(values, label, axis=1)
    return X, values[:, label]


def _check(X: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Validated float64 inputs, targets and the class count (None: regression)."""
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DataError(f"{where}: X and y must be numeric arrays, got dtypes {X.dtype} and {y.dtype}")
    if X.ndim != 2:
        raise DataError(f"{where}: X must be 2-D (rows, features), got shape {X.shape}")
    if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
        raise DataError(f"{where}: y must have one row per row of X ({X.shape[0]}), got shape {y.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{where}: no data (X has shape {X.shape})")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        r, c = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{where}: X holds a non-finite value ({X[r, c]}) at row {r}, column {c}")
    yf = y.astype(np.float64)
    if not np.isfinite(yf).all():
        r = int(np.argwhere(~np.isfinite(yf.reshape(len(yf), -1)))[0][0])
        raise DataError(f"{where}: y holds a non-finite value at row {r}")
    if y.ndim == 1 and (y.dtype.kind in "biu" or np.array_equal(yf, np.round(yf))):
        labels = yf.astype(np.int64)
        if labels.min() < 0:
            raise DataError(f"{where}: class labels must be >= 0, got {labels.min()}")
        classes = int(labels.max()) + 1
        if classes < 2:
            raise DataError(f"{where}: classification needs at least 2 classes, all labels are {labels.min()}")
        return X, labels, classes
    return X, yf.reshape(len(yf), -1), None


def load_arrays(spec: DataSpec, seed: int, data_roots: list[str | Path] | None = None):
    """Raw (X, y, classes) for a data spec, validated."""
    if spec.source == "synthetic":
        X, y = synthetic(spec.samples, spec.features, spec.classes, seed)
        return X, y, spec.classes
    if spec.source in BUILTIN_SOURCES:
        X, y = _builtin(spec.source)
        return _check(X, y, spec.source)
    path = resolve_data_path(spec.source, data_roots)
    if not path.is_file():
        raise DataError(f"data.source {spec.source!r}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"data.source {spec.source!r}: the file is empty")
    if path.suffix.lower() == ".npz":
        X, y = _read_npz(path)
    else:
        X, y = _read_csv(path, spec.label_column)
    return _check(X, y, str(spec.source))


def split_rows(n_rows: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) row indices."""
    order = np.random.default_rng([seed, 0x5917]).permutation(n_rows)
    n_val = validation_rows(n_rows, validation_split)
    return order[n_val:], order[:n_val]


def load_dataset(spec: DataSpec, seed: int, dtype: str = "float32",
                 data_roots: list[str | Path] | None = None) -> Dataset:
    """Load, check, split and standardize the data a spec names."""
    X, y, classes = load_arrays(spec, seed, data_roots)
    train, val = split_rows(len(X), spec.validation_split, seed)
    if len(train) < spec.shards:
        raise DataError(
            f"data.shards ({spec.shards}) exceeds the training rows ({len(train)}) of {spec.source!r}"
        )
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
