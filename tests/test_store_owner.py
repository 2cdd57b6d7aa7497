"""One owner per store: a second service on the same store is refused at
once, naming the first one's pid and address; the lock dies with its owner,
even by SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest

from service.api import create_app
from service.settings import Settings
from service.store_lock import StoreOwned
from service_helpers import ROOT, ServiceProcess, free_port, service


def _serve(store, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "serve", "--port", str(port), "--store", str(store),
                           "--max-concurrent-jobs", "0", "--log-level", "warning"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_second_serve_is_refused_until_the_first_is_killed(tmp_path):
    store = (tmp_path / "store" / "shardprop.db").resolve()
    store.parent.mkdir()
    first = ServiceProcess(store, "--max-concurrent-jobs", "0").start()
    try:
        lock = store.with_name("shardprop.db.lock")
        assert json.loads(lock.read_text()) == {"pid": first.proc.pid, "address": first.url}
        assert oct(lock.stat().st_mode & 0o777) == "0o600"
        port = free_port()
        second = _serve(store, port)
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"shardprop serve: error: the store {store} is already served by pid {first.proc.pid} at "
            f"{first.url} (it holds {lock}); stop that service or use another --store")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert httpx.get(f"{first.url}/healthz", timeout=10).status_code == 200  # the first is untouched
    finally:
        first.kill()  # SIGKILL: no clean-up of its own
    third = ServiceProcess(store, "--max-concurrent-jobs", "0").start()
    try:
        assert httpx.get(f"{third.url}/healthz", timeout=10).json()["status"] == "ok"
        assert json.loads(lock.read_text()) == {"pid": third.proc.pid, "address": third.url}
    finally:
        third.stop()


def _run_lifespan(app) -> None:
    async def enter_and_leave():
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(enter_and_leave())


def test_an_app_in_this_process_does_not_start_on_a_store_another_app_serves(tmp_path):
    with service(tmp_path) as (url, app):
        settings = app.state.settings
        other = create_app(Settings(store_path=settings.store_path, data_roots=[tmp_path], max_concurrent_jobs=0))
        with pytest.raises(StoreOwned) as refused:
            _run_lifespan(other)
        assert str(refused.value) == (
            f"the store {settings.store_path} is already served by pid {os.getpid()} at {settings.url} "
            f"(it holds {settings.store_path}.lock); stop that service or use another --store")
        assert other.state.scheduler._loop is None  # its scheduler never started
    _run_lifespan(other)  # the first one stopped: the lock is free
