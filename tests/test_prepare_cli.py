"""`shardprop data prepare` as a user runs it: a real process, its exit code,
its progress lines and its errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from core.data import load_arrays, split_rows
from core.prepared import PreparedSet
from core.shards import shard_rows
from core.spec import DataSpec

ROOT = Path(__file__).resolve().parents[1]


def shardprop(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_prepare_a_csv_with_a_named_label_column(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 3))
    y = rng.integers(0, 3, 400)
    lines = ["label,a,b,c"] + [f"{lab}," + ",".join(map(repr, row)) for lab, row in zip(y.tolist(), X.tolist())]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    run = shardprop("data", "prepare", "d.csv", "out", "--label-column", "label", "--validation-split", "0.1",
                    "--seed", "7", "--dtype", "float64", "--block-rows", "100", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "prepared out: 360 training and 40 validation rows, 3 features, 3 classes" in run.stdout
    assert "read 400 rows" in run.stderr and "done: 400 rows" in run.stderr  # plain lines: not a terminal
    assert "\r" not in run.stderr
    p = PreparedSet.open(tmp_path / "out")
    p.verify()
    RX, Ry, _ = load_arrays(DataSpec(source=str(tmp_path / "d.csv"), label_column="label"), seed=7)
    train, _ = split_rows(400, 0.1, 7)
    (order,) = shard_rows(len(train), 1, 7)
    np.testing.assert_array_equal(p.read_train(0, 360)[0], RX[train[order]])
    np.testing.assert_array_equal(p.read_train(0, 360)[1], Ry[train[order]])
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert (m["label_column"], m["split"], m["block_rows"]) == ("label", {"seed": 7, "validation_split": 0.1}, 100)


def test_a_label_column_given_by_index(tmp_path):
    (tmp_path / "d.csv").write_text("".join(f"{i % 2},{i}.5\n" for i in range(20)))
    run = shardprop("data", "prepare", "d.csv", "out", "--label-column", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    p = PreparedSet.open(tmp_path / "out")
    assert (p.n_classes, p.n_features, p.manifest["label_column"]) == (2, 1, 0)


def test_a_bad_source_exits_1_naming_file_and_row(tmp_path):
    (tmp_path / "bad.csv").write_text("a,label\n1,0\n2,1\nsecret-cell,0\n")
    run = shardprop("data", "prepare", "bad.csv", "out", cwd=tmp_path)
    assert run.returncode == 1
    assert "shardprop data prepare: error: bad.csv: row 3, column 'a': not a number" in run.stderr
    assert "secret-cell" not in run.stderr + run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_an_existing_out_and_a_missing_source_exit_1(tmp_path):
    (tmp_path / "out").mkdir()
    run = shardprop("data", "prepare", "iris", "out", cwd=tmp_path)
    assert run.returncode == 1 and "out: already exists" in run.stderr
    run = shardprop("data", "prepare", "nothing.csv", "new", cwd=tmp_path)
    assert run.returncode == 1 and "nothing.csv: no such file or folder" in run.stderr


def test_a_builtin_set(tmp_path):
    run = shardprop("data", "prepare", "digits", "digits", "--seed", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    p = PreparedSet.open(tmp_path / "digits")
    assert (p.n_train + p.n_val, p.n_features, p.n_classes) == (1797, 64, 10)


def test_verify_passes_an_intact_set_and_names_an_altered_file(tmp_path):
    assert shardprop("data", "prepare", "wine", "wine", "--block-rows", "50", cwd=tmp_path).returncode == 0
    run = shardprop("data", "verify", "wine", cwd=tmp_path)
    assert run.returncode == 0 and "wine: 8 files match the manifest" in run.stdout, run.stderr
    block = tmp_path / "wine/train/X-00001.npy"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF
    block.write_bytes(bytes(data))
    run = shardprop("data", "verify", "wine", cwd=tmp_path)
    assert run.returncode == 1
    assert "shardprop data verify: error: wine/train/X-00001.npy: altered" in run.stderr


def test_a_folder_it_cannot_write_in_exits_1(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    run = shardprop("data", "prepare", "iris", tmp_path / "file.txt/out", cwd=tmp_path)
    assert run.returncode == 1 and "no such folder to prepare into" in run.stderr
    run = shardprop("data", "prepare", "iris", "/proc/shardprop-out", cwd=tmp_path)  # even root cannot
    assert run.returncode == 1 and "cannot write /proc/shardprop-out" in run.stderr
    assert "Traceback" not in run.stderr
