"""200 tiny jobs from 20 concurrent clients (execution paused): each stored
exactly once; then all cancelled, all terminal. Records the p99 latency of
GET /v1/jobs during the load (printed; kept in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service_helpers import service, tiny_spec

JOBS, CLIENTS = 200, 20


@pytest.mark.slow
def test_200_jobs_from_20_clients(tmp_path):
    with service(tmp_path) as (url, app):
        latencies: list[float] = []
        stop = threading.Event()

        def poll():
            with httpx.Client(base_url=url) as c:
                while not stop.is_set():
                    began = time.perf_counter()
                    r = c.get("/v1/jobs")
                    latencies.append(time.perf_counter() - began)
                    assert r.status_code == 200

        def client(k: int) -> list[str]:
            ids = []
            with httpx.Client(base_url=url, timeout=60) as c:
                for i in range(k, JOBS, CLIENTS):
                    spec = tiny_spec(steps=5 + i)
                    spec["name"] = f"load-{i}"
                    # every client retries once with the same key: still one job
                    for _ in range(2):
                        r = c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"load-{i}"})
                        assert r.status_code in (200, 201), r.text
                    ids.append(r.json()["id"])
            return ids

        poller = threading.Thread(target=poll)
        poller.start()
        began = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            ids = [i for part in pool.map(client, range(CLIENTS)) for i in part]
        elapsed = time.perf_counter() - began
        stop.set()
        poller.join()

        jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
        assert len(ids) == len(set(ids)) == JOBS
        assert sorted(j["id"] for j in jobs) == sorted(ids)
        assert sorted(j["name"] for j in jobs) == sorted(f"load-{i}" for i in range(JOBS))

        with ThreadPoolExecutor(CLIENTS) as pool:
            codes = list(pool.map(lambda i: httpx.post(f"{url}/v1/jobs/{i}/cancel").status_code, ids))
        assert set(codes) == {200}
        jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
        assert {j["state"] for j in jobs} == {"cancelled"}

        p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
        result = {"jobs": JOBS, "clients": CLIENTS, "submit_seconds": round(elapsed, 2),
                  "list_requests": len(latencies), "list_p50_ms": round(p50, 1), "list_p99_ms": round(p99, 1)}
        print("service load:", json.dumps(result))
        out = os.environ.get("SHARDPROP_LOAD_RESULT")
        if out:
            with open(out, "w") as fh:
                json.dump(result, fh)
        assert len(latencies) > 10
