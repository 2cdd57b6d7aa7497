"""A partition that heals, on a real network (tests/netns_cluster.py): a
worker's host is cut mid-run, the job goes on without it, then the link
comes back with the cut host's old processes still running (its raylet,
its worker), and later its Ray is started again and the job grows back.

Whatever the old worker still sends is refused by membership epochs
(workers/fencing.py), not by what Ray has declared. The job ends with the
reference trainer's bits; its stored history (service/store.py, written as
the scheduler writes it) holds steps 1..n exactly once; its events show the
epoch advancing at each change of its actors, and any refusal names an
epoch older than the job's then.

This cluster has names and a subnet of its own (module-scoped), so it never
meets tests/test_multihost.py's, nor another run's of that file.
"""

from __future__ import annotations

import time

import pytest

from core.spec import parse_spec
from core.trainer import train
from service.store import Store
from tests.netns_cluster import Naming, NetnsCluster, unavailable_reason
from tests.test_multihost import SPEC, STEPS, WORKER_HOST, Driver, assert_reference_run

pytestmark = [pytest.mark.multihost, pytest.mark.slow,
              pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")]

FENCING = Naming("sptest-f", "spfnc", "spfencebr", "10.251.89")


@pytest.fixture(scope="module")
def hosts():
    """Three hosts of 1 CPU each; afterwards nothing of them is left."""
    cluster = NetnsCluster([1, 1, 1], FENCING)
    with cluster:
        cluster.wait_nodes(3)
        yield cluster
    assert cluster.leftovers() == []


@pytest.fixture(scope="module")
def reference():
    return train(parse_spec(SPEC))[0].params


def test_a_worker_host_partition_that_heals_is_fenced_off_and_each_step_is_stored_once(hosts, tmp_path, reference):
    store_path = tmp_path / "store.db"
    driver = Driver(hosts, tmp_path, "--store", str(store_path),
                    "--pause", "5:cut", "--pause", "12:heal", "--pause", "20:rejoin")
    try:
        driver.paused("cut")
        hosts.cut(WORKER_HOST)
        driver.go("cut")
        driver.paused("heal")  # steps 6-12 ran without the cut host, which Ray has declared dead
        healed_at = time.time()
        hosts.heal(WORKER_HOST)  # its link back, its old raylet and worker still running
        driver.go("heal")
        driver.paused("rejoin")
        hosts.rejoin(WORKER_HOST)  # its Ray started afresh: the job grows back onto it
        driver.go("rejoin")
        result = driver.result()
    finally:
        driver.stop()
        if hosts.ip(WORKER_HOST) not in hosts.nodes():
            hosts.rejoin(WORKER_HOST)
    assert_reference_run(result, reference)

    store = Store(store_path)
    try:
        job = result["job_id"]
        assert [r["step"] for r in store.metrics(job)] == list(range(1, STEPS + 1)), "each step stored once"
        assert store.missing_steps(job) == 0
        stored = store.events(job)
    finally:
        store.close()
    assert not [e for e in stored if e["kind"] == "record_refused"], "no step was reported twice"

    epochs = [e["detail"] for e in stored if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)), "one epoch per change, in order"
    assert epochs[0]["reason"] == "start" and len(epochs[0]["workers"]) == 3
    after_cut = epochs[1]
    assert after_cut["reason"] in ("recovery", "restore") and len(after_cut["workers"]) == 2, \
        "the job went on with the two hosts left, in a new epoch"
    (cut_worker,) = set(epochs[0]["workers"]) - set(after_cut["workers"])
    grown = epochs[-1]
    assert grown["reason"] == "resize" and len(grown["workers"]) == 3 and cut_worker not in grown["workers"], \
        "it grew back onto the rejoined host with a new worker, in a newer epoch"
    assert result["counters"]["epoch"] == grown["epoch"]
    # anything of the old membership that got through was refused, never applied (the bits above say so too)
    refused = [e["detail"] for e in stored if e["kind"] == "stale_refused"]
    assert all(r["epoch"] < r["current"] for r in refused), refused
    assert result["counters"]["fenced"] == len(refused)
    print(f"epochs {[(e['epoch'], e['reason'], e['step']) for e in epochs]}; {len(refused)} refusal(s); "
          f"healed {healed_at - result['events'][0]['time']:.1f} s into the run")
