"""`shardprop train`, run as a user runs it: the same bits from Ray and from
--reference, a model file, resume, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

from core.mlp import MLP
from core.trainer import train
from service.cli import main

JOB = {
    "name": "cli", "seed": 1,
    "data": {"source": "iris", "shards": 3, "validation_split": 0.2},
    "model": {"hidden": [8], "activation": "tanh"},
    "training": {"batch_size": 30, "steps": 15, "eval_every": 5, "checkpoint_every": 5,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
    "resources": {"workers": 2},
}


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


@pytest.mark.ray
def test_train_on_ray_and_reference_write_the_same_model(ray_local, job, tmp_path, capsys):
    expected, _ = train(JOB)
    for extra, name in [(["--reference"], "ref"), (["--workers", "1"], "w1"), (["--workers", "3"], "w3")]:
        out = tmp_path / f"{name}.npz"
        argv = ["train", str(job), "--out", str(out), "--checkpoint-dir", str(tmp_path / name), *extra]
        if "--reference" not in extra:
            argv += ["--address", ray_local]
        assert main(argv) == 0
        assert np.array_equal(MLP.load(out).params, expected.params), name
    assert "validation accuracy" in capsys.readouterr().out


@pytest.mark.ray
def test_train_refuses_a_used_checkpoint_dir_and_resumes_with_resume(ray_local, job, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(job), "--address", ray_local, "--checkpoint-dir", str(run),
                 "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["train", str(job), "--address", ray_local, "--checkpoint-dir", str(run)]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", str(job), "--address", ray_local, "--resume", str(run),
                 "--out", str(tmp_path / "b.npz")]) == 0
    assert np.array_equal(MLP.load(tmp_path / "a.npz").params, MLP.load(tmp_path / "b.npz").params)


def test_bad_spec_is_a_one_line_error_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**JOB, "resources": {"workers": 5}}))
    assert main(["train", str(bad), "--reference"]) == 2
    err = capsys.readouterr().err
    assert "resources.workers (5)" in err and "Traceback" not in err


def test_the_installed_command_runs_a_reference_job(job, tmp_path):
    out = tmp_path / "m.npz"
    done = subprocess.run([sys.executable, "-m", "service.cli", "train", str(job), "--reference", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and MLP.load(out).params.size == 4 * 8 + 8 + 8 * 3 + 3
