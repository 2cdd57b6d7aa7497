"""One owner per store: the serving process holds an exclusive OS lock on
`<store>.lock`, beside the store, for as long as it runs.

The lock is `flock(2)`, so the kernel releases it when its holder dies, even by
SIGKILL: no stale lock to clean up. The file holds the owner's pid and
address, so a second service on the same store can say who has it. The
descriptor is not inherited (PEP 446), so processes the service starts (Ray's)
never keep the lock alive after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

READ_OWNER_S = 1.0  # the owner writes its name just after locking; a second one may look in between


class StoreOwned(Exception):
    """Another process (or another app in this one) serves this store."""


def lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".lock")


class StoreOwner:
    """The lock held; `release()` (or the process's end) lets it go."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, store_path: Path, address: str) -> "StoreOwner":
        """Take the store's lock without waiting, or raise StoreOwned naming
        the holder's pid and address."""
        path = lock_path(Path(store_path))
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the store's own folder
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreOwned(f"the store {store_path} is already served by pid {holder.get('pid', '?')} at "
                             f"{holder.get('address', '?')} (it holds {path}); stop that service or use "
                             f"another --store") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "address": address}).encode() + b"\n", 0)
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


def _read_holder(fd: int) -> dict:
    deadline = time.monotonic() + READ_OWNER_S
    while True:
        try:
            return json.loads(os.pread(fd, 4096, 0))
        except ValueError:  # empty or half-written: the owner is just starting
            if time.monotonic() > deadline:
                return {}
            time.sleep(0.05)
