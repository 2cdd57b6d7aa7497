"""Helpers for the service tests: a real uvicorn server on loopback, in a
thread of the test process or in a subprocess, and tiny job specs."""

from __future__ import annotations

import copy
import os
import signal
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
from spec_helpers import place

ROOT = Path(__file__).resolve().parent.parent
SERVICE_PEAK = 1.5 * (1 << 30)  # the bound on a service process's peak resident memory (VmHWM)

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits", "shards": 2, "validation_split": 0.2},
    "model": {"hidden": [16], "activation": "relu", "output": "softmax", "loss": "cross_entropy"},
    "training": {"batch_size": 64, "steps": 30, "eval_every": 10, "checkpoint_every": 10,
                 "optimizer": {"name": "sgd", "lr": 0.1}},
    "resources": {"workers": 1},
}


def tiny_spec(**fields) -> dict:
    return place(copy.deepcopy(TINY), **fields)


def status_field(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` memory figure (VmRSS, VmHWM) in bytes; 0 for a process gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """Stop a process started with `start_new_session=True` and all its
    children: SIGTERM to the group, then SIGKILL if it outlives `grace_s`."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


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


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition",
             diagnose=None):
    """Poll `predicate` until it returns something true. On timeout the error
    carries `diagnose()`'s text, when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(interval)


def wait_state(url: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 90.0,
               diagnose=None) -> dict:
    """Poll a job until it reaches one of `states`. A request that times out
    is tried again until the deadline (a shared machine can stall a process
    for seconds); the final error lists every such stall."""
    stalls: list[str] = []

    def done():
        try:
            job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        except httpx.TimeoutException as err:
            stalls.append(f"{time.strftime('%H:%M:%S')} GET timed out: {err!r}")
            return None
        return job if job["state"] in states else None

    def why() -> str:
        return "\n".join(stalls + ([diagnose()] if diagnose is not None else []))

    return wait_for(done, timeout, what=f"job {job_id} to reach {states}", diagnose=why)


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
            self._reap(120)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL 60 s later; a service that did not stop is
        described (thread states, stacks, log) in the error."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                report = self.diagnose()
                self.proc.kill()
                self._reap(120, f"it ignored SIGTERM for 60 s\n{report}")

    def _reap(self, timeout: float, before: str = "") -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"service pid {self.proc.pid} still there {timeout:g} s after SIGKILL; "
                                 f"{before}\nnow:\n{self.diagnose()}") from None

    def diagnose(self) -> str:
        """What the service process is doing: each thread's kernel state and
        wait channel (a `D` is a thread stuck in the kernel, which not even
        SIGKILL ends until the kernel lets go), its Python stacks (SIGUSR1,
        see service.cli), and the end of its log."""
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return f"service exited ({self.proc and self.proc.returncode}); log:\n{self._log_tail()}"
        lines = []
        for task in sorted(Path(f"/proc/{self.proc.pid}/task").glob("*")):
            try:
                stat = (task / "stat").read_text()
                wchan = (task / "wchan").read_text().strip() or "-"
            except OSError:
                continue
            name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            lines.append(f"  thread {task.name} {name!r}: state {state}, waiting in {wchan}")
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1.0)
        except OSError:
            pass
        return "threads:\n" + "\n".join(lines) + f"\nlog:\n{self._log_tail()}"

    def _log_tail(self, chars: int = 8000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as err:
            return f"(no log: {err})"
