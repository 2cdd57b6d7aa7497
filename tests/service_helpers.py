"""Helpers for the service tests: a real uvicorn server on loopback, in a
thread of the test process or in a subprocess, and tiny job specs."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from service.api import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits", "shards": 2, "validation_split": 0.2},
    "model": {"hidden": [16], "activation": "relu", "output": "softmax", "loss": "cross_entropy"},
    "training": {"workers": 1, "batch_size": 64, "steps": 30, "eval_every": 10, "checkpoint_every": 10,
                 "optimizer": {"name": "sgd", "lr": 0.1}},
}


def tiny_spec(**training) -> dict:
    spec = copy.deepcopy(TINY)
    spec["training"].update(training)
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 from a thread of this process."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


@contextmanager
def service(tmp_path: Path, **settings):
    """A service in this process: yields (url, app). Execution is paused unless
    max_concurrent_jobs is given."""
    settings.setdefault("max_concurrent_jobs", 0)
    settings.setdefault("token", None)
    settings.setdefault("data_roots", [tmp_path])
    settings.setdefault("poll_interval_s", 0.05)
    cfg = Settings(store_path=tmp_path / "store" / "shardprop.db", **settings)
    app = create_app(cfg)
    with ServerThread(app) as server:
        yield server.url, app


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_state(url: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 90.0) -> dict:
    def done():
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        return job if job["state"] in states else None

    return wait_for(done, timeout, what=f"job {job_id} to reach {states}")


class ServiceProcess:
    """`python -m service serve` in a subprocess (for SIGKILL)."""

    def __init__(self, store: Path, *args: str, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "service", "serve", "--port", str(self.port), "--store", str(store),
                     "--log-level", "warning", *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = store.parent / f"service-{self.port}.log"

    def start(self) -> "ServiceProcess":
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited: {self.log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, 0.1, "the service to start")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
