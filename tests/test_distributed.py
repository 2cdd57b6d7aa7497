"""Distributed synchronous training on a real Ray cluster: the same bits as
core's reference trainer whatever the worker count, placement or server count."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.spec import parse_spec
from core.trainer import TrainingError, train
from workers.checkpoint import list_checkpoints, read_checkpoint
from workers.coordinator import Coordinator, JobCancelled
from run_helpers import by_kind, fault_plan
from spec_helpers import place

pytestmark = [pytest.mark.ray]

OPTIMIZERS = {
    "sgd": {"name": "sgd", "lr": 0.1},
    "momentum": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "adam": {"name": "adam", "lr": 0.01, "weight_decay": 1e-3, "schedule": {"name": "cosine", "warmup_steps": 3}},
}


def small_spec(dtype="float32", optimizer="momentum", workers=2, shards=4, **training):
    return parse_spec(place({
        "name": "equivalence", "seed": 3,
        "data": {"source": "digits", "shards": shards, "validation_split": 0.2},
        "model": {"hidden": [32, 16], "activation": "tanh"},
        "training": {"batch_size": 101, "steps": 12, "dtype": dtype,
                     "optimizer": OPTIMIZERS[optimizer], "eval_every": 5, "checkpoint_every": 4},
    }, workers=workers, **training))


def run_side_by_side(*coordinators: Coordinator) -> list:
    """Run jobs at once, each in a thread of this driver, as a service with
    --max-concurrent-jobs above 1 does; their results in order. Together they
    must fit the session cluster's 6 CPUs (a job waits for all of its own)."""
    with ThreadPoolExecutor(len(coordinators)) as pool:
        return list(pool.map(lambda c: c.run(), coordinators))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_any_worker_count_gives_the_reference_bits(ray_cluster, tmp_path, dtype, optimizer):
    reference, ref_history = train(small_spec(dtype, optimizer))
    records = {w: [] for w in (1, 2, 3, 4)}  # 4 == S: one shard per worker
    jobs = {w: Coordinator(small_spec(dtype, optimizer, w), tmp_path / f"w{w}", on_step=records[w].append)
            for w in records}
    # 1 + 2 + 3 workers fill the cluster's 6 CPUs, then 4 workers alone; the
    # bits may not depend on what else runs beside a job
    nets = dict(zip((1, 2, 3), run_side_by_side(jobs[1], jobs[2], jobs[3])))
    nets[4] = jobs[4].run()
    for workers, net in nets.items():
        seen = records[workers]
        assert {r["workers"] for r in seen} == {workers}  # all of them, with another job beside it
        assert net.params.dtype == np.dtype(dtype)
        assert np.array_equal(net.params, reference.params), f"{workers} workers differ from the reference"
        assert [r["loss"] for r in seen] == [r["loss"] for r in ref_history]
        assert [r["val_accuracy"] for r in seen] == [r["val_accuracy"] for r in ref_history]


def test_workers_spread_over_nodes_and_two_servers_give_the_same_bits(ray_cluster, tmp_path):
    reference, _ = train(small_spec(workers=3))
    jobs = [Coordinator(small_spec(workers=3, parameter_servers=servers), tmp_path / f"ps{servers}")
            for servers in (1, 2)]
    for coordinator, net in zip(jobs, run_side_by_side(*jobs)):  # 3 + 3 workers on three 2-CPU nodes
        assert len(coordinator.counters.nodes) >= 2, coordinator.counters.nodes
        assert np.array_equal(net.params, reference.params)


def test_resume_after_a_stop_gives_the_same_bits(ray_cluster, tmp_path):
    reference, _ = train(small_spec())
    stopped = {}

    def stop_after_step_8(kind, detail):
        if kind == "checkpoint" and detail["step"] == 8:
            stopped["at"] = detail["step"]
            coordinator.cancel()

    coordinator = Coordinator(small_spec(), tmp_path / "run", on_event=by_kind(stop_after_step_8))
    with pytest.raises(JobCancelled):
        coordinator.run()
    assert stopped == {"at": 8}
    assert read_checkpoint(list_checkpoints(tmp_path / "run")[-1]).step == 8
    resumed_from = []
    net = Coordinator(small_spec(workers=3), tmp_path / "run",
                      on_event=by_kind(lambda k, d: k == "resumed" and resumed_from.append(d["step"]))).run(resume=True)
    assert resumed_from == [8]
    assert np.array_equal(net.params, reference.params)


def test_a_worker_that_raises_fails_the_job_naming_worker_shard_and_step(ray_cluster, tmp_path):
    coordinator = Coordinator(small_spec(), tmp_path / "run", start_worker=fault_plan({1: {"fail_at": [3, 5]}}))
    with pytest.raises(TrainingError, match=r"worker 1, shard 3, step 6"):
        coordinator.run()


def test_non_finite_rows_fail_the_job_naming_worker_shard_and_step(ray_cluster, tmp_path):
    coordinator = Coordinator(small_spec(), tmp_path / "run", start_worker=fault_plan({0: {"nan_rows_at": [2, 7]}}))
    with pytest.raises(TrainingError, match=r"worker 0, shard 2, step 8.*non-finite"):
        coordinator.run()


def test_records_carry_phase_timings_and_throughput(ray_cluster, tmp_path):
    records = []
    Coordinator(small_spec(), tmp_path / "run", on_step=records.append).run()
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:
        assert set(r["phases"]) == {"compute", "transfer", "reduce_apply", "wait"}
        assert all(v >= 0 for v in r["phases"].values()) and r["phases"]["compute"] > 0
        assert r["samples"] == 101 and r["samples_per_s"] > 0 and r["workers"] == 2


def test_a_cancel_is_seen_while_workers_wait_for_cpus(ray_cluster, tmp_path):
    import threading
    import time

    # 3 CPUs per worker on 2-CPU nodes: the workers can never be placed
    coordinator = Coordinator(small_spec(cpus_per_worker=3), tmp_path / "run")
    threading.Timer(1.0, coordinator.cancel).start()
    began = time.monotonic()
    with pytest.raises(JobCancelled, match="while its workers were starting"):
        coordinator.run()
    assert time.monotonic() - began < 20


def test_the_data_limits_given_are_enforced_by_every_worker_too(ray_cluster, tmp_path):
    """The service's limits reach the workers: a worker started with a row
    limit the data exceeds fails the job with the loader's message."""
    from core.datafiles import DataLimits
    from workers.pool import start_gradient_worker

    given = []

    def start_tight_second_worker(spec, index, roots, cpus, limits):
        given.append(limits)
        return start_gradient_worker(spec, index, roots, cpus, DataLimits(max_rows=100) if index == 1 else limits)

    generous = DataLimits(max_rows=5000)
    with pytest.raises(TrainingError, match="1797 rows"):
        Coordinator(small_spec(), tmp_path / "run", data_limits=generous, start_worker=start_tight_second_worker).run()
    assert given and all(limits == generous for limits in given)
