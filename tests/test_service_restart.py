"""Kill the service (SIGKILL), or stop it (SIGTERM), while a job runs; restart
it; the job resumes from its latest checkpoint and finishes with the same bits
as an uninterrupted run."""

from __future__ import annotations

import io
import subprocess
import sqlite3

import httpx
import numpy as np
import pytest

from core.mlp import MLP
from core.trainer import train
from service_helpers import ServiceProcess, tiny_spec, wait_for, wait_state


def stored_state(store, job_id: str) -> str:
    """A job's state read straight from the store's SQLite file."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_restart_resumes_with_the_same_bits(tmp_path, ray_local, how):
    spec = tiny_spec(workers=2, steps=400, checkpoint_every=20, eval_every=100)
    store = tmp_path / "store" / "shardprop.db"
    store.parent.mkdir()
    args = ["--ray-address", ray_local, "--data-root", str(tmp_path)]
    first = ServiceProcess(store, *args).start()
    try:
        job = httpx.post(f"{first.url}/v1/jobs", json=spec).json()
        queued = httpx.post(f"{first.url}/v1/jobs", json=tiny_spec(steps=5)).json()

        def checkpointed():
            got = httpx.get(f"{first.url}/v1/jobs/{job['id']}").json()
            return got if (got["checkpoint_step"] or 0) >= 20 else None

        at_kill = wait_for(checkpointed, 120, 0.02, "a checkpoint")
        if how == "SIGKILL":
            first.kill()
        else:
            # An orderly stop, through the service's handler alone (Ray's
            # writes a crash report first): the job is stopped at a step
            # boundary and left `running`.
            first.proc.terminate()
            try:
                first.proc.wait(60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the service ignored SIGTERM for 60 s\n{first.diagnose()}") from None
            log = first.log.read_text(errors="replace")
            assert "SIGTERM received" not in log, log[-3000:]
            assert f"job(s) {job['id']} stay running" in log, log[-3000:]
            assert stored_state(store, job["id"]) == "running"
    finally:
        first.kill()
    assert at_kill["state"] == "running" and at_kill["step"] < spec["training"]["steps"], at_kill

    if how == "SIGKILL":
        # A service paused from the start (max 0 jobs at once) does not
        # restart the job; stopped, it still names it as left running.
        paused = ServiceProcess(store, *args, "--max-concurrent-jobs", "0").start()
        try:
            paused.proc.terminate()
            paused.proc.wait(60)
            log = paused.log.read_text(errors="replace")
            assert f"job(s) {job['id']} stay running" in log, log[-3000:]
            assert stored_state(store, job["id"]) == "running"
        finally:
            paused.kill()

    second = ServiceProcess(store, *args).start()
    try:
        got = httpx.get(f"{second.url}/v1/jobs/{job['id']}").json()
        assert got["state"] in ("running", "succeeded")
        done = wait_state(second.url, job["id"], timeout=120)
        assert done["state"] == "succeeded", done
        assert [t["to"] for t in done["transitions"]] == ["queued", "running", "succeeded"]
        steps = [m["step"] for m in httpx.get(f"{second.url}/v1/jobs/{job['id']}/metrics").json()["metrics"]]
        assert steps == list(range(1, 401))  # replayed steps stored once
        model = httpx.get(f"{second.url}/v1/jobs/{job['id']}/model")
        assert model.status_code == 200
        net = MLP.load(io.BytesIO(model.content))
        # the queued job was kept and runs after
        assert wait_state(second.url, queued["id"], timeout=120)["state"] == "succeeded"
    finally:
        second.stop()
    reference, _ = train(spec)
    assert np.array_equal(net.params, reference.params)
