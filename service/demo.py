"""`make demo`: start the service (if it is not already up), submit the
digits job, follow it to the end, and say where to look next.

The service is left running so that its dashboard can be opened; the last
lines print how to stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.cli import main as shardprop

URL = "http://127.0.0.1:8470"
HOME = Path.home() / ".shardprop"


def healthy() -> bool:
    try:
        return httpx.get(f"{URL}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_service() -> int | None:
    """Start `shardprop serve` detached; its pid, or None if one is already up."""
    if healthy():
        return None
    HOME.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = os.fdopen(os.open(HOME / "serve.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", "8470"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while not healthy():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"demo: the service did not start; see {HOME / 'serve.log'}")
        time.sleep(0.2)
    return proc.pid


def main() -> int:
    pid = start_service()
    print(f"shardprop service at {URL}" + (f" (pid {pid}, log {HOME / 'serve.log'})" if pid else " (already running)"))
    code = shardprop(["--server", URL, "submit", "examples/digits.yaml", "--follow"])
    print(f"""
Where to look next:
  dashboard      {URL}/            (loss, accuracy and samples/s of every job)
  Prometheus     {URL}/metrics
  API docs       {URL}/docs
  jobs           .venv/bin/shardprop list
  the model      .venv/bin/shardprop model <job id> -o digits.npz
  stop           kill {pid if pid else '<the service pid>'}""")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
