"""Zero-copy parameters and gradients between actors on one machine.

When every actor of a job shares the driver's node, in a Ray instance the
driver started, each step's graph is compiled to Ray's shared-memory
channels. Those carry the step's control messages well, but every array
written to one is serialized and copied in,
and measured here that cost about 0.35 ms per MB per hop on an idle machine,
and 1.8 ms of a loaded 2-worker step of 1 MB of parameters (docs/benchmarks.md).
So the arrays themselves live in files on a memory file system
(`/dev/shm`), one directory per job:

- each parameter server keeps its slice of the parameters in a file of its
  own and applies the optimizer to it in place; `publish_step` sends a
  `SharedArray` handle, and workers map the file read-only;
- each worker computes its shard gradients straight into a file of its own
  (one row per shard) and sends handles; the servers reduce straight from
  those rows.

Nothing is read while it is written: a worker reads the parameters only
between `publish_step` and its reply, and the servers change them only after
every worker has replied; a worker rewrites its rows only after the next
`publish_step`, which comes after the servers' reduce. A worker replaced
after a failure gets new files (worker indices are never reused), so a dying
worker's last write can land only in a file nobody reads again.

The direct step graph of an attached driver (workers.step_graph) uses the
same files between the actors on the driver's node, with the same rule
kept by other means: a worker maps the parameters once the server's array
service says the step's are offered (the commit of the step before offers
them, after every worker's rows of that step were read), and is done with
them before it offers its own result; a server finds a worker's rows by the
file its summary names (`OwnedFile.made`, `path_in`).

Space for shardprop's own files is reserved up front (`posix_fallocate`): a
full file system is an `OSError` at creation, not a SIGBUS later, and a job
falls back to sending arrays through the channels. The coordinator removes
the job's directory when the job ends, and drops a removed worker's file at
once; a directory whose driver died (its owner lock free) is swept by the
next job of the same user.
"""

from __future__ import annotations

import mmap
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not a POSIX system: arrays go through Ray's channels
    fcntl = None

DEFAULT_ROOT = Path("/dev/shm")
PREFIX = "shardprop-"


@dataclass(frozen=True)
class SharedArray:
    """A handle to row `row` (of `length` items) of a shared file."""

    path: str
    dtype: str
    length: int
    row: int = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


# Job directories this process made -> the descriptor holding its owner lock.
_owned: dict[Path, int] = {}
OWNER_LOCK = ".owner"


def try_lock(path: Path) -> int | None:
    """An exclusive `flock` on `path` (made if missing, never through a
    symlink), as an open descriptor; None if another process holds it. The
    kernel drops the lock when the descriptor is closed or its process ends,
    however it ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale(root: Path = DEFAULT_ROOT) -> list[Path]:
    """Remove this user's job directories whose driver is gone.

    A driver holds a `flock` on its directory's owner file for as long as it
    lives (the kernel drops it however the driver ends), so a directory whose
    lock can be taken is stale, whatever pid namespace its driver ran in."""
    removed = []
    try:
        entries = [e for e in root.glob(f"{PREFIX}{_uid()}-*") if e.is_dir() and not e.is_symlink()]
    except OSError:
        return removed
    for entry in entries:
        if entry in _owned:
            continue
        try:
            fd = try_lock(entry / OWNER_LOCK)
        except OSError:
            continue
        if fd is None:
            continue  # its driver is alive
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
        removed.append(entry)
    return removed


def sweep_dead_ray_semaphores(root: Path = DEFAULT_ROOT) -> int:
    """Remove the named semaphores (`sem.hdr<pid>-*`, `sem.obj<pid>-*`) that
    Ray's compiled-graph channels left behind, once the process that made
    them (a raylet) is gone. Ray 2.60 leaves about 30 of these per compiled
    graph (a page of the memory file system each) and never removes them.
    Only this user's, only a dead creator's: a process that still has one
    open keeps it, since removing a name does not close the semaphore.
    Returns how many were removed."""
    removed = 0
    alive: dict[int, bool] = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith("sem.hdr") or name.startswith("sem.obj")) or "-" not in name:
            continue
        try:
            pid = int(name[7:name.index("-")])
            if entry.stat(follow_symlinks=False).st_uid != _uid():
                continue
        except (ValueError, OSError):
            continue
        if pid not in alive:
            alive[pid] = _pid_alive(pid)
        if not alive[pid]:
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def make_job_dir(needed_bytes: int, root: Path = DEFAULT_ROOT) -> Path | None:
    """A new directory for one job's shared arrays, owned (locked) by this
    process until `remove_job_dir`; or None when `root` is not there or has
    less than twice `needed_bytes` free (the job then sends arrays through
    Ray's channels)."""
    if fcntl is None:
        return None
    sweep_stale(root)
    try:
        stat = os.statvfs(root)
    except OSError:
        return None
    if stat.f_bavail * stat.f_frsize < 2 * needed_bytes:
        return None
    path = root / f"{PREFIX}{_uid()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(mode=0o700)
        fd = try_lock(path / OWNER_LOCK)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return None
    if fd is None:  # cannot happen for a new directory; be safe anyway
        return None
    _owned[path] = fd
    return path


def remove_job_dir(path: Path | None) -> None:
    if path is None:
        return
    shutil.rmtree(path, ignore_errors=True)
    fd = _owned.pop(path, None)
    if fd is not None:
        os.close(fd)


def _map(path: str, size: int, writable: bool) -> np.ndarray:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)  # the mapping stays valid, even after the file is removed
    return np.frombuffer(mapped, dtype=np.uint8)


def create(path: Path, rows: int, length: int, dtype: np.dtype) -> np.ndarray:
    """A new shared file of `rows` x `length` items, mapped writable; raises
    OSError when the space cannot be reserved."""
    size = rows * length * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    try:
        mapped = _map(str(path), max(size, 1), writable=True)
    except OSError:
        os.unlink(path)
        raise
    return mapped[:size].view(dtype).reshape(rows, length)


def worker_stem(index: int) -> str:
    """The stem of worker `index`'s gradient files (OwnedFile)."""
    return f"worker-{index}"


class OwnedFile:
    """The one shared file an actor writes, `<stem>-<n>.<suffix>` in the job's
    directory: made on first use, and made anew when the directory changes or
    more rows are needed, removing the files of its `family` (its own earlier
    ones, and a dead predecessor actor's). `stem` must be unique to the actor
    instance: readers map a file once per path."""

    def __init__(self, stem: str, suffix: str, family: str | None = None):
        self.stem, self.suffix, self.family = stem, suffix, family or stem
        self.path: str | None = None
        self.rows: np.ndarray | None = None
        self._made = 0

    @staticmethod
    def path_in(directory: str, stem: str, made: int, suffix: str) -> str:
        """The path of the `made`-th file an actor of `stem` made in `directory`."""
        return os.path.join(directory, f"{stem}-{made}.{suffix}")

    @property
    def made(self) -> int:
        """Which of its files is the current one (`path_in`); 0: none."""
        return self._made if self.path is not None else 0

    def get(self, directory: str, rows: int, length: int, dtype: np.dtype) -> tuple[np.ndarray, bool] | None:
        """(the file's rows, whether it is new), or None when it cannot be
        made (no room: the caller sends arrays through the channels)."""
        if self.path is not None and self.path.startswith(directory + os.sep) and self.rows.shape[0] >= rows:
            return self.rows, False
        for old in Path(directory).glob(f"{self.family}-*.{self.suffix}"):
            old.unlink(missing_ok=True)  # readers that mapped it keep their mapping
        self._made += 1
        path = self.path_in(directory, self.stem, self._made, self.suffix)
        try:
            self.rows = create(Path(path), rows, length, dtype)
        except OSError:
            self.path = self.rows = None
            return None
        self.path = path
        return self.rows, True


class SharedViews:
    """Read-only views of other actors' shared files, each file mapped once."""

    def __init__(self):
        self._files: dict[str, np.ndarray] = {}

    def view(self, handle: SharedArray) -> np.ndarray:
        raw = self._files.get(handle.path)
        itemsize = np.dtype(handle.dtype).itemsize
        end = (handle.row + 1) * handle.length * itemsize
        if raw is None or raw.size < end:  # new, or re-created larger
            raw = self._files[handle.path] = _map(handle.path, os.path.getsize(handle.path), writable=False)
        return raw[end - handle.length * itemsize:end].view(handle.dtype)

    def forget_except(self, paths: set[str]) -> None:
        """Unmap files no longer in use (a replaced worker's)."""
        for path in set(self._files) - paths:
            del self._files[path]


def resolve(value, views: SharedViews) -> np.ndarray:
    """An array as sent: itself, or the view its handle names."""
    return views.view(value) if isinstance(value, SharedArray) else value


class JobFiles:
    """One job's directory of shared files, made on first use (for a
    compiled step graph) and removed when the job ends."""

    def __init__(self, needed_bytes: int, root: Path = DEFAULT_ROOT):
        self.needed_bytes, self.root = needed_bytes, root
        self.path: Path | None = None

    def directory(self) -> str | None:
        """The directory, made once; None when the memory file system lacks
        the room (arrays then go through the channels)."""
        if self.path is None:
            self.path = make_job_dir(self.needed_bytes, self.root)
        return str(self.path) if self.path is not None else None

    def drop_worker(self, index: int) -> None:
        """Remove a dropped worker's gradient files (worker indices are never
        reused, so nobody reads them again)."""
        if self.path is not None:
            for path in self.path.glob(f"{worker_stem(index)}-*.grads"):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        remove_job_dir(self.path)
        self.path = None
