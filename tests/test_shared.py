"""Shared parameter and gradient files (workers/shared.py): what one process
writes another reads, byte for byte; readers cannot write; space is checked
before use; a dead driver's directory is swept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from workers import shared

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_written_here_are_read_in_another_process(tmp_path, dtype):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 1001)).astype(dtype)
    rows = shared.create(tmp_path / "g", 3, 1001, np.dtype(dtype))
    rows[:] = data
    handles = [shared.SharedArray(str(tmp_path / "g"), np.dtype(dtype).str, 1001, i) for i in range(3)]
    reader = textwrap.dedent("""
        import json, sys
        from workers import shared
        views = shared.SharedViews()
        handles = [shared.SharedArray(*h) for h in json.loads(sys.argv[1])]
        sys.stdout.write(b"".join(shared.resolve(h, views).tobytes() for h in handles).hex())
    """)
    sent = json.dumps([[h.path, h.dtype, h.length, h.row] for h in handles])
    out = subprocess.run([sys.executable, "-c", reader, sent], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert bytes.fromhex(out) == data.tobytes()


def test_views_are_read_only_and_follow_in_place_updates(tmp_path):
    rows = shared.create(tmp_path / "p", 1, 10, np.dtype("float32"))
    rows[0] = np.arange(10, dtype=np.float32)
    views = shared.SharedViews()
    view = views.view(shared.SharedArray(str(tmp_path / "p"), "<f4", 10))
    with pytest.raises(ValueError):
        view[0] = 1.0
    rows[0] *= 2  # the owner updates in place, as a server applies a step
    assert np.array_equal(view, 2 * np.arange(10, dtype=np.float32))


def test_a_removed_file_stays_readable_by_whoever_mapped_it(tmp_path):
    rows = shared.create(tmp_path / "p", 1, 4, np.dtype("float64"))
    rows[0] = [1, 2, 3, 4]
    views = shared.SharedViews()
    view = views.view(shared.SharedArray(str(tmp_path / "p"), "<f8", 4))
    shared.remove_job_dir(tmp_path)
    assert not tmp_path.exists() and view.tolist() == [1, 2, 3, 4]


def test_resolve_passes_arrays_through():
    a = np.ones(3)
    assert shared.resolve(a, shared.SharedViews()) is a


def test_no_directory_when_the_file_system_lacks_the_room(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert shared.make_job_dir(free, tmp_path) is None  # twice the need must be free
    assert shared.make_job_dir(1 << 20, tmp_path / "missing") is None
    made = shared.make_job_dir(1 << 20, tmp_path)
    assert made is not None and made.parent == tmp_path and made.stat().st_mode & 0o777 == 0o700


def test_an_existing_file_is_never_reused(tmp_path):
    shared.create(tmp_path / "p", 1, 4, np.dtype("float32"))
    with pytest.raises(FileExistsError):
        shared.create(tmp_path / "p", 1, 4, np.dtype("float32"))


def test_directories_whose_driver_is_gone_are_swept_and_live_ones_kept(tmp_path):
    """Liveness is the driver's lock on the directory's owner file, which the
    kernel drops when the driver ends: no pid is trusted."""
    uid = os.getuid()
    mine = shared.make_job_dir(1 << 10, tmp_path)  # this process's, lock held
    stale = tmp_path / f"shardprop-{uid}-999999-deadbeef"  # owner file, lock free: its driver ended
    held = tmp_path / f"shardprop-{uid}-{os.getpid()}-cafef00d"  # locked by another live process
    other = tmp_path / f"shardprop-{uid + 1}-1-0badcafe"  # another user's: not ours to judge
    for d in (stale, held, other):
        d.mkdir()
        (d / shared.OWNER_LOCK).touch()
        (d / "server-0-x.params").write_bytes(b"\0" * 8)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(held / shared.OWNER_LOCK)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert shared.sweep_stale(tmp_path) == [stale]
        assert not stale.exists() and held.exists() and other.exists() and mine.exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert shared.sweep_stale(tmp_path) == [held]  # its driver is gone now
    shared.remove_job_dir(mine)
    assert not mine.exists()


def test_ray_semaphores_of_dead_creators_are_swept_and_the_rest_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f"sem.hdr{dead.pid}-1795931710237956838": False,  # dead creator: swept
        f"sem.obj{dead.pid}-1795931710237956838": False,
        f"sem.hdr{os.getpid()}-1795931710234497810": True,  # live creator: kept
        f"sem.mp-{dead.pid}": True,  # not Ray's pattern
        "pulse-shm-1315324054": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"\0" * 32)
    assert shared.sweep_dead_ray_semaphores(tmp_path) == 2
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
