"""Failures on a real 3-raylet cluster lose nothing: each run below is
compared bit for bit with core's reference trainer on the same spec (which the
distributed trainer matches when undisturbed, see test_distributed.py)."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import ray

from core.spec import parse_spec
from core.trainer import TrainingError, train
from workers.checkpoint import list_checkpoints, latest_checkpoint, read_checkpoint
from workers.coordinator import Coordinator, JobCancelled
from workers.gradient_worker import GradientWorker
from workers.parameter_server import ParameterServer
from workers.async_loop import AsyncLoop
from workers.protocol import StepPlan
from run_helpers import by_kind, fault_plan
from spec_helpers import place

pytestmark = [pytest.mark.ray, pytest.mark.chaos]


def spec(workers=2, shards=6, steps=16, **training):
    return parse_spec(place({
        "name": "chaos", "seed": 5,
        "data": {"source": "digits", "shards": shards},
        "model": {"hidden": [24]},
        "training": {"batch_size": 96, "steps": steps, "eval_every": 0,
                     "checkpoint_every": 4, "optimizer": {"name": "adam", "lr": 0.01}},
    }, workers=workers, **training))


@pytest.fixture(scope="module")
def reference():
    return {key: train(spec(**kw))[0].params for key, kw in
            {"default": {}, "six": {"workers": 6}}.items()}


def run_with(coordinator_spec, tmp_path, at_step, action, **kw):
    """Run a job, calling action(coordinator) once when `at_step` is reported."""
    records, events = [], []

    def on_step(record):
        records.append(record["step"])
        if record["step"] == at_step and action is not None:
            action(coordinator)

    coordinator = Coordinator(coordinator_spec, tmp_path / "run", on_step=on_step,
                              on_event=by_kind(lambda kind, detail: events.append((kind, detail))), **kw)
    net = coordinator.run()
    assert records == sorted(set(records)), "reported steps went backwards or repeated"
    return net, coordinator, events


def sigkill(location: dict) -> None:
    """Kill an actor's process the hard way, as the OOM killer would."""
    os.kill(location["pid"], signal.SIGKILL)


def test_a_killed_worker_process_loses_nothing(ray_cluster, tmp_path, reference):
    net, coordinator, events = run_with(spec(), tmp_path, 5,
                                        lambda c: sigkill(c.worker_locations[1]))
    assert np.array_equal(net.params, reference["default"])
    assert coordinator.counters.worker_failures == 1 and coordinator.counters.recoveries == 1
    assert any(kind == "recovery" for kind, _ in events)


def test_a_removed_node_moves_its_shards_and_returning_capacity_is_used(ray_cluster, tmp_path, reference):
    """Six workers fill the three 2-CPU nodes: losing one leaves no spare capacity.

    The job runs in a thread; this (main) thread removes and adds nodes, as
    cluster_utils needs the main thread for its signal handling."""
    state = {}
    step_5, lost = threading.Event(), threading.Event()

    def on_event(kind, detail):
        if kind == "recovery" and "workers_after_loss" not in state:
            state["workers_after_loss"] = detail["workers"]
            lost.set()

    records = []
    node_back = threading.Event()

    def on_step(record):
        records.append(record["workers"])
        if record["step"] == 5:
            step_5.set()
        if lost.is_set():  # the job's steps (~25 ms) wait here until the node is back, so steps are left to use it
            assert node_back.wait(120), "the node was not added back"

    # Slowed steps (20 ms per worker call) keep the job running while Ray notices the lost node.
    coordinator = Coordinator(spec(workers=6, steps=150), tmp_path / "run", on_step=on_step,
                              on_event=by_kind(on_event),
                              start_worker=fault_plan({i: {"delay_s": 0.02} for i in range(12)}))
    job = threading.Thread(target=lambda: state.update(net=coordinator.run()))
    job.start()
    try:
        assert step_5.wait(120), "the job did not reach step 5"
        node_id = coordinator.worker_locations[0]["node_id"]
        ray_cluster.remove_node(next(n for n in ray_cluster.worker_nodes if n.node_id == node_id),
                                allow_graceful=False)
        assert lost.wait(120), "the lost node was not recovered from"
        added = ray_cluster.add_node(num_cpus=2)
        ray_cluster.wait_for_nodes()
    finally:
        node_back.set()
        job.join(300)
    assert np.array_equal(state["net"].params, train(spec(workers=6, steps=150))[0].params)
    assert state["workers_after_loss"] == 4  # no spare capacity: survivors took the shards
    assert records[-1] == 6, "the returning node was not used again"
    assert added.node_id in coordinator.counters.nodes


def test_a_killed_parameter_server_restores_from_its_checkpoint(ray_cluster, tmp_path, reference):
    net, coordinator, events = run_with(spec(), tmp_path, 7, lambda c: sigkill(c.server_locations[0]))
    assert np.array_equal(net.params, reference["default"])
    assert coordinator.counters.server_failures == 1
    recovery = next(d for kind, d in events if kind == "recovery")
    # restored from a checkpoint (every 4 steps; steps run up to two ahead of the reports)
    assert recovery["servers"] and recovery["step"] in (4, 8)
    assert coordinator.counters.steps_replayed == recovery["steps_replayed"]


def test_a_duplicate_gradient_is_rejected_and_changes_nothing(ray_cluster):
    s = spec(workers=1, shards=2)
    from core.trainer import ShardedData, build_network
    net = build_network(s, ShardedData.from_spec(s).dataset)
    server = ParameterServer.remote(s, 0, net.params, 0, net.params.size, 0)
    worker = GradientWorker.options(num_cpus=1).remote(s, 0)
    try:
        job = StepPlan(0, {0: (0, 1)})
        result = worker.step.remote(job, server.publish_step.remote(job))
        ray.get(server.apply.remote(job, result))
        first = ray.get(server.publish.remote())
        again = server.apply.remote(job, result)  # the same (step, shards) pushed twice
        with pytest.raises(ray.exceptions.RayTaskError, match="expected step 2"):
            ray.get(again)
        twice = server.apply.remote(StepPlan(1, {0: (0, 1)}), result, result)
        with pytest.raises(ray.exceptions.RayTaskError, match="got shards"):
            ray.get(twice)  # step 0's gradients, twice, offered as step 1's
        assert np.array_equal(ray.get(server.publish.remote()), first)
        assert not np.array_equal(first, net.params)
    finally:
        ray.kill(server)
        ray.kill(worker)


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(ray_cluster, tmp_path, reference):
    s = spec()
    stop = {}

    def cancel_at_12(kind, detail):
        if kind == "checkpoint" and detail["step"] == 12:
            stop["coordinator"].cancel()

    stop["coordinator"] = Coordinator(s, tmp_path / "run", on_event=by_kind(cancel_at_12))
    with pytest.raises(Exception):
        stop["coordinator"].run()
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert read_checkpoint(newest).step == 12
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the middle of the parameters
    newest.write_bytes(bytes(data))
    (tmp_path / "run" / "ckpt-000000016.npz.tmp").write_bytes(b"half-written")  # an interrupted write
    damaged = []
    assert latest_checkpoint(tmp_path / "run", on_damaged=lambda p, e: damaged.append(p)).step == 8
    assert damaged == [newest]
    events = []
    net = Coordinator(s, tmp_path / "run", on_event=by_kind(lambda k, d: events.append((k, d)))).run(resume=True)
    assert ("resumed", {"step": 8}) in events
    assert np.array_equal(net.params, reference["default"])


def test_non_finite_steps_are_skipped_then_fail_the_job_keeping_the_last_good_checkpoint(ray_cluster, tmp_path):
    exploding = parse_spec({**spec().model_dump(), "model": {"hidden": [24], "output": "identity",
                            "loss": "squared_error"}, "training": {**spec().training.model_dump(),
                            "optimizer": {"name": "sgd", "lr": 1e3}, "max_nonfinite_steps": 3, "steps": 40}})
    with pytest.raises(TrainingError, match="3 non-finite steps in a row") as reference_error:
        train(exploding)
    records = []
    coordinator = Coordinator(exploding, tmp_path / "run", on_step=records.append)
    with pytest.raises(TrainingError, match="3 non-finite steps in a row") as err:
        coordinator.run()
    assert str(err.value) == str(reference_error.value)
    skipped = [r["step"] for r in records if r["skipped"]]
    assert len(skipped) == 2 and coordinator.counters.nonfinite_skipped == 3  # the third fails the job
    last = read_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert np.isfinite(last.params).all()


def test_resizing_a_running_job_changes_the_map_not_the_trajectory(ray_cluster, tmp_path, reference):
    def resize(coordinator):
        coordinator.resize(3)

    net, coordinator, events = run_with(spec(), tmp_path, 4, resize)
    assert np.array_equal(net.params, reference["default"])
    resizes = [d for k, d in events if k == "resize"]
    assert len(resizes) == 1 and resizes[0]["from"] == 2 and resizes[0]["to"] == 3 and resizes[0]["step"] >= 4
    with pytest.raises(ValueError, match=r"workers must be in \[1, 6\]"):
        coordinator.resize(7)


# ---------------------------------------------------------------- async mode


def async_spec(workers=1, steps=24, **training):
    return spec(workers=workers, shards=4, steps=steps, **{"mode": "async", "max_staleness": 8,
                                                          "checkpoint_every": 6, **training})


def sequential_reference(s):
    """Async with one worker, written out by hand from core's definitions: one
    update per shard gradient, the shards taken in turn, shard k's n-th turn
    on its n-th batch, each applied to the parameters it was computed on."""
    from core.optim import make_optimizer
    from core.trainer import ShardedData, build_network, one_blas_thread, shard_gradient

    t, shards = s.training, s.data.shards
    data = ShardedData.from_spec(s)
    net = build_network(s, data.dataset)
    optimizer = make_optimizer(t.optimizer, net.params.size, net.params.dtype, t.steps)
    with one_blas_thread():
        for version in range(t.steps):
            g = shard_gradient(net, data, version % shards, version // shards)
            optimizer.apply(net.params, g.grad_sum / g.grad_sum.dtype.type(g.count), version)
    return net.params


def each_shards_batches_are_contiguous(applied, first=None):
    """Every shard's batches, in the order applied, are first, first+1, ...:
    none twice, none skipped."""
    for shard in range(4):
        batches = [b for s, b in applied if s == shard]
        start = first[shard] if first else 0
        assert batches == list(range(start, start + len(batches))), (shard, applied)


@pytest.fixture(scope="module")
def async_reference():
    return sequential_reference(async_spec())


def test_async_with_one_worker_is_the_sequential_reference(ray_cluster, tmp_path, async_reference):
    net, coordinator, _ = run_with(async_spec(), tmp_path, -1, None)
    assert np.array_equal(net.params, async_reference)
    assert coordinator.counters.staleness == [0] * 24


def test_async_a_killed_worker_is_replaced_and_its_update_made_again(ray_cluster, tmp_path, async_reference):
    net, coordinator, events = run_with(async_spec(), tmp_path, 5, lambda c: sigkill(c.worker_locations[0]))
    assert np.array_equal(net.params, async_reference)
    assert coordinator.counters.worker_failures == 1 and coordinator.counters.recoveries == 1
    recovery = next(d for kind, d in events if kind == "recovery")
    assert recovery == {**recovery, "servers": False, "workers": 1, "steps_replayed": 0}


def test_async_a_killed_server_restores_from_its_checkpoint(ray_cluster, tmp_path, async_reference):
    """Restored from update 6 of 4 shards: the shards' next batches differ
    (2, 2, 1, 1), and the next update takes shard 2."""
    net, coordinator, events = run_with(async_spec(), tmp_path, 9, lambda c: sigkill(c.server_locations[0]))
    assert np.array_equal(net.params, async_reference)
    assert coordinator.counters.server_failures == 1
    recovery = next(d for kind, d in events if kind == "recovery")
    assert recovery["servers"] and recovery["step"] == 6  # checkpoints every 6 updates
    assert coordinator.counters.steps_replayed == recovery["steps_replayed"] == 3


def test_async_with_racing_workers_survives_a_killed_worker(ray_cluster, tmp_path):
    """Two workers race, so no bits to compare. Killing the first worker
    moves the survivor's shards (round-robin over the live workers) while it
    computes: still every update is reported once, in order, and every
    shard's batches are applied exactly once each, none skipped."""
    records = []
    coordinator = Coordinator(async_spec(workers=2, steps=40), tmp_path / "run",
                              on_step=lambda r: (records.append(r["step"]),
                                                 r["step"] == 10 and sigkill(coordinator.worker_locations[0])))
    net = coordinator.run()
    assert records == list(range(1, 41))
    assert coordinator.counters.worker_failures == 1 and coordinator.counters.recoveries == 1
    assert len(coordinator.applied_batches) == 40
    each_shards_batches_are_contiguous(coordinator.applied_batches)
    assert np.isfinite(net.params).all()


def test_async_resize_moves_shards_without_applying_a_batch_twice(ray_cluster, tmp_path):
    events = []
    coordinator = Coordinator(async_spec(workers=2, steps=40), tmp_path / "run",
                              on_step=lambda r: r["step"] in (8, 20) and coordinator.resize(3 if r["step"] == 8 else 1),
                              on_event=by_kind(lambda kind, detail: events.append((kind, detail))))
    coordinator.run()
    assert [(d["from"], d["to"]) for kind, d in events if kind == "resize"] == [(2, 3), (3, 1)]
    assert len(coordinator.applied_batches) == 40
    each_shards_batches_are_contiguous(coordinator.applied_batches)


def test_async_a_server_killed_while_a_checkpoint_is_due_is_restored(ray_cluster, tmp_path, async_reference,
                                                                    monkeypatch):
    """The server dies after applying update 12 and before giving its state
    for that update's checkpoint: restored from update 6, the same bits."""
    coordinator = Coordinator(async_spec(), tmp_path / "run")
    finish = AsyncLoop._finish

    def server_dies_first(loop, run, stats):
        if run.version == 12 and coordinator.counters.server_failures == 0:
            sigkill(coordinator.server_locations[0])
        return finish(loop, run, stats)

    monkeypatch.setattr(AsyncLoop, "_finish", server_dies_first)
    net = coordinator.run()
    assert np.array_equal(net.params, async_reference)
    assert coordinator.counters.server_failures == 1 and coordinator.counters.steps_replayed == 5


def test_async_with_racing_workers_a_killed_server_applies_no_batch_twice(ray_cluster, tmp_path):
    """With two workers the order of shards is timing's, so where each shard
    stood at the checkpoint is recorded in it (not worked out from the
    version): after the restore every batch is still applied exactly once."""
    records = []
    coordinator = Coordinator(async_spec(workers=2, steps=30), tmp_path / "run",
                              on_step=lambda r: (records.append(r["step"]),
                                                 r["step"] == 9 and sigkill(coordinator.server_locations[0])))
    coordinator.run()
    assert records == list(range(1, 31)) and coordinator.counters.server_failures == 1
    assert len(coordinator.applied_batches) == 30
    each_shards_batches_are_contiguous(coordinator.applied_batches)


def test_async_resumes_each_shard_where_its_checkpoint_says(ray_cluster, tmp_path):
    first = Coordinator(async_spec(workers=2, steps=30), tmp_path / "run",
                        on_event=by_kind(lambda kind, d: kind == "checkpoint" and d["step"] == 12 and first.cancel()))
    with pytest.raises(JobCancelled):
        first.run()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.step == 12 and sum(ckpt.counters["async_taken"]) == 12
    each_shards_batches_are_contiguous(first.applied_batches[:12])
    second = Coordinator(async_spec(workers=2, steps=30), tmp_path / "run")
    second.run(resume=True)
    assert len(second.applied_batches) == 18
    each_shards_batches_are_contiguous(second.applied_batches, first=ckpt.counters["async_taken"])


# ---------------------------------------------------------------- hung workers


def test_a_hung_worker_is_killed_and_replaced_with_the_same_bits(ray_cluster, tmp_path, reference):
    """Worker 1 sleeps 600 s in every step: after worker_timeout_s without a
    step result, the worker still computing is found, killed and replaced,
    and the step is made again; worker 0, idle, stays."""
    events = []
    coordinator = Coordinator(spec(worker_timeout_s=5), tmp_path / "run", start_worker=fault_plan({1: {"delay_s": 600}}),
                              on_event=by_kind(lambda kind, detail: events.append((kind, detail))))
    net = coordinator.run()
    assert np.array_equal(net.params, reference["default"])
    hung = [d for kind, d in events if kind == "hung"]
    assert hung == [{"step": 1, "seconds": 5, "workers": [1]}]
    assert coordinator.counters.hung_workers == 1 and coordinator.counters.worker_failures == 1
    assert sorted(loc["index"] for loc in coordinator.locations.values()) == [0, 1, 2]


def test_async_a_hung_worker_is_replaced_and_its_update_made_again(ray_cluster, tmp_path, async_reference):
    events = []
    coordinator = Coordinator(async_spec(worker_timeout_s=5), tmp_path / "run", start_worker=fault_plan({0: {"delay_s": 600}}),
                              on_event=by_kind(lambda kind, detail: events.append((kind, detail))))
    net = coordinator.run()
    assert np.array_equal(net.params, async_reference)
    assert [d for kind, d in events if kind == "hung"] == [{"step": 1, "seconds": 5, "workers": [0]}]
    assert coordinator.counters.hung_workers == 1 and coordinator.counters.worker_failures == 1


def test_a_step_that_hangs_every_time_fails_the_job_after_three_tries(ray_cluster, tmp_path):
    """Every worker, replacements included, sleeps 600 s per step: rather than
    replace workers for ever, the third hang of step 1 fails the job."""
    events = []
    coordinator = Coordinator(spec(worker_timeout_s=2), tmp_path / "run",
                              start_worker=fault_plan({i: {"delay_s": 600} for i in range(8)}),
                              on_event=by_kind(lambda kind, detail: events.append((kind, detail))))
    with pytest.raises(TrainingError, match=r"step 1 hung 3 times: no result within "
                                            r"resources.worker_timeout_s \(2 s\)"):
        coordinator.run()
    assert [d["workers"] for kind, d in events if kind == "hung"] == [[0, 1], [2, 3], [4, 5]]
    assert coordinator.counters.hung_workers == 6


def test_a_resume_may_change_what_changes_no_arithmetic_and_nothing_else(tmp_path):
    """Checkpoints name the spec they belong to; the worker count, core
    pinning and the worker timeout may differ on resume (the error for a step
    that hangs says to raise the timeout), anything else may not."""
    key = Coordinator(spec(), tmp_path)._spec_key()
    for changed in ({"workers": 3}, {"pin_cores": False}, {"worker_timeout_s": 1200.0}):
        assert Coordinator(spec(**changed), tmp_path)._spec_key() == key, changed
    for changed in ({"batch_size": 120}, {"optimizer": {"name": "adam", "lr": 0.02}}, {"max_nonfinite_steps": 4}):
        assert Coordinator(spec(**changed), tmp_path)._spec_key() != key, changed
    # a checkpoint written when pinning and the timeout were still part of the key
    import json

    from workers.coordinator import _stored_spec_key

    old = spec(pin_cores=False).model_dump(mode="json")
    old["training"]["workers"] = None
    assert _stored_spec_key(json.dumps(old, sort_keys=True)) == key


# The spec key a checkpoint of spec() got from the code before `resources`:
# those fields sat in `training`, the worker count as null.
OLD_LAYOUT_KEY = (
    '{"data": {"classes": 3, "features": 20, "label_column": null, "samples": 2000, "shards": 6, '
    '"source": "digits", "standardize": true, "validation_split": 0.2}, '
    '"model": {"activation": "relu", "bias": true, "hidden": [24], "init": "he", "loss": "cross_entropy", '
    '"output": "softmax"}, "name": "chaos", "seed": 5, '
    '"training": {"batch_size": 96, "checkpoint_every": 4, "cpus_per_worker": 1, "dtype": "float32", '
    '"eval_every": 0, "max_nonfinite_steps": 3, "max_staleness": 4, "mode": "sync", '
    '"optimizer": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-08, "lr": 0.01, "momentum": 0.0, "name": "adam", '
    '"nesterov": false, "schedule": {"gamma": 0.1, "min_lr": 0.0, "name": "constant", "step_size": 100, '
    '"warmup_steps": 0}, "weight_decay": 0.0}, "parameter_servers": 1, "steps": 16, "workers": null}}'
)


def test_a_checkpoint_from_before_resources_still_resumes(tmp_path):
    """Its key, read again, is today's key of the same spec, whatever its
    resources; older still, with pinning, the timeout and two server slices
    in `training`, too; with another batch size it is not."""
    import json

    from workers.coordinator import _stored_spec_key

    key = Coordinator(spec(), tmp_path)._spec_key()
    assert _stored_spec_key(OLD_LAYOUT_KEY) == key
    assert Coordinator(spec(workers=3, parameter_servers=2, pin_cores=False), tmp_path)._spec_key() == key
    older = json.loads(OLD_LAYOUT_KEY)
    older["training"].update(pin_cores=False, worker_timeout_s=5.0, parameter_servers=2)
    assert _stored_spec_key(json.dumps(older, sort_keys=True)) == key
    older["training"]["batch_size"] = 120
    assert _stored_spec_key(json.dumps(older, sort_keys=True)) != key
