"""SIGKILL the service while a job runs; restart it; the job resumes from its
latest checkpoint and finishes with the same bits as an uninterrupted run."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest

from core.mlp import MLP
from core.trainer import train
from service_helpers import ServiceProcess, tiny_spec, wait_for, wait_state


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_restart_resumes_with_the_same_bits(tmp_path, ray_local):
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
        first.kill()
    finally:
        first.kill()
    assert at_kill["state"] == "running" and at_kill["step"] < spec["training"]["steps"], at_kill

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
