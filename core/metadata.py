"""What a data set is, found without loading it: rows, features, classes, bytes.

`describe` answers from the spec for the built-in and synthetic sets, from the
zip directory, the `.npy` headers and a streamed pass over the labels for an
`.npz`, and from one streamed pass over a CSV (line lengths capped, only the
label column parsed). A prepared set (named, or a large raw source's cached
copy: core/data_source.py) answers from its manifest, its split checked
against the spec's. Memory stays bounded whatever the file holds; the same
limits refuse what the loader would refuse, so admission can decide before a
job is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.data import DataError, DataLimits, check_synthetic, resolve_data_path
from core.datafiles import FLOAT64, classes_of, csv_rows, cell, label_range, npz_shapes
from core.spec import BUILTIN_SOURCES, DataSpec

# (rows, features, classes) of scikit-learn's bundled sets
BUILTIN_SHAPES = {"digits": (1797, 64, 10), "iris": (150, 4, 3), "wine": (178, 13, 3),
                  "breast_cancer": (569, 30, 2)}


@dataclass(frozen=True)
class DataMetadata:
    """A data set's shape. `n_classes` is None for regression, whose
    `n_targets` is the target count; `bytes` is the peak memory of loading it
    (float64 X and y, and a synthetic set's teacher); `prepared`: the rows
    are a prepared set's, each worker reading only its own shards."""

    rows: int
    n_features: int
    n_classes: int | None
    n_targets: int
    bytes: int
    prepared: bool = False


def describe(spec: DataSpec, data_roots: list[str | Path] | None = None,
             limits: DataLimits = DataLimits(), dtype: str = "float32") -> DataMetadata:
    """The metadata of the data a spec names; a DataError when it is
    unreadable or past `limits` (NotPrepared: a large raw source not prepared
    yet; SplitMismatch: a prepared set whose split the spec contradicts)."""
    from core.data_source import resolve

    prepared = resolve(spec, dtype=dtype, data_roots=data_roots, limits=limits, prepare=False)
    if prepared is not None:
        rows = prepared.n_train + prepared.n_val
        limits.check_features(spec.source, prepared.n_features)
        if prepared.n_classes is not None:
            limits.check_classes(spec.source, prepared.n_classes)
        width = prepared.n_features + (1 if prepared.n_classes is not None else prepared.n_targets)
        return DataMetadata(rows, prepared.n_features, prepared.n_classes, prepared.n_targets,
                            rows * width * FLOAT64, prepared=True)
    if spec.source == "synthetic":
        size = check_synthetic(spec, limits)
        return DataMetadata(spec.samples, spec.features, spec.classes, spec.classes, size)
    if spec.source in BUILTIN_SOURCES:
        rows, features, classes = BUILTIN_SHAPES[spec.source]
        return DataMetadata(rows, features, classes, classes, rows * (features + 1) * FLOAT64)
    path = resolve_data_path(spec.source, data_roots)
    if not path.is_file():
        raise DataError(f"data.source {spec.source!r}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"data.source {spec.source!r}: the file is empty")
    if path.suffix.lower() == ".npz":
        return _npz(path, limits)
    return _csv(path, spec.label_column, limits)


def _npz(path: Path, limits: DataLimits) -> DataMetadata:
    X, y = npz_shapes(path, limits)
    rows, features = X.shape
    if rows == 0 or features == 0:
        raise DataError(f"{path}: no data (X has shape {X.shape})")
    if len(y.shape) == 2:
        return DataMetadata(rows, features, None, y.shape[1], rows * (features + y.shape[1]) * FLOAT64)
    lowest, highest, integral = label_range(path, y)
    classes = classes_of(str(path), lowest, highest, limits) if integral else None
    return DataMetadata(rows, features, classes, classes or 1, rows * (features + 1) * FLOAT64)


def _csv(path: Path, label_column: str | int | None, limits: DataLimits) -> DataMetadata:
    rows = csv_rows(path, label_column, limits)
    layout = next(rows)
    count, lowest, highest, integral = 0, float("inf"), float("-inf"), True
    for line, row in rows:
        count += 1
        label = cell(path, line, row, layout.label)
        if label != label or label in (float("inf"), float("-inf")):
            raise DataError(f"{path}: line {line}, column {layout.label + 1}: the label is not finite")
        lowest, highest = min(lowest, label), max(highest, label)
        integral = integral and label == round(label)
    size = count * layout.width * FLOAT64  # csv_rows has checked it against the limits
    classes = classes_of(str(path), lowest, highest, limits) if integral else None
    return DataMetadata(count, layout.width - 1, classes, classes or 1, size)
