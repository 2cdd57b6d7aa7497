"""Membership epochs (workers/fencing.py) on real actors of the shared
3-raylet cluster: a parameter server refuses a plan or result of another
epoch and its parameters keep every bit, a worker refuses a plan older than
the newest epoch it has seen, and a job whose worker is killed advances its
epoch, refuses what its former membership sends, and ends with the
reference trainer's bits and each step stored exactly once."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray

from core.spec import parse_spec
from core.trainer import ShardedData, ShardGradient, build_network, train
from service.store import Store
from workers.coordinator import Coordinator
from workers.gradient_worker import GradientWorker
from workers.parameter_server import ParameterServer
from workers.protocol import EpochAdvanced, StepPlan, WorkerResult
from spec_helpers import place

pytestmark = [pytest.mark.ray]


def spec(workers=1, shards=2, steps=1, **training):
    return parse_spec(place({
        "name": "fencing", "seed": 11,
        "data": {"source": "digits", "shards": shards},
        "model": {"hidden": [16]},
        "training": {"batch_size": 64, "steps": steps, "eval_every": 0, "checkpoint_every": 4,
                     "optimizer": {"name": "adam", "lr": 0.01}},
    }, workers=workers, **training))


def initial_params(s) -> np.ndarray:
    return build_network(s, ShardedData.from_spec(s).dataset).params


@pytest.fixture
def actors(ray_cluster):
    """A server (at membership epoch 2) and a worker of one 2-shard job; killed after."""
    s = spec()
    params = initial_params(s)
    server = ParameterServer.remote(s, 0, params, 0, params.size, 0, None, (), 2)
    worker = GradientWorker.options(num_cpus=1).remote(s, 0)
    yield s, params, server, worker
    ray.kill(server)
    ray.kill(worker)


def test_a_server_refuses_a_result_of_another_epoch_and_keeps_every_bit(actors):
    s, params, server, worker = actors
    stale_plan = StepPlan(0, {0: (0, 1)}, epoch=1)
    # a worker of epoch 1 computes step 0 from the server's parameters: a real result of the former membership
    stale = worker.step.remote(stale_plan, server.publish.remote())
    assert ray.get(stale).epoch == 1
    before = ray.get(server.publish.remote()).tobytes()
    with pytest.raises(ray.exceptions.RayTaskError, match="refused worker 0's result of membership epoch 1"):
        ray.get(server.apply.remote(StepPlan(0, {0: (0, 1)}, epoch=2), stale))  # the right step, its epoch's plan
    with pytest.raises(ray.exceptions.RayTaskError, match="refused a plan of membership epoch 1"):
        ray.get(server.apply.remote(stale_plan, stale))
    with pytest.raises(ray.exceptions.RayTaskError, match="refused a plan of membership epoch 3"):
        ray.get(server.publish_step.remote(StepPlan(0, {0: (0, 1)}, epoch=3)))  # a newer one is not its either
    assert ray.get(server.publish.remote()).tobytes() == before
    assert ray.get(server.location.remote()).version == 0
    refused = ray.get(server.refusals.remote())
    assert [(r.what, r.worker, r.epoch, r.current, r.step) for r in refused] == [
        ("result", 0, 1, 2, 1), ("plan", None, 1, 2, 1), ("result", 0, 1, 2, 1), ("plan", None, 3, 2, 1)]
    assert ray.get(server.refusals.remote()) == []  # handed over once
    # the same step of the server's own epoch is applied: the reference trainer's first step, bit for bit
    plan = StepPlan(0, {0: (0, 1)}, epoch=2)
    ray.get(server.apply.remote(plan, worker.step.remote(plan, server.publish_step.remote(plan))))
    assert np.array_equal(ray.get(server.publish.remote()), train(s)[0].params)


def test_an_async_push_of_another_epoch_is_refused_and_changes_nothing(actors):
    s, params, server, worker = actors
    stale = worker.compute.remote(0, (0,), [server.publish.remote()], 1)
    new_params, stats = server.push.remote(0, 4, [stale])
    stats = ray.get(stats)
    assert not stats.accepted and stats.fenced and stats.worker == 0 and stats.version == 0
    assert ray.get(new_params).tobytes() == params.tobytes()
    assert [(r.what, r.worker, r.epoch, r.current) for r in ray.get(server.fence.remote(3))] == [("result", 0, 1, 2)]
    accepted = ray.get(server.push.remote(0, 4, [worker.compute.remote(0, (0,), [server.publish.remote()], 3)])[1])
    assert accepted.accepted and accepted.version == 1


def test_a_worker_refuses_a_plan_older_than_the_newest_epoch_it_has_seen(actors):
    s, params, server, worker = actors
    ref = ray.put(params)
    assert ray.get(worker.step.remote(StepPlan(0, {0: (0, 1)}, epoch=3), ref)).epoch == 3
    with pytest.raises(ray.exceptions.RayTaskError, match="worker 0: refused a plan of membership epoch 2"):
        ray.get(worker.step.remote(StepPlan(0, {0: (0, 1)}, epoch=2), ref))
    ray.get(worker.own.remote((0, 1), 5))  # told epoch 5 with its shards, before a graph is built
    with pytest.raises(ray.exceptions.RayTaskError, match="refused a plan of membership epoch 4"):
        ray.get(worker.step.remote(StepPlan(1, {0: (0, 1)}, epoch=4), ref))
    with pytest.raises(ray.exceptions.RayTaskError, match="refused a computation of membership epoch 4"):
        ray.get(worker.compute.remote(0, (0,), [ref], 4))
    assert ray.get(worker.step.remote(StepPlan(1, {0: (0, 1)}, epoch=5), ref)).epoch == 5


def test_a_killed_worker_advances_the_epoch_and_what_its_membership_sends_is_refused(ray_cluster, tmp_path):
    """A 2-worker job whose worker 1 is killed at step 5. When the recovery
    has made epoch 2, a result of worker 1 stamped with epoch 1 is sent to
    the live server for the very step it is at, as the cut-off worker would
    once its link healed: it is refused, the job ends with the reference
    bits, and its stored history holds steps 1..16 exactly once."""
    s = spec(workers=2, shards=6, steps=16)
    store = Store(tmp_path / "store.db")
    job, _ = store.create_job(s.model_dump(mode="json"))
    sent = {}

    def on_step(record):
        store.record_metric(job["id"], record)
        if record["step"] == 5:
            os.kill(coordinator.worker_locations[1]["pid"], signal.SIGKILL)

    def on_event(event):
        store.record_event(job["id"], event.kind, getattr(event, "step", None), event.detail())
        if isinstance(event, EpochAdvanced) and event.epoch == 2:
            server = coordinator._job.servers.actors[0]  # between the recovery and the next graph: idle
            version = ray.get(server.location.remote()).version
            size = initial_params(s).size
            grads = tuple(ShardGradient(k, version, np.ones(size, dtype=s.training.dtype), 1, 1.0) for k in range(6))
            late = WorkerResult(1, grads, 0.0, epoch=1)
            plan = StepPlan(version, {1: tuple(range(6))}, epoch=2)
            try:
                ray.get(server.apply.remote(plan, late))
            except ray.exceptions.RayTaskError as err:
                sent["refused"] = str(err)

    coordinator = Coordinator(s, tmp_path / "run", on_step=on_step, on_event=on_event)
    net = coordinator.run()
    store.flush()
    assert np.array_equal(net.params, train(s)[0].params)
    assert "refused worker 1's result of membership epoch 1" in sent["refused"]
    assert [r["step"] for r in store.metrics(job["id"])] == list(range(1, 17))
    assert store.missing_steps(job["id"]) == 0
    events = store.events(job["id"])
    epochs = [e["detail"] for e in events if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    assert epochs[0]["reason"] == "start" and epochs[1]["reason"] in ("recovery", "restore")
    assert 1 not in epochs[1]["workers"] and len(epochs[1]["workers"]) == 2  # a replacement for the killed one
    refused = [e["detail"] for e in events if e["kind"] == "stale_refused"]
    assert refused == [{"what": "result", "by": "server 0", "worker": 1, "epoch": 1, "current": 2,
                        "step": refused[0]["step"]}]
    assert coordinator.counters.fenced == 1 and coordinator.counters.epoch == epochs[-1]["epoch"]
    assert not [e for e in events if e["kind"] == "record_refused"]
    store.close()

