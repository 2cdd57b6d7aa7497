"""Where a job's rows come from (core/data_source.py): a prepared directory,
s3:// on a real S3-compatible server, a small raw file in memory, a large raw
file prepared once into the cache and reused; split settings that contradict
a manifest refused naming both values."""

import os
import threading

import numpy as np
import pytest

import core.prepare_writer
from core.data import load_dataset, split_rows
from core.data_source import SplitMismatch, cache_dir, resolve
from core.datafiles import DataLimits
from core.prepared import PreparedSet, prepare, s3_filesystem
from core.spec import parse_spec
from tests.s3_helpers import s3_server, upload  # noqa: F401  (a fixture)
from tests.test_prepared import make_data, write_csv


def job(source, **data):
    return parse_spec({"seed": data.pop("seed", 0), "data": {"source": source, **data},
                       "training": {"steps": 1, "batch_size": 8}, "resources": {"workers": 1}})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDPROP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def data_csv(tmp_path):
    X, y = make_data(n=300)
    return write_csv(tmp_path / "d.csv", X, y)


def test_a_prepared_directory_resolves_to_its_set(tmp_path, data_csv, cache):
    made = prepare(data_csv, tmp_path / "set", seed=3, validation_split=0.25)
    got = resolve(job(str(tmp_path / "set"), seed=3, validation_split=0.25).data)
    assert isinstance(got, PreparedSet) and got.manifest_sha256 == made.manifest_sha256
    # confined to the data roots like any path
    assert resolve(job("set", seed=3, validation_split=0.25).data, data_roots=[tmp_path]).manifest == made.manifest


def test_small_raw_and_builtin_sources_stay_in_memory(data_csv, cache):
    assert resolve(job(str(data_csv)).data) is None
    assert resolve(job("digits").data) is None
    assert not cache.exists()  # nothing prepared


def test_a_set_on_s3_resolves_to_the_same_rows_as_the_local_copy(tmp_path, data_csv, s3_server):
    local = prepare(data_csv, tmp_path / "set", block_rows=64)
    upload(s3_filesystem(allow_bucket_creation=True), tmp_path / "set", "bucket/sets/d")
    remote = resolve(job("s3://bucket/sets/d").data)
    assert remote.manifest_sha256 == local.manifest_sha256
    for got, want in zip(remote.read_train(0, remote.n_train), local.read_train(0, local.n_train)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("data, dtype, named", [
    ({"seed": 4}, "float32", ["data.split_seed is 4 in the spec, 3 in its manifest"]),
    ({"seed": 3, "validation_split": 0.1}, "float32",
     ["data.validation_split is 0.1 in the spec, 0.25 in its manifest"]),
    ({"split_seed": 0, "label_column": "x1", "validation_split": 0.25}, "float32",
     ["data.split_seed is 0 in the spec, 3", "data.label_column is 'x1' in the spec, 'label' in its manifest"]),
    ({"seed": 3, "validation_split": 0.25}, "float64", ["training.dtype is 'float64' in the spec"]),
])
def test_split_settings_that_contradict_the_manifest_are_refused_naming_both(tmp_path, data_csv, cache,
                                                                           data, dtype, named):
    prepare(data_csv, tmp_path / "set", seed=3, validation_split=0.25)
    with pytest.raises(SplitMismatch) as err:
        resolve(job(str(tmp_path / "set"), **data).data, dtype=dtype)
    for text in named:
        assert text in str(err.value)


def test_split_seed_defaults_to_seed_and_an_explicit_one_lets_seed_vary(tmp_path, data_csv, cache):
    assert job("digits", seed=7).data.split_seed == 7
    assert job("digits", seed=7, split_seed=2).data.split_seed == 2
    prepare(data_csv, tmp_path / "set", seed=3)
    # another job seed over the same prepared set: accepted with split_seed given
    assert resolve(job(str(tmp_path / "set"), seed=9, split_seed=3).data).split_seed == 3


def test_split_seed_not_seed_decides_the_split_of_an_in_memory_source(data_csv):
    """Validation rows of the CSV loaded in memory, against split_rows itself."""
    X = np.loadtxt(data_csv, delimiter=",", skiprows=1)[:, :-1]

    def val_rows(**data):
        ds = load_dataset(job(str(data_csv), standardize=False, **data).data, data.get("seed", 0), "float64")
        return ds.X_val

    _, val1 = split_rows(len(X), 0.2, 1)
    np.testing.assert_array_equal(val_rows(seed=1), X[val1])  # the default: the job's seed
    np.testing.assert_array_equal(val_rows(seed=5, split_seed=1), X[val1])  # seed alone changes nothing
    _, val2 = split_rows(len(X), 0.2, 2)
    np.testing.assert_array_equal(val_rows(seed=1, split_seed=2), X[val2])
    assert not np.array_equal(val1, val2)


def test_a_large_raw_source_is_prepared_once_and_reused(tmp_path, data_csv, cache, monkeypatch):
    calls = []
    real = core.prepare_writer.prepare
    monkeypatch.setattr(core.prepare_writer, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    limits = DataLimits(prepare_above_bytes=1000)  # the CSV is larger
    statuses = []
    first = resolve(job(str(data_csv), seed=2).data, limits=limits, on_status=statuses.append)
    assert len(calls) == 1
    assert statuses[0] == "preparing data: hashing the source"
    assert any(s.startswith("preparing data: reading (") for s in statuses)
    assert any(s.startswith("preparing data: writing blocks (") for s in statuses)
    # what it holds is the source prepared by hand with the same split
    by_hand = prepare(data_csv, tmp_path / "by-hand", seed=2)
    assert first.manifest == by_hand.manifest
    manifest = cache_dir() / first.manifest_sha256  # not keyed by it: keyed by source and split
    assert not manifest.exists()
    (stored,) = [p for p in cache_dir().iterdir() if p.is_dir() and p.name != "hashes"]
    inode = os.stat(stored / "manifest.json").st_ino
    second = resolve(job(str(data_csv), seed=2).data, limits=limits)
    assert len(calls) == 1 and second.manifest_sha256 == first.manifest_sha256
    assert os.stat(stored / "manifest.json").st_ino == inode
    # another job seed over the same split seed is the same copy; another split seed is another
    again = resolve(job(str(data_csv), seed=7, split_seed=2).data, limits=limits)
    assert len(calls) == 1 and again.manifest_sha256 == first.manifest_sha256 and again.split_seed == 2
    third = resolve(job(str(data_csv), seed=2, split_seed=5).data, limits=limits)
    assert len(calls) == 2 and third.split_seed == 5
    assert third.manifest["split"] == {"seed": 5, "validation_split": 0.2}
    assert not np.array_equal(third.read_val(0, third.n_val)[0], first.read_val(0, first.n_val)[0])
    # changed bytes are another source
    with open(data_csv, "a") as fh:
        fh.write("1,2,3,4,5,1\n")
    fourth = resolve(job(str(data_csv), seed=2).data, limits=limits)
    assert len(calls) == 3 and fourth.n_train + fourth.n_val == 301


def test_jobs_preparing_the_same_source_at_once_prepare_it_once(tmp_path, data_csv, cache, monkeypatch):
    calls, started = [], threading.Barrier(3)
    real = core.prepare_writer.prepare
    monkeypatch.setattr(core.prepare_writer, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    limits = DataLimits(prepare_above_bytes=1000)
    results = [None] * 3

    def one(i):
        started.wait()
        results[i] = resolve(job(str(data_csv)).data, limits=limits).manifest_sha256

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and None not in results
    assert not [p for p in cache_dir().iterdir() if ".tmp-" in p.name]  # nothing half-written left


def test_a_parquet_source_is_always_prepared(tmp_path, cache):
    from tests.test_prepared import write_parquet

    X, y = make_data(n=120)
    write_parquet(tmp_path / "d.parquet", X, y)
    got = resolve(job(str(tmp_path / "d.parquet")).data)
    assert got.n_train + got.n_val == 120


# ---------------------------------------------- a prepared set held in memory


def test_a_prepared_set_loads_as_the_raw_source_in_shard_order(tmp_path, data_csv, cache):
    """Stored float64 rows keep every value: the loaded training and validation
    rows are the raw CSV's split_rows rows in shard order, standardized by the
    manifest, whose statistics are the raw source's to the bit."""
    from core.data import standardize
    from core.shards import shard_order

    prepare(data_csv, tmp_path / "set", seed=4, dtype="float64", block_rows=50)
    raw = np.loadtxt(data_csv, delimiter=",", skiprows=1)
    X, y = raw[:, :-1], raw[:, -1].astype(np.int64)
    train, val = split_rows(len(X), 0.2, 4)
    train = train[shard_order(len(train), 4)]
    for spec in (job(str(tmp_path / "set"), seed=4), job(str(data_csv), seed=4)):
        got = load_dataset(spec.data, 4, "float64", limits=DataLimits(prepare_above_bytes=1000))
        m = PreparedSet.open(tmp_path / "set").manifest["standardization"]
        np.testing.assert_array_equal(got.X_train, standardize(X[train], np.array(m["mean"]), np.array(m["scale"]),
                                                                "float64"))
        np.testing.assert_array_equal(got.y_train, y[train])
        np.testing.assert_array_equal(got.X_val, standardize(X[val], np.array(m["mean"]), np.array(m["scale"]),
                                                              "float64"))
        np.testing.assert_array_equal(got.y_val, y[val])
        np.testing.assert_array_equal(got.mean, X[train].mean(axis=0))
        np.testing.assert_array_equal(got.scale, np.where(X[train].std(axis=0) == 0, 1.0, X[train].std(axis=0)))


def test_training_on_s3_gives_the_bits_of_the_local_copy(tmp_path, data_csv, s3_server):
    """The reference trainer on s3://... and on the local prepared directory."""
    from core.trainer import train

    prepare(data_csv, tmp_path / "set", seed=1, block_rows=64)
    upload(s3_filesystem(allow_bucket_creation=True), tmp_path / "set", "bucket/sets/d")

    def trained(source):
        spec = parse_spec({"seed": 1, "data": {"source": source, "shards": 3},
                           "model": {"hidden": [8]}, "training": {"steps": 6, "batch_size": 24},
                           "resources": {"workers": 1}})
        return train(spec)[0].params

    local = trained(str(tmp_path / "set"))
    np.testing.assert_array_equal(trained("s3://bucket/sets/d"), local)
    assert not np.array_equal(trained(str(data_csv)), local)  # float32 rows: rounded, so not the raw bits


def test_shardprop_train_reference_on_s3_writes_the_model_of_the_local_copy(tmp_path, data_csv, s3_server):
    import yaml

    from core.mlp import MLP
    from service.cli import main

    prepare(data_csv, tmp_path / "set", seed=0, block_rows=64)
    upload(s3_filesystem(allow_bucket_creation=True), tmp_path / "set", "bucket/sets/d")
    for name, source in (("local", str(tmp_path / "set")), ("remote", "s3://bucket/sets/d")):
        spec = {"name": name, "data": {"source": source, "shards": 2}, "model": {"hidden": [8]},
                "training": {"steps": 4, "batch_size": 16}, "resources": {"workers": 1}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        out = tmp_path / f"{name}.npz"
        assert main(["train", str(tmp_path / f"{name}.yaml"), "--reference", "--out", str(out)]) == 0
    np.testing.assert_array_equal(MLP.load(tmp_path / "remote.npz").params, MLP.load(tmp_path / "local.npz").params)


def test_a_prepared_set_costs_each_worker_its_shards_and_the_coordinator_no_rows(tmp_path, data_csv, cache):
    """By hand: 300 rows, 60 validation, 240 training in 4 shards of 60; 3
    workers hold at most 2 shards: 120 rows of 5 float32 features and an int64 label."""
    from service.admission import admit
    from service.settings import Settings

    prepare(data_csv, tmp_path / "set")
    spec = parse_spec({"data": {"source": "set", "shards": 4}, "model": {"hidden": [6]},
                       "training": {"steps": 10, "batch_size": 8}, "resources": {"workers": 3}})
    cost = admit(spec, Settings(data_roots=[tmp_path]))
    sizes, vector = [5, 6, 4], (5 * 6 + 6 + 6 * 4 + 4) * 4  # 4 classes (labels 0..3)
    assert cost.sizes == sizes and cost.train_rows == 240
    data = 120 * (5 * 4 + 8)
    evaluation = 60 * sum(sizes) * 4
    assert cost.worker_bytes == data + evaluation + vector + (vector + 2 * 2 * sum(sizes) * 4)
    assert cost.service_bytes == vector * 2  # the network and a checkpoint's parameters


def test_shardprop_train_refuses_a_contradicting_split_naming_both_values(tmp_path, data_csv, cache, capsys):
    import yaml

    from service.cli import main

    prepare(data_csv, tmp_path / "set", seed=3)
    spec = {"seed": 5, "data": {"source": str(tmp_path / "set"), "shards": 2},
            "training": {"steps": 2, "batch_size": 8}, "resources": {"workers": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "job.yaml"), "--reference", "--out", str(tmp_path / "m.npz")]) == 1
    err = capsys.readouterr().err
    assert "data.split_seed is 5 in the spec, 3 in its manifest" in err and "Traceback" not in err
    assert not (tmp_path / "m.npz").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_reading_s3_train_the_bits_of_the_local_copy(tmp_path, data_csv, s3_server):
    """`shardprop train --workers 2` on s3://... (its own Ray, whose workers
    each fetch and check only their shards from the S3 server, found through
    the environment every node is given) writes the model `--reference`
    writes from the local prepared directory."""
    import subprocess
    import sys

    import yaml

    from core.mlp import MLP

    prepare(data_csv, tmp_path / "set", seed=2, block_rows=32)
    upload(s3_filesystem(allow_bucket_creation=True), tmp_path / "set", "bucket/sets/w")
    models = {}
    for name, source, how in (("local", str(tmp_path / "set"), ["--reference"]),
                              ("remote", "s3://bucket/sets/w", ["--workers", "2"])):
        spec = {"name": name, "seed": 2, "data": {"source": source, "shards": 4}, "model": {"hidden": [8]},
                "training": {"steps": 8, "batch_size": 32, "eval_every": 4}, "resources": {"workers": 2}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        out = tmp_path / f"{name}.npz"
        done = subprocess.run([sys.executable, "-m", "service.cli", "train", str(tmp_path / f"{name}.yaml"),
                               "--out", str(out), "--checkpoint-dir", str(tmp_path / f"ck-{name}"), *how],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
        models[name] = MLP.load(out).params
    np.testing.assert_array_equal(models["remote"], models["local"])
    assert any((tmp_path / "cache").rglob("*.npy"))  # the rows came from S3, through the download cache
