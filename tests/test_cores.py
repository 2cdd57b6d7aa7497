"""Workers' cores of their own (workers/cores.py), checked against what the
operating system reports (`sched_getaffinity` of the worker's pid), with real
processes holding real locks."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from core.trainer import train
from workers.cores import claim_cores, lock_dir
from workers.coordinator import Coordinator

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = sorted(os.sched_getaffinity(0))

CLAIMANT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from workers.cores import claim_cores
    claim = claim_cores(int(sys.argv[2]), Path(sys.argv[1]))
    print("none" if claim is None else ",".join(map(str, claim.cores)), flush=True)
    time.sleep(600)
""")


class Claimant:
    """A process that claims cores and holds them until killed."""

    def __init__(self, directory: Path, count: int = 1):
        self.proc = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(directory), str(count)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        self.cores = None if line == "none" else {int(c) for c in line.split(",")}

    def affinity(self) -> set[int]:
        return os.sched_getaffinity(self.proc.pid)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def claimants(tmp_path):
    made: list[Claimant] = []

    def start(count: int = 1) -> Claimant:
        made.append(Claimant(tmp_path / "cores", count))
        return made[-1]

    yield start
    for c in made:
        if c.proc.poll() is None:
            c.kill()


def test_each_claimant_is_pinned_to_a_core_no_other_holds_until_none_is_left(claimants):
    held = [claimants() for _ in ALLOWED]
    assert all(c.cores is not None and len(c.cores) == 1 for c in held)
    assert set().union(*(c.cores for c in held)) == set(ALLOWED)  # disjoint, and every allowed core used
    for c in held:
        assert c.affinity() == c.cores  # every thread is pinned, as the OS sees it
    extra = claimants()
    assert extra.cores is None and extra.affinity() == set(ALLOWED)  # no free core: runs where the OS puts it


def test_a_killed_claimant_frees_its_core_for_the_next(claimants):
    held = [claimants() for _ in ALLOWED]
    victim = held[-1]
    victim.kill()  # SIGKILL: no clean-up code runs; the kernel drops the lock
    after = claimants()
    assert after.cores == victim.cores and after.affinity() == victim.cores


def test_a_multi_core_claim_is_all_or_nothing(claimants, tmp_path):
    if len(ALLOWED) < 2:
        pytest.skip("needs two cores")  # the claim of every core is tested above on any machine
    one = claimants(1)
    rest = claimants(len(ALLOWED) - 1)
    assert rest.cores == set(ALLOWED) - one.cores and rest.affinity() == rest.cores
    rest.kill()
    too_many = claimants(len(ALLOWED))  # one core is still held: claims none, pins nothing
    assert too_many.cores is None and too_many.affinity() == set(ALLOWED)
    # ...and took no lock on the way: the free cores are still claimable
    again = claimants(len(ALLOWED) - 1)
    assert again.cores == set(ALLOWED) - one.cores


def test_a_claim_larger_than_the_allowed_set_pins_nothing(tmp_path):
    assert claim_cores(len(ALLOWED) + 1, tmp_path) is None
    assert os.sched_getaffinity(0) == set(ALLOWED)


def _wait_for_free_cores(timeout: float = 30.0) -> None:
    """Workers of earlier tests release their cores when their processes end,
    which can trail the actor's death in the GCS by a moment."""
    directory = lock_dir()
    deadline = time.monotonic() + timeout
    for core in ALLOWED:
        path = directory / f"core-{core}.lock"
        if not path.exists():
            continue
        fd = os.open(path, os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"core {core} still held by an old worker"
                    time.sleep(0.1)
        finally:
            os.close(fd)


@pytest.mark.ray
@pytest.mark.parametrize("pin", [True, False])
def test_job_workers_run_on_the_cores_they_report_with_the_reference_bits(ray_cluster, tmp_path, pin):
    from tests.test_distributed import small_spec

    if len(ALLOWED) < 2:
        pytest.skip("needs two cores")  # claims themselves are tested above on any machine
    _wait_for_free_cores()
    spec = small_spec(workers=2, pin_cores=pin)
    seen = []
    coordinator = None

    def on_step(record):
        if record["step"] == 2:  # workers are alive: ask the OS where they may run
            seen.extend((loc["cores"], os.sched_getaffinity(loc["pid"])) for loc in coordinator.worker_locations)

    coordinator = Coordinator(spec, tmp_path / "run", on_step=on_step)
    trained = coordinator.run()
    assert len(seen) == 2
    if pin:
        cores = [set(c) for c, _ in seen]  # two cores free: one each
        assert all(len(c) == 1 for c in cores) and not cores[0] & cores[1]
        assert all(set(c) == affinity for c, affinity in seen)
    else:
        assert all(c is None and affinity == set(ALLOWED) for c, affinity in seen)
    reference, _ = train(spec)
    assert np.array_equal(trained.params, reference.params)
