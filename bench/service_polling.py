"""Training speed while clients poll a job's metrics.

A real service on loopback (`shardprop serve`, the embedded default: a private
local Ray, the SQLite store in a temporary folder) trains one long small job
(digits, 1 worker, no evaluation, no checkpoints). Its steps/s are measured
over a window, in rounds that alternate:

- `unpolled`: nobody asks;
- `incremental`: K clients each ask every 100 ms for the steps after the last
  one they hold (`GET /v1/jobs/{id}/metrics?since=S`, page after page while
  `more`): what the dashboard and `submit --follow` do;
- `whole`: K clients each read the whole history every 100 ms (page after
  page from `since=0`, 10000 records a page): the old worst case.

Reports the median steps/s of each, their ratio to unpolled, and the median
of each round's own ratio (the load of a shared machine moves between
rounds); the target for `incremental` is >= 0.90.

    .venv/bin/python bench/service_polling.py [--clients 3] [--rounds 5] [--window 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
JOB = {"name": "bench-polling", "seed": 0, "data": {"source": "digits", "shards": 2},
       "model": {"hidden": [16]},
       "training": {"batch_size": 64, "steps": 5_000_000, "eval_every": 0, "checkpoint_every": 0,
                    "optimizer": {"name": "sgd", "lr": 0.05}},
       "resources": {"workers": 1}}
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(folder / "service.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port),
                             "--store", str(folder / "store" / "shardprop.db"), "--data-root", str(folder),
                             "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited: {(folder / 'service.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the service did not start")


def poller(url: str, job_id: str, whole: bool, stop: threading.Event, caught_up: threading.Semaphore,
           fetched: list[int]) -> None:
    """Poll every POLL_S; counts records only once it has read the history
    (the dashboard's first poll), so that the window sees polling alone."""
    since, counting = 0, False
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            since = 0 if whole else since
            while True:
                params = {"since": since, "limit": 10_000} if whole else {"since": since}
                page = http.get(f"/v1/jobs/{job_id}/metrics", params=params).json()
                if counting:
                    fetched.append(len(page["metrics"]))
                since = page["next_since"]
                if not page["more"]:
                    break
            if not counting:
                counting = True
                caught_up.release()
            stop.wait(POLL_S)


def step_of(url: str, job_id: str) -> int:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()["step"]


def measure(url: str, job_id: str, mode: str, clients: int, window: float) -> dict:
    stop, caught_up, fetched = threading.Event(), threading.Semaphore(0), []
    threads = [] if mode == "unpolled" else [
        threading.Thread(target=poller, args=(url, job_id, mode == "whole", stop, caught_up, fetched))
        for _ in range(clients)]
    for t in threads:
        t.start()
    for _ in threads:
        caught_up.acquire()  # each has read the history once
    time.sleep(1.0)
    s0, t0 = step_of(url, job_id), time.perf_counter()
    time.sleep(window)
    s1, t1 = step_of(url, job_id), time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    return {"steps_per_s": (s1 - s0) / (t1 - t0), "history": s1, "requests": len(fetched),
            "records_fetched": sum(fetched)}  # requests and records: from the catch-up's end to the window's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured per mode and round")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    modes = ["unpolled", "incremental", "whole"]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_service(Path(tmp))
        try:
            job_id = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=60).json()["id"]
            while step_of(url, job_id) < 500:  # Ray started, workers warm
                time.sleep(0.5)
            for r in range(args.rounds):
                order = modes[r % 3:] + modes[:r % 3]  # alternate which comes first
                for mode in order:
                    result = measure(url, job_id, mode, args.clients, args.window)
                    runs[mode].append(result)
                    print(f"round {r + 1} {mode:<11} {result['steps_per_s']:7.1f} steps/s  (history "
                          f"{result['history']} steps, {result['requests']} requests, "
                          f"{result['records_fetched']} records fetched)", flush=True)
            httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    medians = {m: statistics.median(x["steps_per_s"] for x in runs[m]) for m in modes}
    # also the median of each round's own ratio: the machine's load moves between rounds
    paired = {m: statistics.median(x["steps_per_s"] / u["steps_per_s"] for x, u in zip(runs[m], runs["unpolled"]))
              for m in ("incremental", "whole")}
    summary = {"clients": args.clients, "poll_s": POLL_S, "window_s": args.window, "rounds": args.rounds,
               "median_steps_per_s": {m: round(v, 1) for m, v in medians.items()},
               "ratio_incremental": round(medians["incremental"] / medians["unpolled"], 3),
               "ratio_whole": round(medians["whole"] / medians["unpolled"], 3),
               "median_round_ratio": {m: round(v, 3) for m, v in paired.items()}}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
