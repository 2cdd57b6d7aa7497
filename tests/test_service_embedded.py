"""The embedded default, as `make demo` runs it: `shardprop serve` with no
`--ray-address` starts a Ray instance of its own, and its jobs run on the
compiled shared-memory step graph, with the reference bits."""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.mlp import MLP
from core.trainer import train
from service_helpers import ServiceProcess, tiny_spec, wait_for, wait_state


@pytest.mark.ray
@pytest.mark.slow
def test_the_embedded_service_trains_on_the_compiled_graph_with_the_reference_bits(tmp_path):
    # Long enough (2-3 s here) that the job's shared arrays are seen while it
    # runs, short enough to end in time on a loaded machine: with two busy
    # loops beside it at normal priority, Ray's workers (nice 15) ran about
    # 13 steps/s.
    spec = tiny_spec(workers=2, steps=600, eval_every=100, checkpoint_every=200)
    server = ServiceProcess(tmp_path / "store.db", "--data-root", str(tmp_path)).start()
    try:
        job = httpx.post(f"{server.url}/v1/jobs", json=spec, timeout=10).json()
        # A compiled graph with zero-copy arrays keeps them in a directory of
        # the service's on /dev/shm (workers.shared); the object-ref path never
        # makes one.
        mine = f"shardprop-{os.getuid()}-{server.proc.pid}-*"
        seen: list[Path] = []

        def shared_arrays_or_the_end():
            seen.extend(p for p in Path("/dev/shm").glob(mine) if p not in seen)
            try:
                state = httpx.get(f"{server.url}/v1/jobs/{job['id']}", timeout=10).json()["state"]
            except httpx.TimeoutException:
                return False  # a slow moment: ask again
            return seen or state in ("succeeded", "failed", "cancelled")

        wait_for(shared_arrays_or_the_end, 120, 0.02, "the job's shared arrays", diagnose=server.diagnose)
        assert seen, "the job ran without shared arrays: not on the compiled graph"
        done = wait_state(server.url, job["id"], timeout=180, diagnose=server.diagnose)
        assert done["state"] == "succeeded", done
        model = httpx.get(f"{server.url}/v1/jobs/{job['id']}/model", timeout=10)
        assert model.status_code == 200
        net = MLP.load(io.BytesIO(model.content))
        assert not any(p.exists() for p in seen), "the finished job's shared arrays were left behind"
    finally:
        server.stop()
    # SIGTERM went to the service's own handler, not Ray's crash report
    assert "SIGTERM received" not in server.log.read_text(errors="replace")
    reference, _ = train(spec)
    assert np.array_equal(net.params, reference.params)
