"""A rung of a sweep trial stops at `training.stop_at` with a checkpoint; the
promotion continues from it. Checked against an uninterrupted run of the
reference trainer: the same bits, with the reference trainer and with two
Ray workers."""

from __future__ import annotations

import numpy as np
import pytest

from core.spec import SpecError, checkpoint_key, parse_spec
from core.trainer import TrainingError, train, train_from
from workers.checkpoint import CheckpointError, copy_checkpoint, list_checkpoints, read_checkpoint
from workers.coordinator import Coordinator
from run_helpers import by_kind


def spec(stop_at=None, workers=2, steps=12, **optimizer):
    return parse_spec({
        "name": "rungs", "seed": 5,
        "data": {"source": "digits", "shards": 4, "validation_split": 0.2},
        "model": {"hidden": [24], "activation": "tanh"},
        "training": {"batch_size": 96, "steps": steps, "eval_every": 5, "checkpoint_every": 4, "stop_at": stop_at,
                     # a schedule over `steps` and a stateful optimizer: a continuation must carry both
                     "optimizer": optimizer or {"name": "adam", "lr": 0.02, "schedule": {"name": "cosine"}}},
        "resources": {"workers": workers},
    })


def test_stopping_at_rungs_and_continuing_gives_the_uninterrupted_bits_in_the_reference_trainer():
    full, full_history = train(spec())
    _, first, state = train_from(spec(stop_at=3), None)
    _, second, state = train_from(spec(stop_at=7), state)
    net, last, end = train_from(spec(), state)
    assert [r["step"] for r in first] == [1, 2, 3] and [r["step"] for r in second] == [4, 5, 6, 7]
    assert [r["step"] for r in last] == list(range(8, 13)) and end.step == 12
    assert np.array_equal(net.params, full.params)
    assert [r["loss"] for r in first + second + last] == [r["loss"] for r in full_history]
    # each stop is evaluated (the sweep ranks trials there), even off the eval_every grid
    assert first[-1]["val_accuracy"] is not None and second[-1]["val_accuracy"] is not None
    assert second[1]["val_accuracy"] == full_history[4]["val_accuracy"]  # step 5, on the grid: the same value
    assert first[-1]["params_sha256"] is not None
    with pytest.raises(TrainingError, match="cannot continue from step 12: past this job's stop at step 7"):
        train_from(spec(stop_at=7), end)


def test_stop_at_is_outside_the_checkpoint_key_and_checked():
    keys = {checkpoint_key(spec(stop_at=s).model_dump(mode="json")) for s in (None, 3, 12)}
    assert len(keys) == 1
    assert checkpoint_key(spec(steps=13).model_dump(mode="json")) not in keys  # steps shape the schedule
    with pytest.raises(SpecError, match=r"training: stop_at \(13\) must be <= steps \(12\)"):
        spec(stop_at=13)
    with pytest.raises(SpecError, match=r"training: stop_at \(0\)|training.stop_at: Input should be greater than 0"):
        spec(stop_at=0)
    raw = spec(stop_at=4).model_dump(mode="json")
    raw["training"]["mode"] = "async"
    raw["resources"]["parameter_servers"] = 1
    with pytest.raises(SpecError, match=r"stop_at \(4\) needs mode 'sync'"):
        parse_spec(raw)


@pytest.mark.ray
def test_two_workers_stop_at_a_rung_and_a_continuation_resumes_to_the_reference_bits(ray_cluster, tmp_path):
    full, _ = train(spec(workers=1))
    _, _, rung_state = train_from(spec(stop_at=7, workers=1), None)

    stopped = Coordinator(spec(stop_at=7), tmp_path / "rung0").run()
    assert np.array_equal(stopped.params, rung_state.params)
    ckpt = read_checkpoint(list_checkpoints(tmp_path / "rung0")[-1])
    assert ckpt.step == 7
    assert all(np.array_equal(ckpt.optimizer[k], v) for k, v in rung_state.optimizer.items())

    with pytest.raises(CheckpointError, match="no checkpoint of step 6"):
        copy_checkpoint(tmp_path / "rung0", tmp_path / "rung1", 6)
    copy_checkpoint(tmp_path / "rung0", tmp_path / "rung1", 7)
    records, resumed = [], []
    net = Coordinator(spec(), tmp_path / "rung1", on_step=records.append,
                      on_event=by_kind(lambda k, d: k == "resumed" and resumed.append(d["step"]))).run(resume=True)
    assert resumed == [7]
    assert [r["step"] for r in records] == list(range(8, 13))
    assert np.array_equal(net.params, full.params)
    # a job never goes back: its folder now holds step 12, past a stop at 7
    with pytest.raises(TrainingError, match="the checkpoint of step 12 in .* is past this job's stop at step 7"):
        Coordinator(spec(stop_at=7), tmp_path / "rung1").run(resume=True)
