"""Jobs on a real network: three namespace hosts (tests/netns_cluster.py),
with links cut and shaped while a job runs.

Every job ends with the single-process reference trainer's bits and each
step reported exactly once, whatever is cut and when: a worker's host
mid-run (noticed by Ray's node failure detection, not by the 600 s hang
watchdog; the host used again once it rejoins), the host of the parameter
server (restore and replay), a host during start-up placement, and a lossy,
slow link for a whole run. The worker host is joined through our link
emulator (tests/link_emulator.py: this kernel has no netem), unshaped but
for that last test. The drivers run on host 0, Ray's head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.mlp import MLP
from core.spec import parse_spec
from core.trainer import train
from tests.link_emulator import LinkShape
from tests.netns_cluster import ENV, ROOT, NetnsCluster, end_group, unavailable_reason

pytestmark = [pytest.mark.multihost, pytest.mark.slow,
              pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")]

STEPS = 30
REJOIN_SETTLE_S = 5.0
SPEC = {
    "name": "multihost", "seed": 3,
    "data": {"source": "synthetic", "samples": 600, "features": 8, "classes": 3, "validation_split": 0.0,
             "shards": 6},
    "model": {"hidden": [8]},
    "training": {"steps": STEPS, "batch_size": 16, "eval_every": 0, "checkpoint_every": 5,
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    # the watchdog's limit stays far beyond a test's length: a cut host must
    # be noticed by Ray's failure detection, never by a hang
    "resources": {"workers": 3, "worker_timeout_s": 600},
}
WORKER_HOST, SERVER_HOST = 2, 1


@pytest.fixture(scope="session")
def hosts():
    """Three hosts of 1 CPU each, the worker host's link emulated; afterwards
    nothing of them is left (namespaces, links, TAPs, Ray, the emulator)."""
    cluster = NetnsCluster([1, 1, 1], emulated=[WORKER_HOST])
    with cluster:
        yield cluster
    assert cluster.leftovers() == []


@pytest.fixture
def three_hosts(hosts):
    """The cluster with its three hosts up (a test that cuts one rejoins it
    itself; one whose rejoin failed is rejoined here)."""
    for i in range(3):
        if hosts.ip(i) not in hosts.nodes():
            hosts.rejoin(i)
    hosts.wait_nodes(3)
    return hosts


@pytest.fixture(scope="module")
def reference():
    return train(parse_spec(SPEC))[0].params


class Driver:
    """tests/netns_driver.py running a job on host 0."""

    def __init__(self, hosts: NetnsCluster, folder: Path, *args: str):
        self.folder = folder
        (folder / "job.json").write_text(json.dumps(SPEC))
        cmd = [sys.executable, str(ROOT / "tests" / "netns_driver.py"), hosts.address, str(folder / "job.json"),
               str(folder / "result.json"), *args]
        self.log = open(folder / "driver.log", "wb")
        self.proc = subprocess.Popen(hosts.prefix(0) + cmd, stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
                                     cwd=ROOT, start_new_session=True)

    def paused(self, name: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not (self.folder / f"at-{name}").exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"never reached {name}: {self.tail()}"
            time.sleep(0.1)

    def go(self, name: str) -> None:
        (self.folder / f"go-{name}").write_text("")

    def result(self, timeout: float = 400) -> dict:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        assert code == 0, self.tail()
        result = json.loads((self.folder / "result.json").read_text())
        result["params"] = np.load(self.folder / "params.npy", allow_pickle=False)
        return result

    def tail(self) -> str:
        return (self.folder / "driver.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def events(result: dict, kind: str) -> list[dict]:
    return [e for e in result["events"] if e["kind"] == kind]


def assert_reference_run(result: dict, reference: np.ndarray) -> None:
    assert np.array_equal(result["params"], reference), "the trained bits differ from the reference trainer's"
    assert result["steps"] == list(range(1, STEPS + 1)), "each step reported once, in order"


def test_train_attached_across_three_hosts_gives_the_reference_bits(three_hosts, tmp_path):
    (tmp_path / "job.json").write_text(json.dumps(SPEC))
    shardprop = str(Path(sys.executable).parent / "shardprop")
    common = ["train", str(tmp_path / "job.json"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    attached = subprocess.run(three_hosts.prefix(0) + [shardprop, *common, "--address", three_hosts.address,
                                                       "--out", str(tmp_path / "attached.npz")],
                              capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=400)
    assert attached.returncode == 0, attached.stderr[-3000:]
    ref = subprocess.run([shardprop, *common, "--reference", "--out", str(tmp_path / "reference.npz")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=400)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert np.array_equal(MLP.load(tmp_path / "attached.npz").params, MLP.load(tmp_path / "reference.npz").params)


def test_worker_host_cut_mid_run_is_survived_and_used_again_after_it_rejoins(three_hosts, tmp_path, reference):
    driver = Driver(three_hosts, tmp_path, "--pause", "5:cut", "--pause", "15:rejoin", "--linger", "0.3")
    try:
        driver.paused("cut")
        three_hosts.cut(WORKER_HOST)
        cut_at = time.time()
        driver.go("cut")
        driver.paused("rejoin")  # steps 6-15 ran without the cut host
        three_hosts.rejoin(WORKER_HOST)
        # A node placed on within a moment of joining was seen to end at once
        # here (Ray 2.60: its raylet terminated as the job's new worker came;
        # not found why), failing the use of the host; let it settle first.
        time.sleep(REJOIN_SETTLE_S)
        driver.go("rejoin")
        result = driver.result()
    finally:
        driver.stop()
    assert_reference_run(result, reference)
    started = events(result, "workers")
    assert len(started[0]["nodes"]) == 3, "the job began on all three hosts"
    recovered = events(result, "recovery")
    assert recovered and recovered[0]["workers"] == 2, "it went on with the two hosts left"
    # noticed as a dead node (Ray's failure detection), not as a hang
    assert result["counters"]["hung_workers"] == 0 and result["counters"]["worker_failures"] >= 1
    print(f"cut noticed and healed {recovered[0]['time'] - cut_at:.1f} s after the cut")
    rejoined = result["nodes"][three_hosts.ip(WORKER_HOST)]
    assert any(loc["node_id"] == rejoined for loc in result["locations"].values()), \
        f"a worker ran on the host after it rejoined: resizes {events(result, 'resize')}, " \
        f"workers at the end {result['locations']}, the host's node {rejoined}"
    assert events(result, "resize")[-1]["after"] == 3


def run_with_cut(driver, hosts, host: int, pause: str) -> dict:
    """The driver's result when `host` is cut while the driver waits at
    `pause`; the host rejoins after the job, whatever happened."""
    try:
        driver.paused(pause)
        hosts.cut(host)
        driver.go(pause)
        return driver.result()
    finally:
        driver.stop()
        hosts.rejoin(host)


def test_parameter_server_host_cut_is_restored_and_replayed(three_hosts, tmp_path, reference):
    driver = Driver(three_hosts, tmp_path, "--servers-on", three_hosts.ip(SERVER_HOST), "--pause", "8:cut")
    result = run_with_cut(driver, three_hosts, SERVER_HOST, "cut")
    assert_reference_run(result, reference)
    recovered = events(result, "recovery")
    assert any(r["servers"] for r in recovered), "the server's loss was seen and it was restored"
    cut_node = result["nodes"][three_hosts.ip(SERVER_HOST)]  # (its Ray is started again only after the job)
    assert result["servers"]["first"][0]["node_id"] == cut_node, "the server began on the host then cut"
    assert result["servers"]["last"][0]["node_id"] != cut_node, "and was restored on another"
    assert result["counters"]["server_failures"] >= 1 and result["counters"]["steps_replayed"] >= 1


def test_host_cut_during_start_up_placement_is_survived(three_hosts, tmp_path, reference):
    result = run_with_cut(Driver(three_hosts, tmp_path, "--pause-placed", "placed"), three_hosts, WORKER_HOST,
                          "placed")
    assert_reference_run(result, reference)
    assert len(events(result, "workers")[0]["nodes"]) == 2, "it started on the two hosts left"


def test_lossy_slow_link_for_a_whole_run_gives_the_reference_bits(three_hosts, tmp_path, reference):
    """5% of frames lost and 20 ms of delay, each way, on the worker host's
    link from before the job starts until it ends."""
    lossy = LinkShape(delay_ms=20, loss=0.05)
    before = three_hosts.shape(WORKER_HOST, lossy, seed=15)
    try:
        result = Driver(three_hosts, tmp_path).result()
        after = three_hosts.link_counts(WORKER_HOST)
    finally:
        three_hosts.shape(WORKER_HOST)
    assert_reference_run(result, reference)
    assert len(events(result, "workers")[0]["nodes"]) == 3, "the job ran on all three hosts"
    lost = {way: after[way]["dropped"] - before[way]["dropped"] for way in ("to_host", "from_host")}
    passed = {way: after[way]["passed"] - before[way]["passed"] for way in ("to_host", "from_host")}
    print(f"frames through the lossy link: passed {passed}, lost {lost}; counters {result['counters']}")
    assert all(lost.values()), "frames were lost both ways while the job ran"


SERVICE_HOST = 1
CLIENT = """
import httpx, json, sys, time
url, what = "http://127.0.0.1:8470", sys.argv[1]
end = time.time() + float(sys.argv[2])
def health():
    while True:
        try:
            r = httpx.get(url + "/healthz", timeout=10)
            return r.status_code, r.json()["ray"]
        except httpx.TransportError:
            if time.time() > end: raise
            time.sleep(0.5)
if what == "job":
    health()
    job = httpx.post(url + "/v1/jobs", json=json.loads(sys.argv[3]), timeout=30).json()
    while httpx.get(url + "/v1/jobs/" + job["id"], timeout=30).json()["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() < end, "job not done in time"
        time.sleep(0.5)
    state = httpx.get(url + "/v1/jobs/" + job["id"], timeout=30).json()
    open(sys.argv[4], "wb").write(httpx.get(url + "/v1/jobs/" + job["id"] + "/model", timeout=30).content)
    print(json.dumps({"state": state["state"], "health": health()}))
else:  # wait until /healthz's ray field starts (or stops) with `what`
    while True:
        code, ray = health()
        if ray.startswith(what) or time.time() > end:
            print(json.dumps([code, ray])); break
        time.sleep(0.5)
"""


def test_a_service_on_its_own_host_runs_a_job_and_its_healthz_says_when_the_head_is_cut_off(
        three_hosts, tmp_path, reference):
    shardprop = str(Path(sys.executable).parent / "shardprop")
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(three_hosts.prefix(SERVICE_HOST) + [
        shardprop, "serve", "--port", "8470", "--ray-address", three_hosts.address,
        "--store", str(tmp_path / "shardprop.db")], stdout=log, stderr=subprocess.STDOUT, env=ENV,
        start_new_session=True)
    try:
        done = json.loads(three_hosts.run(SERVICE_HOST, CLIENT, "job", "300", json.dumps(SPEC),
                                          str(tmp_path / "model.npz"), timeout=400).splitlines()[-1])
        assert done == {"state": "succeeded", "health": [200, "connected"]}
        assert np.array_equal(MLP.load(tmp_path / "model.npz").params, reference)
        three_hosts.cut(0)
        try:
            cut = json.loads(three_hosts.run(SERVICE_HOST, CLIENT, "unreachable", "60").splitlines()[-1])
        finally:
            three_hosts.heal(0)
        assert cut[0] == 200 and cut[1].startswith("unreachable: "), cut
        healed = json.loads(three_hosts.run(SERVICE_HOST, CLIENT, "connected", "60").splitlines()[-1])
        assert healed == [200, "connected"]
    finally:
        end_group(serve)
        log.close()
