"""Shared fixtures: one real Ray instance (and one 3-raylet cluster) per test
session, each checked after every test that uses it: no actor of ours left
alive and every CPU free again."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Prepared-data caches of this session (core/data_source.py) in a folder of its own, never
# the user's ~/.cache: set before any Ray process starts, so that workers share it.
if "SHARDPROP_CACHE" not in os.environ:
    os.environ["SHARDPROP_CACHE"] = tempfile.mkdtemp(prefix="shardprop-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SHARDPROP_CACHE"], True)

def _our_live_actors():
    # Straight from the GCS: the dashboard's state API is not started (it costs
    # a core's worth of CPU on this 2-core machine) and is flaky under load.
    from ray._private import state

    return [a for a in state.actors().values()
            if a["State"] != "DEAD" and a["ActorClassName"] in ("GradientWorker", "FaultyGradientWorker", "ParameterServer")]


def assert_cluster_clean(timeout: float = 30.0) -> None:
    """Wait (briefly) for killed actors to release their CPUs, then insist."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        free = ray.available_resources().get("CPU", 0)
        alive = _our_live_actors()
        if free == total and not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster not clean: {free}/{total} CPUs free, live actors {alive}")
        time.sleep(0.25)


@pytest.fixture(scope="session")
def ray_cluster_session():
    """Three raylets on this machine standing in for three machines (2 CPUs
    each; the head holds none), with fast failure detection. One per test
    session: every Ray test attaches to it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": {
            "health_check_period_ms": 500, "health_check_failure_threshold": 3,
            "health_check_initial_delay_ms": 0,
        }},
    )
    for _ in range(3):
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1"}},
             log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_cluster(ray_cluster_session):
    """The session's cluster, checked clean after the test."""
    yield ray_cluster_session
    assert_cluster_clean()


@pytest.fixture
def ray_local(ray_cluster):
    """The session's Ray address (a string for `ray.init(address=...)`)."""
    yield ray_cluster.address


@dataclass(frozen=True)
class RayHead:
    address: str  # host:port of its GCS
    log: Path  # what `ray start` printed


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A one-machine `ray start --head` cluster with 2 CPUs on loopback, the
    bare-machine command of docs/deploy.md, shared by the tests that attach
    to one (tests/test_attached.py, tests/test_deploy.py). Its port and
    --temp-dir are its own, and it is ended by its process group, never
    `ray stop` (which would end every Ray here)."""
    from tests.service_helpers import stop_process_group
    from tests.test_dashboard import free_port

    tmp = tmp_path_factory.mktemp("head")
    port, log = free_port(), tmp / "head.log"
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={tmp / 'ray'}", "--block"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=tmp)
    try:
        time.sleep(3)
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        yield RayHead(f"127.0.0.1:{port}", log)
    finally:
        stop_process_group(proc)
