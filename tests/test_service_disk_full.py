"""A full disk ends a job cleanly: on a real small tmpfs, the checkpoint's
temporary file is removed, the job fails with "no space left on device"
naming the folder, the service stays healthy, and once there is space again
the next job succeeds. A store whose disk is full answers 507, stores
nothing, and a job's end is recorded once the store takes it again."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.settings import Settings
from service.store import Store, StoreUnavailable
from service_helpers import ServerThread, service, tiny_spec, wait_state


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` mounted at `path` (the tests run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until its disk is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == 28, err
    return filler


class FlakyStore(Store):
    """A store whose disk refuses the first `refusals` moves to `failed`, as
    a full disk does (sqlite's SQLITE_FULL, as the store reports it)."""

    def __init__(self, path, refusals: int):
        super().__init__(path)
        self.refusals, self.tries = refusals, 0

    def transition(self, job_id, to, *args, **kwargs):
        if to == "failed":
            self.tries += 1
            if self.tries <= self.refusals:
                raise StoreUnavailable(f"the job store {self.path} cannot be written: no space left on device",
                                       disk_full=True)
        return super().transition(job_id, to, *args, **kwargs)


@pytest.mark.ray
@pytest.mark.chaos  # fills a real tmpfs under a running job
def test_a_full_checkpoint_disk_fails_the_job_cleanly_and_the_next_one_succeeds(tmp_path, ray_local):
    settings = Settings(store_path=tmp_path / "store" / "shardprop.db", data_roots=[tmp_path], token=None,
                        max_concurrent_jobs=1, ray_address=ray_local, poll_interval_s=0.05)
    store = FlakyStore(settings.store_path, refusals=3)
    with tmpfs(settings.checkpoints_dir, "1m") as checkpoints, \
            ServerThread(create_app(settings, store=store)) as server:
        url = server.url
        filler = fill(checkpoints)
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        failed = wait_state(url, job["id"])
        assert failed["state"] == "failed", failed
        assert failed["error"] == (f"cannot write the checkpoint of step 0 in {checkpoints / job['id']}: "
                                   "no space left on device")
        assert store.tries == 4  # refused three times, then recorded
        assert list(checkpoints.rglob("*.tmp")) == [] and list(checkpoints.rglob("ckpt-*")) == []
        assert httpx.get(f"{url}/healthz").status_code == 200
        filler.unlink()
        after = httpx.post(f"{url}/v1/jobs", json=tiny_spec(steps=20)).json()
        assert wait_state(url, after["id"])["state"] == "succeeded"
        assert len(list((checkpoints / after["id"]).glob("ckpt-*.npz"))) == 3


def test_a_full_store_disk_answers_507_and_stores_nothing(tmp_path):
    with tmpfs(tmp_path / "store", "1m") as folder, service(tmp_path) as (url, app):
        first = httpx.post(f"{url}/v1/jobs", json=tiny_spec())
        assert first.status_code == 201
        before = app.state.store.snapshot()
        filler = fill(folder)
        for _ in range(3):
            r = httpx.post(f"{url}/v1/jobs", json=tiny_spec(steps=7))
            assert r.status_code == 507, r.text
            assert r.json()["detail"] == (f"the job store {folder / 'shardprop.db'} cannot be written: "
                                          "no space left on device; nothing was stored, try again later")
            assert r.headers["Retry-After"] == "10"
        assert app.state.store.snapshot() == before
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert [j["id"] for j in httpx.get(f"{url}/v1/jobs").json()["jobs"]] == [first.json()["id"]]
        filler.unlink()
        assert httpx.post(f"{url}/v1/jobs", json=tiny_spec(steps=7)).status_code == 201
