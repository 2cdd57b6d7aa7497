"""A job through a killed parameter server and a SIGKILLed service, read by a
client that never restarts: its history has each step exactly once (in the
store and in Job.metrics()), and its event stream, followed by one
generator across the restart, has every event exactly once — the same
events, numbered 1..n, as a fresh read afterwards. The weights are the
reference trainer's."""

from __future__ import annotations

import io
import os
import signal
import threading

import numpy as np
import pytest

from core.mlp import MLP
from core.trainer import train
from service.client import Client
from service_helpers import ServiceProcess, tiny_spec, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.chaos, pytest.mark.slow]


def parameter_server_pids() -> list[int]:
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] == "ParameterServer"]


def test_events_and_history_exactly_once_through_a_server_kill_and_a_service_sigkill(tmp_path, ray_local):
    spec = tiny_spec(workers=2, steps=300, checkpoint_every=20, eval_every=50)
    store = tmp_path / "store" / "shardprop.db"
    store.parent.mkdir()
    args = ["--ray-address", ray_local, "--data-root", str(tmp_path)]
    first = ServiceProcess(store, *args).start()
    second = ServiceProcess(store, *args, port=first.port)  # the same address: the client follows it there
    events, errors = [], []
    try:
        client = Client(first.url, retry_s=180)
        job = client.submit(spec)

        def read():
            try:
                for event in job.events(follow=True, interval=0.1):
                    events.append(event)
            except Exception as err:  # the assertion below names it
                errors.append(err)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: (job.status()["checkpoint_step"] or 0) >= 20, 120, 0.05, "a first checkpoint")
        pids = wait_for(parameter_server_pids, 30, 0.1, "the parameter server")
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: any(e["kind"] == "recovery" and e["detail"]["servers"] for e in events), 120, 0.1,
                 "the server's recovery", diagnose=lambda: str(events))
        recovered_at = next(e["step"] for e in events if e["kind"] == "recovery")
        wait_for(lambda: (job.status()["checkpoint_step"] or 0) >= recovered_at + 40, 120, 0.05,
                 "a checkpoint after the recovery")
        first.kill()
        seen_at_kill = len(events)
        second.start()
        final = job.wait(timeout=180)
        reader.join(60)
        assert not reader.is_alive() and not errors, errors
    finally:
        first.kill()
        second.stop()
        client.close()
    assert final["state"] == "succeeded" and final["resumes"] == 1, final
    assert 0 < seen_at_kill < len(events)

    # every event once, in order, and the same as a fresh read of the timeline
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), seqs
    second.start()
    try:
        with Client(second.url) as fresh:
            again = list(fresh.job(job.id).events(follow=False))
            history = fresh.job(job.id).metrics()
            net = MLP.load(io.BytesIO(fresh.model(job.id)))
    finally:
        second.stop()
    assert again == events
    kinds = [e["kind"] for e in events]
    assert kinds.count("recovery") >= 1 and kinds.count("resumed") == 1, kinds
    assert [e["detail"]["state"] for e in events if e["kind"] == "state"] == ["queued", "running", "succeeded"]
    # each step exactly once, though steps were made again after both failures
    assert [r["step"] for r in history] == list(range(1, 301))
    reference, ref_history = train(spec)
    assert np.array_equal(net.params, reference.params)
    assert [r.get("params_sha256") for r in history] == [r.get("params_sha256") for r in ref_history]
