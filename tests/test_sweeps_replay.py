"""A sweep run twice through real services: once with 1 worker per trial,
undisturbed, submitted with `shardprop sweep submit --follow`; once with 2
workers per trial and the service SIGKILLed while a promotion runs, then
restarted. Both give the trials, promotions, objective values and
best-model bits that the single-process reference trainer gives for the same
space (successive halving worked out here by hand from its histories);
an ordinary job submitted after the sweep is not starved by it; Prometheus
shows the trials by state and the best objective; `shardprop sweep best`
writes the best trial's model file."""

from __future__ import annotations

import copy
import io
import os
import sqlite3
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.mlp import MLP
from core.sweep import parse_sweep
from core.trainer import train
from service_helpers import ROOT, ServiceProcess, tiny_spec, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.chaos]

http = httpx.Client(timeout=60)  # a loaded machine can stall a service for seconds
LRS = [0.02, 0.05, 0.2, 0.5]
RUNGS = [10, 20]


def sweep_doc(workers: int) -> dict:
    base = tiny_spec(steps=RUNGS[-1], eval_every=10, checkpoint_every=5, workers=workers)
    return {"name": "replay", "seed": 11, "method": "halving", "base": base,
            "space": {"training.optimizer.lr": {"grid": LRS}},
            "objective": {"metric": "val_accuracy", "mode": "max"}, "max_concurrent_trials": 2,
            "halving": {"reduction_factor": 2, "rungs": RUNGS}}


def by_hand(doc: dict):
    """Successive halving from the reference trainer: every trial trained in
    full (the objective at a rung is its val_accuracy at that step), the top
    half of rung 0 promoted, best first (ties: lower trial first), the best of rung 1."""
    sweep = parse_sweep(copy.deepcopy(doc))
    runs = {t: train(sweep.trial_spec(t, len(RUNGS) - 1)) for t in range(sweep.n_trials)}
    accuracy = {t: {r["step"]: r["val_accuracy"] for r in history if r.get("val_accuracy") is not None}
                for t, (_, history) in runs.items()}
    ranked = sorted(range(sweep.n_trials), key=lambda t: (-accuracy[t][RUNGS[0]], t))
    promoted = ranked[:sweep.n_trials // 2]  # in rank order
    best = min(promoted, key=lambda t: (-accuracy[t][RUNGS[1]], t))
    return sweep, accuracy, promoted, best, runs[best][0].params


def outcome(url: str, sweep_id: str) -> dict:
    got = http.get(f"{url}/v1/sweeps/{sweep_id}").json()
    model = http.get(f"{url}/v1/jobs/{got['best']['job_id']}/model")
    assert model.status_code == 200, model.text
    return {"state": got["state"], "promotions": got["promotions"], "best": got["best"]["trial"],
            "board": [(r["trial"], r["values"], r["rung"], r["objective"], r["state"], r["steps_run"])
                      for r in got["leaderboard"]],
            "params": MLP.load(io.BytesIO(model.content)).params, "view": got}


def started_at(url: str, job_id: str) -> str:
    job = http.get(f"{url}/v1/jobs/{job_id}").json()
    return next(t["at"] for t in job["transitions"] if t["to"] == "running")


def cli(url: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service", "--server", url, "sweep", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def check_against_reference(result: dict, sweep, accuracy, promoted, best, params) -> None:
    assert result["state"] == "succeeded"
    assert result["promotions"] == [[t, 1] for t in promoted]
    assert result["best"] == best
    rows = {trial: (values, rung, objective, state, steps) for trial, values, rung, objective, state, steps in result["board"]}
    for t in range(sweep.n_trials):
        values, rung, objective, state, steps = rows[t]
        assert values == {"training.optimizer.lr": LRS[t]} and state == "succeeded"
        assert rung == (1 if t in promoted else 0) and steps == RUNGS[rung]  # a promotion wastes no step
        assert objective == accuracy[t][RUNGS[rung]]
    assert np.array_equal(result["params"], params)


def test_a_sweep_gives_the_same_trials_promotions_and_bits_through_a_sigkill(tmp_path, ray_local):
    one, two = sweep_doc(workers=1), sweep_doc(workers=2)
    sweep, accuracy, promoted, best, params = by_hand(one)
    args = ["--ray-address", ray_local, "--data-root", str(tmp_path), "--max-concurrent-jobs", "2"]

    # 1 worker per trial, undisturbed, through the command line
    store = tmp_path / "a" / "shardprop.db"
    store.parent.mkdir()
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(one))
    service = ServiceProcess(store, *args).start()
    try:
        follow = cli(service.url, "submit", str(tmp_path / "sweep.yaml"), "--follow")
        sweep_id = follow.stdout.readline().strip()
        later = http.post(f"{service.url}/v1/jobs", json=tiny_spec(steps=5)).json()
        out, err = follow.communicate(timeout=600)
        assert follow.returncode == 0, out + err
        assert f"sweep {sweep_id} succeeded: best trial {best}" in out and "RANK" in out, out
        first = outcome(service.url, sweep_id)
        check_against_reference(first, sweep, accuracy, promoted, best, params)
        # the job submitted after the sweep started before the sweep's third trial did
        third = next(r for r in first["view"]["leaderboard"] if r["trial"] == 2)["jobs"][0]
        assert started_at(service.url, later["id"]) < started_at(service.url, third)
        jobs = http.get(f"{service.url}/v1/jobs").json()["jobs"]
        assert sum(j["sweep"] == sweep_id for j in jobs) == sweep.n_trials + len(promoted)
        scraped = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(
            http.get(f"{service.url}/metrics").text) for s in f.samples}
        assert scraped[("shardprop_sweep_trials", (("state", "succeeded"), ("sweep_id", sweep_id)))] == 4
        assert scraped[("shardprop_sweep_best_objective", (("sweep_id", sweep_id),))] == accuracy[best][RUNGS[1]]
        saved = cli(service.url, "best", sweep_id, "-o", str(tmp_path / "best.npz"))
        out, err = saved.communicate(timeout=120)
        assert saved.returncode == 0, out + err
        assert np.array_equal(MLP.load(tmp_path / "best.npz").params, params)
        listed = cli(service.url, "list")
        assert sweep_id in listed.communicate(timeout=60)[0]
    finally:
        service.stop()

    # 2 workers per trial, SIGKILLed while a promotion runs, restarted
    store = tmp_path / "b" / "shardprop.db"
    store.parent.mkdir()
    service = ServiceProcess(store, *args).start()
    try:
        sweep_id = http.post(f"{service.url}/v1/sweeps", json=two).json()["id"]

        def promotion_running():
            view = http.get(f"{service.url}/v1/sweeps/{sweep_id}").json()
            jobs = [r["jobs"][1] for r in view["leaderboard"] if len(r["jobs"]) > 1]
            now = [http.get(f"{service.url}/v1/jobs/{j}").json() for j in jobs]
            return any(j["state"] == "running" and RUNGS[0] < j["step"] < RUNGS[1] for j in now)

        wait_for(promotion_running, 300, 0.05, "a promotion to run")
        service.kill()
    finally:
        service.kill()
    with sqlite3.connect(store) as db:
        interrupted = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
    service = ServiceProcess(store, *args).start()
    try:
        wait_for(lambda: http.get(f"{service.url}/v1/sweeps/{sweep_id}").json()["state"] == "succeeded",
                 300, 0.2, "the sweep to succeed after the restart")
        second = outcome(service.url, sweep_id)
        jobs = http.get(f"{service.url}/v1/jobs").json()["jobs"]
        assert sum(j["sweep"] == sweep_id for j in jobs) == sweep.n_trials + len(promoted)  # none twice
        assert all(j["resumes"] == 1 for j in jobs if j["id"] in interrupted) and interrupted
    finally:
        service.stop()
    check_against_reference(second, sweep, accuracy, promoted, best, params)
    assert second["board"] == first["board"] and second["promotions"] == first["promotions"]
