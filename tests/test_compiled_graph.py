"""The compiled (shared-memory) step graph gives the reference trainer's bits.

In a Ray instance of its own, with every actor on its node, the coordinator
compiles each step to shared-memory channels; this
is the path `shardprop train` and the embedded service take, and the one the
speed target is measured on. The jobs run in a subprocess with a private
single-node Ray (tests/compiled_runs.py); each result is compared here with
core's single-process trainer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.spec import parse_spec
from core.trainer import train
from spec_helpers import place
from test_distributed import OPTIMIZERS

pytestmark = [pytest.mark.ray]



def raw_spec(dtype="float32", optimizer="momentum", workers=2, **training):
    return place({
        "name": "compiled", "seed": 11,
        "data": {"source": "digits", "shards": 4, "validation_split": 0.2},
        "model": {"hidden": [32, 16], "activation": "tanh"},
        "training": {"batch_size": 101, "steps": 12, "dtype": dtype,
                     "optimizer": OPTIMIZERS[optimizer], "eval_every": 5, "checkpoint_every": 4},
    }, workers=workers, **training)


CASES = [
    *({"name": f"{dtype}-{opt}-w{w}", "spec": raw_spec(dtype, opt, w)}
      for dtype in ("float32", "float64") for opt in OPTIMIZERS for w in (1, 3, 4)),
    {"name": "two-servers", "spec": raw_spec(workers=3, parameter_servers=2)},
    {"name": "worker-raises", "spec": raw_spec(), "faults": {"1": {"fail_at": [3, 5]}}},
    {"name": "worker-killed", "spec": raw_spec(workers=3), "kill": ["worker", 5]},
    {"name": "server-killed", "spec": raw_spec(), "kill": ["server", 6]},
    {"name": "no-room-for-shared-arrays", "spec": raw_spec(workers=3), "shared_root": "/nonexistent/shm"},
    {"name": "hung-then-cancelled", "spec": raw_spec(), "faults": {"0": {"delay_s": 600}}, "cancel_after": 3},
    {"name": "hung-worker-replaced", "spec": raw_spec(worker_timeout_s=5), "faults": {"1": {"delay_s": 600}}},
    {"name": "results-kept", "spec": raw_spec(eval_every=1, checkpoint_every=2, worker_timeout_s=5),
     "keep_results": True},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's results in one folder. The cases run in two subprocesses
    at once, each with a private Ray of its own: a job's time goes mostly to
    starting its actors and compiling its graph, which leaves the machine's
    cores idle for much of it."""
    out = tmp_path_factory.mktemp("compiled")
    script = Path(__file__).with_name("compiled_runs.py")
    halves = [CASES[0::2], CASES[1::2]]
    started = []
    for i, half in enumerate(halves):
        (out / f"part{i}").mkdir()
        (out / f"cases{i}.json").write_text(json.dumps(half))
        started.append(subprocess.Popen([sys.executable, str(script), str(out / f"cases{i}.json"), str(out / f"part{i}")],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        ended = [proc.communicate(timeout=600) for proc in started]
    finally:
        for proc in started:
            proc.kill()  # only if still running (a timeout)
    leftovers = []
    for i, (proc, (stdout, stderr)) in enumerate(zip(started, ended)):
        assert proc.returncode == 0, f"cases done in part {i}: {stdout.split()}\n{stderr[-3000:]}"
        leftovers += json.loads((out / f"part{i}" / "leftovers.json").read_text())
        for path in (out / f"part{i}").iterdir():
            if path.name != "leftovers.json":
                path.rename(out / path.name)
    (out / "leftovers.json").write_text(json.dumps(leftovers))
    return out


def reference(spec: dict) -> np.ndarray:
    return train(parse_spec(spec))[0].params


def events(runs: Path, name: str) -> list:
    return json.loads((runs / f"{name}.events.json").read_text())


def params(runs: Path, name: str) -> np.ndarray:
    path = runs / f"{name}.npy"
    assert path.exists(), (runs / f"{name}.json").read_text()
    return np.load(path, allow_pickle=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_compiled_steps_give_the_reference_bits(runs, dtype, optimizer):
    expected = reference(raw_spec(dtype, optimizer))
    for w in (1, 3, 4):
        name = f"{dtype}-{optimizer}-w{w}"
        assert [(d["transport"], d["zero_copy"]) for kind, d in events(runs, name) if kind == "graph"] == [
            ("shared memory", True)]  # parameters and gradients in shared files, not serialized
        got = params(runs, name)
        assert got.dtype == np.dtype(dtype)
        assert np.array_equal(got, expected), f"{w} workers on the compiled graph differ from the reference"


def test_two_servers_on_the_compiled_graph_give_the_same_bits(runs):
    assert np.array_equal(params(runs, "two-servers"), reference(raw_spec(workers=3, parameter_servers=2)))


def test_without_room_for_shared_arrays_the_channels_carry_them_with_the_same_bits(runs):
    name = "no-room-for-shared-arrays"
    assert [(d["transport"], d["zero_copy"]) for kind, d in events(runs, name) if kind == "graph"] == [
        ("shared memory", False)]
    assert np.array_equal(params(runs, name), reference(raw_spec(workers=3)))


def test_every_job_removes_its_shared_arrays(runs):
    # after successes, an error, a killed worker (its file and its successor's),
    # a killed server and a cancel
    assert json.loads((runs / "leftovers.json").read_text()) == []


def test_a_worker_error_on_the_compiled_graph_names_worker_shard_and_step(runs):
    error = json.loads((runs / "worker-raises.json").read_text())
    assert error["error"] == "TrainingError"
    assert "worker 1, shard 3, step 6" in error["message"]


def test_a_killed_worker_on_the_compiled_graph_loses_nothing(runs):
    assert np.array_equal(params(runs, "worker-killed"), reference(raw_spec(workers=3)))
    recoveries = [d for kind, d in events(runs, "worker-killed") if kind == "recovery"]
    assert len(recoveries) == 1 and not recoveries[0]["servers"]
    graphs = [d for kind, d in events(runs, "worker-killed") if kind == "graph"]
    assert [(d["transport"], d["zero_copy"]) for d in graphs] == [("shared memory", True)] * 2  # compiled again
    # the killed worker (index 2)'s gradient file went with it; the survivors' stay
    grads = sorted(f for f in graphs[1]["files"] if f.endswith(".grads"))
    assert grads == ["worker-0-1.grads", "worker-1-1.grads"], graphs[1]["files"]


def test_a_killed_server_on_the_compiled_graph_restores_from_its_checkpoint(runs):
    assert np.array_equal(params(runs, "server-killed"), reference(raw_spec()))
    recoveries = [d for kind, d in events(runs, "server-killed") if kind == "recovery"]
    assert len(recoveries) == 1 and recoveries[0]["servers"] and recoveries[0]["step"] in (4, 8)


def test_a_cancel_ends_a_compiled_step_that_hangs(runs):
    """A worker stuck for 600 s inside a step: the cancel kills the job's
    workers after its grace period instead of waiting for the step."""
    error = json.loads((runs / "hung-then-cancelled.json").read_text())
    assert error["error"] == "JobCancelled", error
    assert error["seconds"] < 60, error


def test_a_hung_worker_on_the_compiled_graph_is_replaced_with_the_same_bits(runs):
    """Worker 1 sleeps 600 s in every step; worker_timeout_s is 5: worker 1,
    still computing (it answers from a thread of its own while the graph
    holds its main one), is killed and replaced, the graph compiled again,
    and the job ends with the reference bits, long before the sleep would."""
    spec = raw_spec(worker_timeout_s=5)
    assert np.array_equal(params(runs, "hung-worker-replaced"), reference(spec))
    seen = events(runs, "hung-worker-replaced")
    assert [d for kind, d in seen if kind == "hung"] == [{"step": 1, "seconds": 5, "workers": [1]}]
    recoveries = [d for kind, d in seen if kind == "recovery"]
    assert len(recoveries) == 1 and not recoveries[0]["servers"] and recoveries[0]["workers"] == 2
    graphs = [d for kind, d in seen if kind == "graph"]
    assert [d["transport"] for d in graphs] == ["shared memory"] * 2


def test_statistics_kept_by_the_caller_never_stall_the_compiled_graph(runs):
    """Every step returns the parameters (to evaluate) and every other step
    the whole state, and the coordinator's caller keeps them all. Ray reads a
    channel's arrays without copying them and cannot write that channel again
    while they live, so uncopied results stopped the graph after three
    steps; the watchdog (5 s here) then replaced every worker."""
    name = "results-kept"
    assert [d["transport"] for kind, d in events(runs, name) if kind == "graph"] == ["shared memory"]
    assert [kind for kind, _ in events(runs, name) if kind in ("hung", "recovery")] == []
    assert np.array_equal(params(runs, name), reference(raw_spec(eval_every=1, checkpoint_every=2)))
