"""Cores of its own for each gradient worker.

Ray leaves placement on a node to the operating system. On a node whose cores
are all busy that goes wrong for data-parallel training: besides the workers,
the parameter server and the coordinator are runnable most of the time (a
compiled graph's readers wait by polling), the kernel's load balancer counts
them as load, and for runs of dozens of steps it keeps two workers on one core
while the other core holds the waiting actors. Every such step computes at
half speed, and a synchronous step is as slow as its slowest worker. Measured
on this 2-core machine (docs/benchmarks.md), a third of the steps of a
2-worker job took twice as long.

So a worker pins itself to cores that no other worker of this user on the
machine holds, when there are enough of them, and otherwise runs where the
kernel puts it. A claim is an exclusive `flock` on one lock file per core:
the kernel drops it when the worker's process ends, however it ends, and an
unpinned worker tries again (GradientWorker.step), so a killed worker's core
goes to its replacement. Pinning changes
where a shard is computed, never what: each shard still uses one BLAS thread,
so the bits do not depend on it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from workers.shared import fcntl, try_lock  # fcntl is None on a non-POSIX system: nothing is pinned


def lock_dir() -> Path:
    """Where this user's core claims live on this machine (shared by every
    Ray node the machine runs)."""
    return Path(tempfile.gettempdir()) / f"shardprop-cores-{os.getuid()}"


class CoreClaim:
    """Cores held by this process: pinned to, and locked against other workers."""

    def __init__(self, cores: tuple[int, ...], fds: list[int]):
        self.cores = cores
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the only descriptor drops its flock
        self._fds = []


def _pin_process(cores: set[int]) -> None:
    """Pin every thread of this process (affinity is per thread on Linux;
    threads started later inherit their creator's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def claim_cores(count: int, directory: Path | None = None) -> CoreClaim | None:
    """Pin this process to `count` cores no other claimant holds, or return None
    (and pin nothing) when fewer than `count` are free or the platform cannot
    pin. Cores outside this process's allowed set (a container's cpuset, a
    `taskset`) are never taken."""
    if count < 1 or fcntl is None or not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if count > len(allowed):
        return None
    directory = directory or lock_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(directory)
    except OSError:
        return None
    # Only a private directory of this user's: in a shared /tmp another user
    # could otherwise hold the locks, or swap the files under them.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    held: list[tuple[int, int]] = []
    for core in allowed:
        try:
            fd = try_lock(directory / f"core-{core}.lock")
        except OSError:
            continue
        if fd is None:  # another worker holds it
            continue
        held.append((core, fd))
        if len(held) == count:
            break
    claim = CoreClaim(tuple(c for c, _ in held), [fd for _, fd in held])
    if len(held) < count:
        claim.release()
        return None
    try:
        _pin_process(set(claim.cores))
    except OSError:
        try:
            _pin_process(set(allowed))
        except OSError:
            pass
        claim.release()
        return None
    return claim
