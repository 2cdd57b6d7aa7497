"""Data sets: split, standardization, and refusals of bad files."""

import os

import numpy as np
import pytest

from core.data import DataError, load_dataset, resolve_data_path, split_rows, synthetic
from core.spec import parse_spec


def data_spec(**fields):
    return parse_spec({"data": {"shards": 2, **fields}, "training": {"steps": 1}, "resources": {"workers": 1}}).data


@pytest.mark.parametrize("name, rows, features, classes", [
    ("digits", 1797, 64, 10), ("iris", 150, 4, 3), ("wine", 178, 13, 3), ("breast_cancer", 569, 30, 2),
])
def test_builtin_sets_load_split_and_standardize(name, rows, features, classes):
    ds = load_dataset(data_spec(source=name, validation_split=0.2), seed=0)
    assert ds.n_features == features and ds.n_classes == classes
    assert len(ds.X_train) + len(ds.X_val) == rows
    assert len(ds.X_val) == int(rows * 0.2)
    assert ds.X_train.dtype == np.float32
    # statistics of the training rows only: standardized training columns have mean 0
    np.testing.assert_allclose(ds.X_train.astype(np.float64).mean(axis=0), 0, atol=1e-5)


def test_split_is_a_deterministic_partition():
    train, val = split_rows(100, 0.25, seed=4)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100)) and len(val) == 25
    t2, v2 = split_rows(100, 0.25, seed=4)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)


def test_standardization_uses_training_statistics_only(tmp_path):
    X = np.arange(40, dtype=np.float64).reshape(20, 2)
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset(data_spec(source=str(tmp_path / "d.npz"), validation_split=0.5), seed=0, dtype="float64")
    train, val = split_rows(20, 0.5, seed=0)
    mean, std = X[train].mean(axis=0), X[train].std(axis=0)
    np.testing.assert_array_equal(ds.mean, mean)
    np.testing.assert_array_equal(ds.X_val, (X[val] - mean) / std)


def test_synthetic_is_deterministic_and_learnable_shape():
    X1, y1 = synthetic(500, 6, 4, seed=2)
    X2, y2 = synthetic(500, 6, 4, seed=2)
    assert np.array_equal(X1, X2) and np.array_equal(y1, y2)
    assert X1.shape == (500, 6) and set(np.unique(y1)) <= set(range(4)) and len(np.unique(y1)) >= 2
    assert not np.array_equal(synthetic(500, 6, 4, seed=3)[1], y1)


def test_csv_with_header_and_named_label(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n" + "".join(f"{i},{i % 3},{2 * i}\n" for i in range(30)))
    ds = load_dataset(data_spec(source=str(path), label_column="label", standardize=False), seed=0, dtype="float64")
    assert ds.n_features == 2 and ds.n_classes == 3
    np.testing.assert_array_equal(ds.X_train[:, 1], 2 * ds.X_train[:, 0])
    np.testing.assert_array_equal(ds.y_train, ds.X_train[:, 0].astype(int) % 3)


def test_float_targets_make_a_regression_set(tmp_path):
    X = np.random.default_rng(0).standard_normal((30, 3))
    np.savez(tmp_path / "r.npz", X=X, y=X @ np.array([[1.0, 0.0], [0.5, 2.0], [0.25, -1.0]]))
    ds = load_dataset(data_spec(source=str(tmp_path / "r.npz")), seed=0)
    assert ds.n_classes is None and ds.n_targets == 2 and ds.y_train.shape[1] == 2


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: write(p, "e.csv", ""), "empty"),
    (lambda p: write(p, "e.npz", b""), "empty"),
    (lambda p: str(p / "missing.csv"), "no such file"),
    (lambda p: write(p, "t.csv", "a,b\n1,x\n2,1\n"), "line 2, column 2: not a number"),
    (lambda p: write(p, "r.csv", "1,2,0\n3,0\n4,5,1\n"), "line 2 has 2 columns"),
    (lambda p: write(p, "h.csv", "a,b\n"), "no data rows"),
    (lambda p: write(p, "j.npz", b"not a zip file at all"), "not a readable .npz"),
])
def test_bad_files_are_refused_before_training(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_dataset(data_spec(source=make(tmp_path)), seed=0)


@pytest.mark.parametrize("X, y, message", [
    (np.array([[1.0, np.nan]] * 10), np.arange(10) % 2, "non-finite value"),
    (np.array([[1.0, np.inf]] * 10), np.arange(10) % 2, "non-finite value"),
    (np.ones((10, 2)), np.full(10, -1), "labels must be >= 0"),
    (np.ones((10, 2)), np.zeros(10, dtype=int), "at least 2 classes"),
    (np.ones(10), np.arange(10) % 2, "X must be 2-D"),
    (np.ones((10, 2)), np.arange(9) % 2, "one row per row of X"),
    (np.ones((10, 2)), np.array(["a"] * 10), "numeric"),
])
def test_bad_arrays_are_refused(tmp_path, X, y, message):
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(DataError, match=message):
        load_dataset(data_spec(source=str(tmp_path / "d.npz")), seed=0)


def test_pickled_objects_are_never_loaded(tmp_path):
    np.savez(tmp_path / "p.npz", X=np.array([object()] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="pickled objects"):
        load_dataset(data_spec(source=str(tmp_path / "p.npz")), seed=0)


def test_missing_arrays_are_named(tmp_path):
    np.savez(tmp_path / "m.npz", X=np.ones((4, 2)))
    with pytest.raises(DataError, match="missing y"):
        load_dataset(data_spec(source=str(tmp_path / "m.npz")), seed=0)


def test_paths_are_confined_to_data_roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "ok.csv").write_text("1,0\n")
    (outside / "secret.csv").write_text("1,0\n")
    os.symlink(outside / "secret.csv", root / "link.csv")
    assert resolve_data_path("ok.csv", [root]) == (root / "ok.csv").resolve()
    assert resolve_data_path(str(root / "ok.csv"), [root]) == (root / "ok.csv").resolve()
    for bad, message in [("../outside/secret.csv", r"\.\."), (str(outside / "secret.csv"), "outside"),
                         ("link.csv", "outside"), ("nope.csv", "not found")]:
        with pytest.raises(DataError, match=message):
            resolve_data_path(bad, [root])
