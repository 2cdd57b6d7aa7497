"""Training from a prepared data set (docs/data.md): each worker reads only
its own shards, evaluation is data-parallel, and the weights and validation
figures are the reference trainer's bits, which are also those of the same
rows trained from the raw CSV in memory. A damaged file fails the job naming
it, never retried as a worker fault."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import yaml

from core.datafiles import DataError
from core.mlp import MLP
from core.prepared import prepare
from core.trainer import DataFault, train
from service.cli import main
from workers.coordinator import Coordinator, JobCancelled
from run_helpers import by_kind

SEED = 3
ROWS, FEATURES = 9000, 4  # 0.5 of the rows held out: two evaluation blocks of 4096 rows and a part
SHARDS = 4


def job(source, workers=2, steps=10, **training) -> dict:
    return {
        "name": "prepared", "seed": SEED,
        "data": {"source": str(source), "shards": SHARDS, "validation_split": 0.5},
        "model": {"hidden": [6], "activation": "tanh"},
        "training": {"batch_size": 64, "steps": steps, "eval_every": 5, "checkpoint_every": 4,
                     "optimizer": {"name": "adam", "lr": 0.01}, **training},
        "resources": {"workers": workers},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CSV of values float32 holds exactly (so a float32 prepared set keeps
    every source value), and the same rows prepared with small blocks: every
    shard spans several block files."""
    root = tmp_path_factory.mktemp("prepared-training")
    rng = np.random.default_rng(0)
    X = rng.integers(-64, 64, size=(ROWS, FEATURES)) / 8.0
    y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 2).astype(int)
    csv = root / "rows.csv"
    lines = ["a,b,c,d,label"] + [",".join(f"{v:g}" for v in row) + f",{label}" for row, label in zip(X, y)]
    csv.write_text("\n".join(lines) + "\n")
    prepared = root / "rows"
    prepare(csv, prepared, validation_split=0.5, seed=SEED, block_rows=700)
    reference, history = train(job(prepared))
    return {"csv": csv, "prepared": prepared, "reference": reference, "history": history}


def write_job(tmp_path, raw: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def val_figures(history):
    return [(r["step"], r["val_loss"], r["val_accuracy"]) for r in history if r["val_loss"] is not None]


def test_the_reference_on_a_prepared_set_is_the_reference_on_its_raw_csv(data):
    from_csv, csv_history = train(job(data["csv"]))
    assert np.array_equal(from_csv.params, data["reference"].params)
    assert val_figures(csv_history) == val_figures(data["history"])
    assert len(val_figures(csv_history)) == 2
    # another job seed (initialization, batch order) over the same split: still the same bits both ways
    reseeded = {**job(data["prepared"]), "seed": 11}
    reseeded["data"] = {**reseeded["data"], "split_seed": SEED}
    prepared_params = train(reseeded)[0].params
    assert not np.array_equal(prepared_params, data["reference"].params)
    assert np.array_equal(train({**reseeded, "data": {**reseeded["data"], "source": str(data["csv"])}})[0].params,
                          prepared_params)


@pytest.mark.ray
def test_any_worker_count_on_the_cluster_gives_the_reference_bits(ray_local, data, tmp_path):
    path = write_job(tmp_path, job(data["prepared"]))
    for workers in (1, SHARDS):
        out = tmp_path / f"w{workers}.npz"
        assert main(["train", str(path), "--address", ray_local, "--workers", str(workers), "--out", str(out),
                     "--checkpoint-dir", str(tmp_path / f"w{workers}")]) == 0
        assert np.array_equal(MLP.load(out).params, data["reference"].params), workers
    history = []
    coordinator = Coordinator(job(data["prepared"]), tmp_path / "w2", on_step=history.append)
    net = coordinator.run()
    assert np.array_equal(net.params, data["reference"].params)
    assert val_figures(history) == val_figures(data["history"])  # evaluated by the workers, block by block
    assert len(coordinator.counters.nodes) >= 2


@pytest.mark.ray
@pytest.mark.chaos
def test_a_killed_worker_and_a_resume_keep_the_bits(ray_cluster, data, tmp_path):
    """The killed worker's shards move to a new worker, which reads them
    itself; then a run stopped at a checkpoint resumes to the same bits."""
    def kill_worker_1(record):
        if record["step"] == 3:
            os.kill(coordinator.worker_locations[1]["pid"], signal.SIGKILL)

    coordinator = Coordinator(job(data["prepared"], workers=3), tmp_path / "kill", on_step=kill_worker_1)
    assert np.array_equal(coordinator.run().params, data["reference"].params)
    assert coordinator.counters.worker_failures == 1 and coordinator.counters.recoveries == 1

    def stop_at_8(kind, detail):
        if kind == "checkpoint" and detail["step"] == 8:
            stopping.cancel()

    stopping = Coordinator(job(data["prepared"]), tmp_path / "resume", on_event=by_kind(stop_at_8))
    with pytest.raises(JobCancelled):
        stopping.run()
    resumed = Coordinator(job(data["prepared"], workers=3), tmp_path / "resume").run(resume=True)
    assert np.array_equal(resumed.params, data["reference"].params)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def alter(path):
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))


def another_hash(root, path):
    manifest = json.loads((root / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == path.relative_to(root).as_posix())
    entry["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))


DAMAGES = {
    "truncated": (lambda root, path: truncate(path), "train/X-00003.npy", "truncated"),
    "altered": (lambda root, path: alter(path), "train/y-00004.npy", "altered"),
    "missing": (lambda root, path: path.unlink(), "train/X-00000.npy", "missing"),
    "manifest": (another_hash, "train/X-00005.npy", "SHA-256 differs"),
    "validation": (lambda root, path: alter(path), "val/X-00006.npy", "altered"),
}


@pytest.fixture
def damaged(data, tmp_path, request):
    damage, name, message = DAMAGES[request.param]
    root = tmp_path / "damaged"
    shutil.copytree(data["prepared"], root)
    damage(root, root / name)
    return root, str(root / name), message


@pytest.mark.parametrize("damaged", list(DAMAGES), indirect=True)
def test_the_reference_trainer_refuses_a_damaged_file_naming_it(damaged):
    root, name, message = damaged
    with pytest.raises(DataError, match=message) as failed:
        train(job(root))
    assert name in str(failed.value)


@pytest.mark.ray
@pytest.mark.parametrize("damaged", ["altered", "validation"], indirect=True)
def test_a_damaged_file_fails_the_job_naming_it_and_is_not_retried(ray_cluster, damaged, tmp_path):
    """A training file is found when its owner checks its shards, a
    validation file when a worker evaluates its block."""
    root, name, message = damaged
    coordinator = Coordinator(job(root), tmp_path / "run")
    with pytest.raises(DataFault) as failed:
        coordinator.run()
    assert name in str(failed.value) and message in str(failed.value)
    assert coordinator.counters.worker_failures == 0 and coordinator.counters.recoveries == 0


@pytest.mark.ray
@pytest.mark.parametrize("damaged", ["truncated"], indirect=True)
def test_shardprop_train_exits_non_zero_naming_the_damaged_file(ray_local, damaged, tmp_path, capsys):
    root, name, message = damaged
    path = write_job(tmp_path, job(root))
    assert main(["train", str(path), "--address", ray_local, "--checkpoint-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert name in err and message in err and "Traceback" not in err


@pytest.mark.ray
def test_a_manifest_that_lists_other_files_is_refused_before_any_worker_starts(ray_cluster, data, tmp_path):
    root = tmp_path / "edited"
    shutil.copytree(data["prepared"], root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["rows"]["train"] += 700  # one block more than its files
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest.json"):
        Coordinator(job(root), tmp_path / "run").run()
    with pytest.raises(DataError, match="manifest.json"):
        train(job(root))
