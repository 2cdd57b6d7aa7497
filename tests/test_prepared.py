"""Prepared data sets: the stored rows against the in-memory loader, the
statistics against numpy, one result from CSV, Parquet and .npz, refusals of
bad sources, and files that do not match their manifest."""

import hashlib
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import core.prepare_csv
from core.data import load_arrays, split_rows
from core.datafiles import DataError
from core.prepared import PreparedSet, prepare
from core.shards import shard_rows
from core.spec import DataSpec
from tests.s3_helpers import s3_server, upload  # noqa: F401  (a fixture)

SECRET = "s3cr3tvalue"  # a cell's text that no error may echo


def make_data(n=500, f=5, seed=0, classes=4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, f)) * rng.uniform(0.5, 50, f) + rng.uniform(-10, 10, f)
    X[:, 2] = 7.0  # a constant column: its scale is 1
    y = rng.integers(0, classes, n)
    return X, y


def write_csv(path, X, y, header=True):
    with open(path, "w") as fh:
        if header:
            fh.write(",".join(f"x{j}" for j in range(X.shape[1])) + ",label\n")
        for row, label in zip(X.tolist(), y.tolist()):
            fh.write(",".join(map(repr, row)) + f",{label!r}\n")
    return path


def write_parquet(path, X, y):
    table = pa.table({**{f"x{j}": X[:, j] for j in range(X.shape[1])}, "label": y})
    pq.write_table(table, path)
    return path


def stored_order(n, validation_split, seed):
    """Source rows in the contract's stored order: the training split cut by
    core.shards' permutation, then the validation split as split_rows gives it."""
    train, val = split_rows(n, validation_split, seed)
    (order,) = shard_rows(len(train), 1, seed)
    return train[order], val


def read_all(p):
    return p.read_train(0, p.n_train), p.read_val(0, p.n_val)


def test_csv_round_trip_matches_the_in_memory_loader(tmp_path):
    X, y = make_data()
    csv = write_csv(tmp_path / "d.csv", X, y)
    p = prepare(csv, tmp_path / "out", validation_split=0.25, seed=3, dtype="float64", block_rows=37)
    RX, Ry, classes = load_arrays(DataSpec(source=str(csv)), seed=3)
    train, val = stored_order(len(RX), 0.25, 3)
    (Xt, yt), (Xv, yv) = read_all(p)
    np.testing.assert_array_equal(Xt, RX[train])
    np.testing.assert_array_equal(yt, Ry[train])
    np.testing.assert_array_equal(Xv, RX[val])
    np.testing.assert_array_equal(yv, Ry[val])
    assert (p.n_classes, p.n_features, p.n_train, p.n_val) == (classes, 5, 375, 125)
    assert yt.dtype == np.int64 and Xt.dtype == np.float64
    assert len(p.manifest["files"]) == 2 * (math.ceil(375 / 37) + math.ceil(125 / 37))
    # numpy's own float64 mean and std of the stored training rows, to the bit
    expected_scale = RX[train].std(axis=0)
    expected_scale[expected_scale == 0] = 1.0
    assert p.mean.tobytes() == RX[train].mean(axis=0).tobytes()
    assert p.scale.tobytes() == expected_scale.tobytes()
    assert p.scale[2] == 1.0 and p.mean[2] == 7.0
    # and numpy's sum is the row-after-row order the contract fixes
    total = np.zeros(5)
    for row in RX[train]:
        total = total + row
    assert (total / len(train)).tobytes() == p.mean.tobytes()


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_each_shard_is_one_contiguous_range_of_stored_rows(tmp_path, shards):
    X, y = make_data(n=200)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    p = prepare(tmp_path / "d.npz", tmp_path / "out", validation_split=0.2, seed=5, dtype="float64",
                block_rows=16)
    train, _ = split_rows(200, 0.2, 5)
    ranges = np.array_split(np.arange(p.n_train), shards)
    for s, rows in enumerate(shard_rows(len(train), shards, seed=5)):
        start, stop = int(ranges[s][0]), int(ranges[s][-1]) + 1
        Xs, ys = p.read_train(start, stop)
        np.testing.assert_array_equal(Xs, X[train[rows]])
        np.testing.assert_array_equal(ys, y[train[rows]])
        assert p.train_block_range(start, stop) == list(range(start // 16, (stop - 1) // 16 + 1))


def test_float32_stores_the_source_values_rounded_and_stats_of_float64(tmp_path):
    X, y = make_data(n=120)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    p = prepare(tmp_path / "d.npz", tmp_path / "out", seed=1)
    train, val = stored_order(120, 0.2, 1)
    (Xt, _), (Xv, _) = read_all(p)
    assert Xt.dtype == np.float32
    np.testing.assert_array_equal(Xt, X[train].astype(np.float32))
    np.testing.assert_array_equal(Xv, X[val].astype(np.float32))
    assert p.mean.tobytes() == X[train].mean(axis=0).tobytes()


@pytest.mark.parametrize("dtype, rounded", [("float64", False), ("float32", False), ("float32", True)])
def test_statistics_are_numpys_however_the_training_rows_are_read_again(tmp_path, dtype, rounded):
    # the squares pass reads float64 blocks back, float32 blocks that hold the
    # values exactly (rounded source), or a float64 work file (float32 blocks
    # that do not)
    X, y = make_data(n=230, f=4)
    if rounded:
        X = X.astype(np.float32).astype(np.float64)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    p = prepare(tmp_path / "d.npz", tmp_path / "out", seed=3, dtype=dtype, block_rows=40)
    train, _ = stored_order(230, 0.2, 3)
    scale = X[train].std(axis=0)
    scale[scale == 0] = 1.0
    assert p.mean.tobytes() == X[train].mean(axis=0).tobytes()
    assert p.scale.tobytes() == scale.tobytes()
    np.testing.assert_array_equal(p.read_train(0, p.n_train)[0], X[train].astype(dtype))


def test_preparing_twice_gives_the_same_manifest_bytes(tmp_path):
    X, y = make_data(n=300)
    csv = write_csv(tmp_path / "d.csv", X, y)
    prepare(csv, tmp_path / "a", seed=2, block_rows=50)
    prepare(csv, tmp_path / "b", seed=2, block_rows=50)
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert PreparedSet.open(tmp_path / "a").manifest_sha256 == \
        hashlib.sha256((tmp_path / "b/manifest.json").read_bytes()).hexdigest()
    assert not any(name.name.startswith("a.tmp-") for name in tmp_path.iterdir())


def test_csv_parquet_folder_and_npz_give_identical_blocks_and_statistics(tmp_path):
    X, y = make_data(n=400)
    sources = {
        "csv": write_csv(tmp_path / "d.csv", X, y),
        "parquet": write_parquet(tmp_path / "d.parquet", X, y),
        "npz": tmp_path / "d.npz",
    }
    np.savez(sources["npz"], X=X, y=y)
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", X[:150], y[:150])
    write_parquet(folder / "part-1.parquet", X[150:], y[150:])
    sources["folder"] = folder
    manifests = {}
    for name, src in sources.items():
        manifests[name] = prepare(src, tmp_path / f"out-{name}", seed=9, block_rows=64).manifest
    ref = manifests["csv"]
    for name, m in manifests.items():
        assert m["files"] == ref["files"], name
        assert m["standardization"] == ref["standardization"], name
        assert (m["task"], m["classes"]) == ("classification", 4)
    assert len({m["source"]["sha256"] for m in manifests.values()}) == 4
    assert manifests["csv"]["source"]["sha256"] == hashlib.sha256(sources["csv"].read_bytes()).hexdigest()


def test_regression_targets_from_npz_and_from_non_integral_csv_labels(tmp_path):
    X, _ = make_data(n=100)
    Y = X @ np.arange(10.0).reshape(5, 2)
    np.savez(tmp_path / "r.npz", X=X, y=Y)
    p = prepare(tmp_path / "r.npz", tmp_path / "out", seed=0, dtype="float64")
    train, _ = stored_order(100, 0.2, 0)
    assert (p.n_classes, p.n_targets, p.manifest["task"]) == (None, 2, "regression")
    np.testing.assert_array_equal(p.read_train(0, p.n_train)[1], Y[train])
    csv = write_csv(tmp_path / "r.csv", X, Y[:, 0] + 0.5)
    q = prepare(csv, tmp_path / "out2", seed=0)
    assert (q.n_classes, q.n_targets) == (None, 1)
    np.testing.assert_array_equal(q.read_train(0, q.n_train)[1][:, 0], Y[train, 0] + 0.5)


def test_builtin_and_synthetic_sets_match_the_loader(tmp_path):
    p = prepare("iris", tmp_path / "iris", seed=4, dtype="float64")
    X, y, _ = load_arrays(DataSpec(source="iris"), seed=4)
    train, val = stored_order(150, 0.2, 4)
    np.testing.assert_array_equal(p.read_train(0, p.n_train)[0], X[train])
    np.testing.assert_array_equal(p.read_val(0, p.n_val)[1], y[val])
    s = prepare(DataSpec(source="synthetic", samples=300, features=4, classes=3), tmp_path / "syn", seed=2)
    Xs, ys, _ = load_arrays(DataSpec(source="synthetic", samples=300, features=4, classes=3), seed=2)
    train, _ = stored_order(300, 0.2, 2)
    np.testing.assert_array_equal(s.read_train(0, s.n_train)[1], ys[train])


def test_a_csv_larger_than_the_read_block_streams_in_many_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(core.prepare_csv, "CSV_BLOCK_BYTES", 32 << 10)
    X, y = make_data(n=3000, f=8)
    csv = write_csv(tmp_path / "d.csv", X, y)
    seen = []
    p = prepare(csv, tmp_path / "out", seed=0, dtype="float64", block_rows=100, progress=seen.append)
    reads = [e for e in seen if e.stage == "read"]
    assert os.path.getsize(csv) > 10 * (32 << 10) and len(reads) >= 10
    assert len(p.manifest["files"]) == 2 * (math.ceil(2400 / 100) + math.ceil(600 / 100))
    train, val = stored_order(3000, 0.2, 0)
    np.testing.assert_array_equal(p.read_train(0, p.n_train)[0], X[train])
    np.testing.assert_array_equal(p.read_val(0, p.n_val)[0], X[val])
    # the default block holds about 16 MiB of features, whatever the row count
    q = prepare(csv, tmp_path / "default", seed=0)
    assert q.block_rows == (16 << 20) // (8 * 4) and len(q.manifest["files"]) == 4


def test_cells_float_reads_but_pyarrow_does_not_are_read_as_float_reads_them(tmp_path, monkeypatch):
    """Padded numbers fail pyarrow's conversion; from that batch on the rows are
    read again as text: the result equals the plain file's, rows neither lost
    nor doubled, and the source hash is still of every byte."""
    monkeypatch.setattr(core.prepare_csv, "CSV_BLOCK_BYTES", 8 << 10)
    X, y = make_data(n=1500, f=3)
    plain = write_csv(tmp_path / "plain.csv", X, y)
    lines = plain.read_text().splitlines()
    lines[1200] = " " + lines[1200].replace(",", " , ")  # data row 1200, after several read blocks
    padded = tmp_path / "padded.csv"
    padded.write_text("\n".join(lines) + "\n")
    a = prepare(plain, tmp_path / "a", seed=1, block_rows=100)
    b = prepare(padded, tmp_path / "b", seed=1, block_rows=100)
    assert a.manifest["files"] == b.manifest["files"]
    assert b.manifest["source"]["sha256"] == hashlib.sha256(padded.read_bytes()).hexdigest()
    lines[1400] = lines[1400].replace(",", ",x" + SECRET, 1)
    padded.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"padded.csv: row 1400, column 'x1': not a number") as err:
        prepare(padded, tmp_path / "c", seed=1)
    assert SECRET not in str(err.value)
    lines[1400] = lines[1400] + ",5"
    padded.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"padded.csv: row 1400 has 5 columns, expected 4"):
        prepare(padded, tmp_path / "c", seed=1)


# ----------------------------------------------------------------- refusals

HEAD = "a,b,label\n"


@pytest.mark.parametrize("text, label_column, expected", [
    (HEAD + "1,2,0\n3,4,1\n5," + SECRET + ",1\n", None, "row 3, column 'b': not a number"),
    (HEAD + "1,2,0\n3,,1\n", None, "row 2, column 'b': empty"),
    (HEAD + "1,2,0\nnan,4,1\n", None, "row 2, column 'a': NaN or infinite value"),
    (HEAD + "1,2,0\n3,-inf,1\n", None, "row 2, column 'b': NaN or infinite value"),
    (HEAD + "1,2,0\n3,4,inf\n", None, "row 2, column 'label': NaN or infinite value"),
    (HEAD + "1,2,0\n3,4,1\n5,6,1," + SECRET + "\n7,8,0\n", None, "row 3 has 4 columns, expected 3"),
    (HEAD + "1,2,0\n3,4,1\n", "nope", "'nope' is not a column"),
    (HEAD + "1,2,0\n3,4,-1\n", None, "class labels must be >= 0"),
    (HEAD + "1,2,0\n3,4,0\n", None, "at least 2 classes"),
    ("", None, "the file is empty"),
    ("\n\n", None, "the file is empty"),
    (HEAD, None, "has a header but no data rows"),
    ("1,2\n3\n", None, "row 2 has 1 columns, expected 2"),
    ("1,0\n" + "2,1\n" * 5 + SECRET + ",1\n", None, "row 7, column 1: not a number"),
    ("a,label\n" + "0.5,1\n" * 3 + b"\xff\xfe".decode("latin-1") + ",1\n", None, "not UTF-8"),
])
def test_a_bad_csv_is_refused_naming_file_row_and_column(tmp_path, text, label_column, expected):
    path = tmp_path / "bad.csv"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(DataError) as err:
        prepare(path, tmp_path / "out", label_column=label_column)
    message = str(err.value)
    assert str(path) in message and expected in message, message
    assert SECRET not in message
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.csv"]


def test_bad_parquet_and_npz_sources_are_refused(tmp_path):
    pq.write_table(pa.table({"a": [1.0, None, 3.0], "label": [0, 1, 0]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet: row 2, column 'a': empty \(null\)"):
        prepare(tmp_path / "n.parquet", tmp_path / "o")
    pq.write_table(pa.table({"a": ["x", "y"], "label": [0, 1]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s.parquet: column 'a' has type string, not numbers"):
        prepare(tmp_path / "s.parquet", tmp_path / "o")
    X = np.ones((4, 2))
    X[3, 1] = np.inf
    np.savez(tmp_path / "i.npz", X=X, y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"i.npz: row 4, column 2: NaN or infinite value"):
        prepare(tmp_path / "i.npz", tmp_path / "o")
    np.savez(tmp_path / "obj.npz", X=np.array([[1, 2]], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="pickled objects"):
        prepare(tmp_path / "obj.npz", tmp_path / "o")
    with pytest.raises(DataError, match="label column 'z' is not a column"):
        prepare(tmp_path / "n.parquet", tmp_path / "o", label_column="z")
    with pytest.raises(DataError, match="applies to CSV and Parquet sources only"):
        prepare(tmp_path / "i.npz", tmp_path / "o", label_column=0)
    assert not (tmp_path / "o").exists()


def test_an_existing_out_is_never_replaced(tmp_path):
    X, y = make_data(n=50)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists"):
        prepare(tmp_path / "d.npz", tmp_path / "out")


# --------------------------------------------------- files against the manifest


@pytest.fixture
def prepared(tmp_path):
    X, y = make_data(n=200)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    return prepare(tmp_path / "d.npz", tmp_path / "set", block_rows=32), tmp_path / "set"


def test_an_intact_set_verifies_and_reads(prepared):
    p, root = prepared
    p.verify()
    first = p.read_train(0, 10)[0]
    assert p.read_train(0, 10)[0].base is first.base  # the block stays mapped between reads
    again = PreparedSet.open(root)
    again.verify_train(0, again.n_train)
    assert again.manifest == p.manifest


@pytest.mark.parametrize("damage, expected", [
    (lambda f: f.unlink(), "missing"),
    (lambda f: f.write_bytes(f.read_bytes()[:-10]), "truncated"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0"), "altered"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])), "altered"),
])
def test_a_damaged_block_is_found_naming_the_file(prepared, damage, expected):
    p, root = prepared
    damage(root / "train/X-00002.npy")
    p.verify_train(0, 64)  # blocks 0 and 1: untouched
    with pytest.raises(DataError, match=rf"train/X-00002.npy: {expected}"):
        p.verify_train(60, 70)
    with pytest.raises(DataError, match=r"train/X-00002.npy: (missing|truncated|altered)"):
        PreparedSet.open(root).verify()
    if expected != "altered":
        with pytest.raises(DataError, match=r"train/X-00002.npy"):
            p.read_train(64, 70)


def test_a_header_rewritten_to_another_shape_is_refused_on_read(prepared):
    p, root = prepared
    path = root / "val/y-00000.npy"
    np.save(path, np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match=r"val/y-00000.npy: holds shape \(3,\)"):
        p.read_val(0, 5)
    with pytest.raises(DataError, match=r"val/y-00000.npy: (truncated|altered)"):
        p.verify_val(0, 5)


def edit_manifest(root, change):
    m = json.loads((root / "manifest.json").read_text())
    change(m)
    (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["files"].pop(), "is not listed"),
    (lambda m: m.update(block_rows=64), "does not match the rows and block_rows"),
    (lambda m: m["rows"].update(train=161), "does not match the rows and block_rows"),
    (lambda m: m["files"].append({**m["files"][0], "path": "../../etc/passwd"}), "not a block of this set"),
    (lambda m: m.update(features=4), "standardization.mean"),
    (lambda m: m.update(format="other"), "field 'format'"),
    (lambda m: m.pop("task"), "field 'task'"),
    (lambda m: m["standardization"].update(scale=[0.0] * 5), "must be positive"),
])
def test_a_manifest_that_does_not_match_its_files_is_refused(prepared, change, expected):
    _, root = prepared
    edit_manifest(root, change)
    with pytest.raises(DataError, match="manifest.json") as err:
        PreparedSet.open(root)
    assert expected in str(err.value)


def test_a_manifest_whose_sizes_or_hashes_differ_from_the_files_fails_verification(prepared):
    _, root = prepared
    edit_manifest(root, lambda m: m["files"][0].update(bytes=m["files"][0]["bytes"] + 1))
    with pytest.raises(DataError, match=r"train/X-00000.npy: truncated"):
        PreparedSet.open(root).verify_train(0, 1)
    edit_manifest(root, lambda m: m["files"][0].update(bytes=m["files"][0]["bytes"] - 1, sha256="0" * 64))
    with pytest.raises(DataError, match=r"train/X-00000.npy: altered"):
        PreparedSet.open(root).verify_train(0, 1)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        PreparedSet.open(root)
    (root / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json: missing"):
        PreparedSet.open(root)


# ------------------------------------------------------------ from S3 (moto)


def test_a_set_on_s3_reads_and_verifies_as_the_local_copy(prepared, s3_server, tmp_path):
    from core.prepared import s3_filesystem

    local, root = prepared
    fs = s3_filesystem(allow_bucket_creation=True)
    upload(fs, root, "bucket/sets/d")
    remote = PreparedSet.open("s3://bucket/sets/d")
    assert remote.manifest_sha256 == local.manifest_sha256
    remote.verify()
    for a, b in ((0, local.n_train), (31, 97)):
        for got, want in zip(remote.read_train(a, b), local.read_train(a, b)):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(remote.read_val(0, local.n_val)[1], local.read_val(0, local.n_val)[1])
    assert (tmp_path / "cache/prepared" / local.manifest_sha256 / "train/X-00000.npy").is_file()
    # a damaged or missing object is named by its s3:// address (a fresh cache: nothing fetched yet)
    with fs.open_output_stream("bucket/sets/d/train/X-00001.npy") as out:
        out.write((root / "train/X-00001.npy").read_bytes()[:-4])
    fs.delete_file("bucket/sets/d/train/y-00002.npy")
    os.environ["SHARDPROP_CACHE"] = str(tmp_path / "cache2")
    fresh = PreparedSet.open("s3://bucket/sets/d")
    with pytest.raises(DataError, match=r"s3://bucket/sets/d/train/X-00001.npy: truncated"):
        fresh.verify_train(32, 40)
    with pytest.raises(DataError, match=r"s3://bucket/sets/d/train/y-00002.npy: missing"):
        fresh.verify_train(64, 70)
    with pytest.raises(DataError, match=r"s3://bucket/nothing/manifest.json: missing"):
        PreparedSet.open("s3://bucket/nothing")


def test_blank_lines_and_lines_of_spaces_are_not_rows(tmp_path):
    X, y = make_data(n=40, f=3)
    plain = write_csv(tmp_path / "plain.csv", X, y)
    lines = plain.read_text().splitlines()
    lines[10:10] = ["", "   ", " , ,  "]
    lines.insert(0, "")
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("\n".join(lines) + "\n")
    a = prepare(plain, tmp_path / "a", seed=0, block_rows=8)
    b = prepare(spaced, tmp_path / "b", seed=0, block_rows=8)
    assert a.manifest["files"] == b.manifest["files"] and b.n_train + b.n_val == 40


def test_where_rows_go_is_computed_in_chunks_without_changing_it(tmp_path, monkeypatch):
    import core.prepare_writer

    X, y = make_data(n=103, f=3)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    whole = prepare(tmp_path / "d.npz", tmp_path / "a", dtype="float64", block_rows=10, validation_split=0.3)
    monkeypatch.setattr(core.prepare_writer, "INDEX_CHUNK", 7)
    monkeypatch.setattr(core.prepare_writer, "ROUTE_BYTES", 5 * 4 * 8)  # pass 2 reads 5 rows at a time
    chunked = prepare(tmp_path / "d.npz", tmp_path / "b", dtype="float64", block_rows=10, validation_split=0.3)
    assert whole.manifest["files"] == chunked.manifest["files"]
    train, val = stored_order(103, 0.3, 0)
    np.testing.assert_array_equal(chunked.read_train(0, chunked.n_train)[0], X[train])
    np.testing.assert_array_equal(chunked.read_val(0, chunked.n_val)[0], X[val])
