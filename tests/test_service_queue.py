"""The queue moves, against a real service on loopback: a job that can never
fit fails at once, one that cannot fit now is backfilled around (at most
max_overtakes times), a resize beyond the cluster is refused and the store's
worker count follows what runs, a cancel right after submit never gives a
5xx, and a Ray address that is not Ray leaves the service healthy and saying
why jobs wait."""

from __future__ import annotations

import logging
import socket
import threading

import httpx
import pytest

from service_helpers import service, tiny_spec, wait_for, wait_state


def endless(workers: int, shards: int | None = None, cpus_per_worker: int = 1) -> dict:
    spec = tiny_spec(workers=workers, steps=100000, checkpoint_every=0, eval_every=0)
    spec["data"]["shards"] = shards or workers
    spec["resources"]["cpus_per_worker"] = cpus_per_worker
    return spec


def job_of(url: str, job: dict) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()


def cancel_all(url: str, *jobs: dict) -> None:
    for job in jobs:
        assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=10).status_code == 200
    for job in jobs:
        assert wait_state(url, job["id"])["state"] in ("cancelled", "failed", "succeeded")


@pytest.mark.ray
def test_a_job_that_can_never_fit_fails_at_once_and_the_queue_moves(tmp_path, ray_local):
    import ray

    total = int(ray.cluster_resources()["CPU"])  # 6: three nodes of 2
    with service(tmp_path, max_concurrent_jobs=2, ray_address=ray_local) as (url, _):
        wide = httpx.post(f"{url}/v1/jobs", json=endless(total + 2)).json()
        fat = httpx.post(f"{url}/v1/jobs", json=endless(2, cpus_per_worker=total)).json()
        small = httpx.post(f"{url}/v1/jobs", json=tiny_spec(steps=5)).json()
        done = [wait_state(url, job["id"]) for job in (wide, fat, small)]
        assert [d["state"] for d in done] == ["failed", "failed", "succeeded"]
        assert done[0]["error"] == (f"needs {total + 2} CPUs (resources.workers {total + 2} × cpus_per_worker 1); "
                                    f"the cluster has {total} in all")
        assert done[1]["error"] == (f"needs {2 * total} CPUs (resources.workers 2 × cpus_per_worker {total}); "
                                    f"the cluster has {total} in all")
        assert [t["to"] for t in done[0]["transitions"]] == ["queued", "failed"]


@pytest.mark.ray
def test_backfill_starts_a_small_job_past_a_waiting_one_at_most_max_overtakes_times(tmp_path, ray_local):
    import ray

    total = int(ray.cluster_resources()["CPU"])
    with service(tmp_path, max_concurrent_jobs=4, ray_address=ray_local, max_overtakes=1) as (url, _):
        a = httpx.post(f"{url}/v1/jobs", json=endless(total - 2)).json()  # leaves 2 CPUs free
        wait_for(lambda: job_of(url, a)["step"] >= 2, 90, what="the first job to make progress")
        b = httpx.post(f"{url}/v1/jobs", json=endless(3)).json()  # needs 3: waits
        c = httpx.post(f"{url}/v1/jobs", json=endless(1)).json()  # fits: overtakes b once
        d = httpx.post(f"{url}/v1/jobs", json=endless(1)).json()  # would fit, but b was overtaken once already
        wait_for(lambda: job_of(url, c)["state"] == "running", 60, what="c to backfill")
        waiting = wait_for(lambda: "overtaken" in (job_of(url, d)["waiting_for"] or "") and
                           job_of(url, d)["waiting_for"], 30, what="d's reason")
        assert waiting == (f"job {b['id']} needs 3 CPU(s); the cluster has 1 free; job {b['id']} was overtaken "
                           "1 time(s) (max_overtakes), so nothing behind it starts before it")
        assert job_of(url, b)["state"] == job_of(url, d)["state"] == "queued"
        cancel_all(url, a)  # 5 CPUs free: b, then d
        wait_for(lambda: job_of(url, b)["state"] == job_of(url, d)["state"] == "running", 90,
                 what="b and d to start")
        started = {j["id"]: [t["at"] for t in job_of(url, j)["transitions"] if t["to"] == "running"][0]
                   for j in (b, c, d)}
        assert started[c["id"]] < started[b["id"]] <= started[d["id"]]
        cancel_all(url, b, c, d)


@pytest.mark.ray
def test_a_resize_beyond_the_cluster_is_refused_and_the_store_follows_what_runs(tmp_path, ray_local):
    import ray

    total = int(ray.cluster_resources()["CPU"])
    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app):
        job = httpx.post(f"{url}/v1/jobs", json=endless(2, shards=total + 2)).json()
        wait_for(lambda: job_of(url, job)["step"] >= 2, 90, what="the job to make progress")
        r = httpx.patch(f"{url}/v1/jobs/{job['id']}", json={"workers": total + 1})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == (f"{total + 1} workers need {total + 1} CPUs (workers {total + 1} × "
                                      f"cpus_per_worker 1); the cluster has {total} in all")
        assert job_of(url, job)["workers"] == 2
        r = httpx.patch(f"{url}/v1/jobs/{job['id']}", json={"workers": 1})
        assert r.status_code == 200
        wait_for(lambda: (job_of(url, job)["latest_metrics"] or {}).get("workers") == 1, 60, what="the resize")
        assert job_of(url, job)["workers"] == 1
        cancel_all(url, job)


@pytest.mark.ray
def test_a_cancel_right_after_submit_never_gives_a_5xx(tmp_path, ray_local):
    with service(tmp_path, max_concurrent_jobs=2, ray_address=ray_local) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as client:
        jobs, answers = [], []
        for i in range(30):
            job = client.post("/v1/jobs", json=tiny_spec(steps=200, checkpoint_every=0, eval_every=0)).json()
            answers.append(client.post(f"/v1/jobs/{job['id']}/cancel"))
            jobs.append(job)
        assert [r.status_code for r in answers] == [200] * 30, [r.text for r in answers if r.status_code != 200]
        assert {wait_state(url, job["id"])["state"] for job in jobs} == {"cancelled"}
        # none ran on after its cancel (the race this guards against: a job
        # started just as it was cancelled, stored as cancelled, trained to the end)
        assert {client.get(f"/v1/jobs/{job['id']}/model").status_code for job in jobs} == {409}


class SilentServer:
    """A TCP server on loopback that accepts connections and never says a word."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_a_ray_address_that_is_not_ray_leaves_the_service_healthy(tmp_path, caplog, kind):
    silent = SilentServer() if kind == "silent" else None
    address = silent.address if silent else closed_port()
    reason = ("a connection opens but no gRPC handshake (Ray's GCS) completed within 0.5 s: is it Ray?"
              if silent else "connection refused")
    caplog.set_level(logging.INFO, logger="shardprop.scheduler")
    try:
        with service(tmp_path, max_concurrent_jobs=1, ray_address=address, ray_connect_timeout_s=0.5,
                     ray_retry_s=0.2) as (url, app):
            job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
            health = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=10)).status_code == 200 and
                              h.json()["ray"] != "not connected yet (connects when a job is about to run)" and
                              h.json(), 30, what="a Ray status")
            assert health["ray"] == f"unreachable: {reason}"
            waiting = f"cannot connect to Ray at {address}: {reason}; retrying every 0.2 s"
            assert wait_for(lambda: job_of(url, job)["waiting_for"] == waiting, 30, what="the reason")
            # several tries later: still one log line, the job still queued, cancel still answers
            wait_for(lambda: app.state.scheduler.ray.attempts >= 3, 30, what="three tries")
            lines = [r.getMessage() for r in caplog.records if "cannot connect to Ray" in r.getMessage()]
            assert lines == [f"cannot connect to Ray at {address}: {reason}; retrying in 0.2 s"]
            assert job_of(url, job)["state"] == "queued"
            assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"
    finally:
        if silent:
            silent.close()
