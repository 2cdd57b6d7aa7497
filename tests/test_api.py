"""The HTTP API through a real uvicorn server on loopback."""

from __future__ import annotations

import json

import httpx
import pytest

from service_helpers import service, tiny_spec, wait_for, wait_state


@pytest.fixture
def paused(tmp_path):
    with service(tmp_path) as (url, app):
        yield url, app


def _with(path: str, value) -> dict:
    spec = tiny_spec()
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node[p]
    node[last] = value
    return spec


def _without(path: str) -> dict:
    spec = tiny_spec()
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node[p]
    del node[last]
    return spec


BAD = [
    # (case, body bytes, status, words the detail must contain)
    ("malformed json", b'{"name": "x", "data": ', 400, ["malformed JSON"]),
    ("not utf-8", b'{"name": "\xff"}', 400, ["UTF-8"]),
    ("empty body", b"", 400, ["empty"]),
    ("huge integer literal", b'{"seed": ' + b"9" * 5000 + b"}", 400, ["malformed JSON"]),
    ("deep nesting", b"[" * 100000 + b"]" * 100000, 400, ["malformed JSON"]),
    ("not an object", b"[1, 2]", 422, ["mapping"]),
    ("unknown top-level field", _with("colour", "red"), 422, ["colour", "unknown field"]),
    ("unknown nested field", _with("training.wrkers", 2), 422, ["training.wrkers", "unknown field"]),
    ("missing steps", _without("training.steps"), 422, ["training.steps"]),
    ("steps as string", _with("training.steps", "30"), 422, ["training.steps", "'30'"]),
    ("hidden as string", _with("model.hidden", "16"), 422, ["model.hidden"]),
    ("lr as list", _with("training.optimizer.lr", [0.1]), 422, ["training.optimizer.lr"]),
    ("zero steps", _with("training.steps", 0), 422, ["steps", "0"]),
    ("negative batch", _with("training.batch_size", -5), 422, ["batch_size", "-5"]),
    ("zero workers", _with("resources.workers", 0), 422, ["workers", "0"]),
    ("zero hidden width", _with("model.hidden", [0]), 422, ["hidden[0]", "0"]),
    ("a billion workers", _with("resources.workers", 10**9), 422, ["workers", "1000000000"]),
    ("a billion hidden units", _with("model.hidden", [10**9]), 422, ["hidden[0]", "1000000000"]),
    ("absurd shards", _with("data.shards", 10**12), 422, ["shards"]),
    ("nan lr", b'{"name": "x", "data": {"source": "digits"}, "training": {"steps": 3, '
               b'"optimizer": {"lr": NaN}}}', 422, ["lr", "finite"]),
    ("unknown activation", _with("model.activation", "swish"), 422, ["model.activation", "swish"]),
    ("loss does not fit output", _with("model.output", "identity"), 422, ["cross_entropy", "identity"]),
    ("unknown data source", _with("data.source", "mnist"), 422, ["source", "mnist"]),
    ("data path with ..", _with("data.source", "../secret.csv"), 422, ["data.source", ".."]),
    ("absolute data path outside roots", _with("data.source", "/etc/passwd.csv"), 422,
     ["data.source", "/etc/passwd.csv", "outside"]),
    ("missing data file", _with("data.source", "nothere.npz"), 422, ["data.source", "nothere.npz"]),
    ("workers above shards", _with("resources.workers", 3), 422, ["resources.workers", "data.shards"]),
]


@pytest.mark.parametrize("case,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_4xx_naming_the_field_and_stores_nothing(paused, case, body, status, words):
    url, app = paused
    before = app.state.store.snapshot()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/jobs", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word in detail, (word, detail)
    assert app.state.store.snapshot() == before


def test_symlink_escape_refused(paused, tmp_path):
    url, app = paused
    outside = tmp_path.parent / f"{tmp_path.name}-outside.csv"
    outside.write_text("1,2,0\n")
    (tmp_path / "link.csv").symlink_to(outside)
    before = app.state.store.snapshot()
    r = httpx.post(f"{url}/v1/jobs", json=_with("data.source", "link.csv"))
    assert r.status_code == 422 and "data.source" in r.json()["detail"]
    assert app.state.store.snapshot() == before


def test_oversized_body_413(tmp_path):
    with service(tmp_path, max_body_bytes=4096) as (url, app):
        before = app.state.store.snapshot()
        spec = _with("name", "x" * 5000)
        r = httpx.post(f"{url}/v1/jobs", json=spec)
        assert r.status_code == 413 and "4096" in r.json()["detail"]

        def chunks():  # streamed, no Content-Length
            yield b'{"name": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        r = httpx.post(f"{url}/v1/jobs", content=chunks())
        assert r.status_code == 413, r.text
        assert app.state.store.snapshot() == before


def test_submit_list_get_filter(paused):
    url, _ = paused
    a = httpx.post(f"{url}/v1/jobs", json=tiny_spec())
    b = httpx.post(f"{url}/v1/jobs", json=_with("name", "second"))
    assert a.status_code == b.status_code == 201
    job = a.json()
    for key in ("id", "name", "state", "step", "error", "created_at"):
        assert key in job
    assert job["state"] == "queued" and job["error"] is None
    jobs = httpx.get(f"{url}/v1/jobs").json()["jobs"]
    assert [j["id"] for j in jobs] == [b.json()["id"], job["id"]]
    assert len(httpx.get(f"{url}/v1/jobs", params={"state": "queued"}).json()["jobs"]) == 2
    assert httpx.get(f"{url}/v1/jobs", params={"state": "running"}).json()["jobs"] == []
    r = httpx.get(f"{url}/v1/jobs", params={"state": "bogus"})
    assert r.status_code == 422 and "bogus" in r.json()["detail"]
    named = httpx.get(f"{url}/v1/jobs", params={"name": "SEC", "state": "queued"}).json()["jobs"]
    assert [j["id"] for j in named] == [b.json()["id"]] and named[0]["last_metrics"]["loss"] is None
    r = httpx.get(f"{url}/v1/jobs", params={"name": "x" * 201})
    assert r.status_code == 422 and "name" in r.json()["detail"] and "200" in r.json()["detail"]
    got = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    assert got["spec"]["training"]["steps"] == 30 and got["latest_metrics"] is None
    assert got["transitions"][0]["to"] == "queued" and got["transitions"][0]["at"]
    assert httpx.get(f"{url}/v1/jobs/{job['id']}/metrics").json()["metrics"] == []
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_unknown_ids_404_and_conflicts_409(paused):
    url, _ = paused
    for method, path, body in [("GET", "/v1/jobs/nope", None), ("GET", "/v1/jobs/nope/metrics", None),
                               ("POST", "/v1/jobs/nope/cancel", None), ("PATCH", "/v1/jobs/nope", {"workers": 1}),
                               ("GET", "/v1/jobs/nope/model", None),
                               ("POST", "/v1/jobs/nope/predict", {"rows": [[1.0]]})]:
        r = httpx.request(method, f"{url}{path}", json=body)
        assert r.status_code == 404 and "nope" in r.json()["detail"], (method, path, r.text)
    job = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
    r = httpx.patch(f"{url}/v1/jobs/{job['id']}", json={"workers": 2})
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    for body, words in [({"workers": "2"}, ["workers", "'2'"]), ({"wrkers": 2}, ["wrkers"]), ([2], ["object"])]:
        r = httpx.patch(f"{url}/v1/jobs/{job['id']}", json=body)
        assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), r.text
    r = httpx.get(f"{url}/v1/jobs/{job['id']}/model")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    r = httpx.post(f"{url}/v1/jobs/{job['id']}/predict", json={"rows": [[0.0] * 64]})
    assert r.status_code == 409
    r = httpx.post(f"{url}/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel").status_code == 200  # cancelling again is harmless
    got = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    assert [t["to"] for t in got["transitions"]] == ["queued", "cancelled"]
    r = httpx.get(f"{url}/v1/jobs/{job['id']}/metrics", params={"since": -1})
    assert r.status_code == 422 and "since" in r.json()["detail"]


def test_idempotency_key(paused):
    url, app = paused
    h = {"Idempotency-Key": "abc-1"}
    a = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), headers=h)
    # the same body, spelled differently (key order, whitespace)
    same = json.dumps(dict(reversed(list(tiny_spec().items()))), indent=3)
    b = httpx.post(f"{url}/v1/jobs", content=same, headers={**h, "Content-Type": "application/json"})
    assert a.status_code == 201 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    before = app.state.store.snapshot()
    c = httpx.post(f"{url}/v1/jobs", json=_with("name", "other"), headers=h)
    assert c.status_code == 409 and "abc-1" in c.json()["detail"]
    assert app.state.store.snapshot() == before
    d = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), headers={"Idempotency-Key": "abc-2"})
    assert d.status_code == 201 and d.json()["id"] != a.json()["id"]
    assert len(httpx.get(f"{url}/v1/jobs").json()["jobs"]) == 2


def test_an_idempotent_retry_is_the_same_job_however_its_numbers_are_spelled(paused):
    """The key guards the job, not the bytes: `lr: 1` and `lr: 1.0`, or a
    default spelled out, are the same spec; another learning rate is not."""
    url, app = paused
    h = {"Idempotency-Key": "lr-1"}
    a = httpx.post(f"{url}/v1/jobs", json=_with("training.optimizer", {"name": "sgd", "lr": 1}), headers=h)
    b = httpx.post(f"{url}/v1/jobs", json=_with("training.optimizer", {"name": "sgd", "lr": 1.0, "momentum": 0.0}),
                   headers=h)
    assert a.status_code == 201 and b.status_code == 200 and a.json()["id"] == b.json()["id"]
    c = httpx.post(f"{url}/v1/jobs", json=_with("training.optimizer", {"name": "sgd", "lr": 0.5}), headers=h)
    assert c.status_code == 409 and "lr-1" in c.json()["detail"]


def test_token_on_every_mutating_call(tmp_path):
    with service(tmp_path, token="s3cret") as (url, app):
        before = app.state.store.snapshot()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), headers=headers)
            assert r.status_code == 401 and "token" in r.json()["detail"]
        assert app.state.store.snapshot() == before
        ok = {"Authorization": "Bearer s3cret"}
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec(), headers=ok).json()
        for method, path, body in [("POST", f"/v1/jobs/{job['id']}/cancel", None),
                                   ("PATCH", f"/v1/jobs/{job['id']}", {"workers": 1}),
                                   ("POST", f"/v1/jobs/{job['id']}/predict", {"rows": [[1.0]]})]:
            assert httpx.request(method, f"{url}{path}", json=body).status_code == 401
        assert httpx.get(f"{url}/v1/jobs").status_code == 401  # reading jobs needs it too (docs/security.md)
        assert httpx.get(f"{url}/v1/jobs/{job['id']}", headers=ok).json()["state"] == "queued"
        assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=ok).json()["state"] == "cancelled"


def test_openapi_docs(paused):
    url, _ = paused
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/cancel",
            "/v1/jobs/{job_id}/model", "/v1/jobs/{job_id}/predict", "/healthz"} <= set(paths)
    assert httpx.get(f"{url}/docs").status_code == 200


# ---------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_cancel_running_job_frees_its_cpus(tmp_path, ray_local):
    import ray

    with service(tmp_path, max_concurrent_jobs=1, ray_address=ray_local) as (url, app):
        total = ray.cluster_resources()["CPU"]
        job = httpx.post(f"{url}/v1/jobs", json=tiny_spec(workers=2, steps=100000, checkpoint_every=0,
                                                          eval_every=0)).json()
        queued = httpx.post(f"{url}/v1/jobs", json=tiny_spec()).json()
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job['id']}").json()["step"] >= 3, 90,
                 what="the job to make progress")
        assert ray.available_resources().get("CPU", 0) <= total - 2
        # resize the running job; a bad size names the bounds
        r = httpx.patch(f"{url}/v1/jobs/{job['id']}", json={"workers": 5})
        assert r.status_code == 422 and "workers" in r.json()["detail"]
        assert httpx.patch(f"{url}/v1/jobs/{job['id']}", json={"workers": 1}).json()["workers"] == 1
        wait_for(lambda: (httpx.get(f"{url}/v1/jobs/{job['id']}").json()["latest_metrics"] or {})
                 .get("workers") == 1, 60, what="the resize")
        # the second job waits behind the concurrency limit
        assert httpx.get(f"{url}/v1/jobs/{queued['id']}").json()["state"] == "queued"
        r = httpx.post(f"{url}/v1/jobs/{queued['id']}/cancel")
        assert r.json()["state"] == "cancelled"
        r = httpx.post(f"{url}/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200
        done = wait_state(url, job["id"])
        assert done["state"] == "cancelled"
        assert [t["to"] for t in done["transitions"]] == ["queued", "running", "cancelled"]
        wait_for(lambda: ray.available_resources().get("CPU", 0) == total, 30, what="CPUs freed")
        r = httpx.post(f"{url}/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200


@pytest.mark.ray
def test_queue_waits_for_cpus_first_in_first_out(tmp_path, ray_local):
    """With backfill off (max_overtakes 0), the head of the queue waits for
    the CPUs it asks for, says so, and nothing behind it overtakes it, even
    a job that would fit (backfill: tests/test_service_queue.py)."""
    import ray

    def spec(workers):
        s = tiny_spec(workers=workers, steps=100000, checkpoint_every=0, eval_every=0)
        s["data"]["shards"] = workers
        return s

    total = ray.cluster_resources()["CPU"]
    with service(tmp_path, max_concurrent_jobs=3, ray_address=ray_local, max_overtakes=0) as (url, app):
        a = httpx.post(f"{url}/v1/jobs", json=spec(int(total) - 2)).json()
        b = httpx.post(f"{url}/v1/jobs", json=spec(3)).json()  # needs 3 CPUs, 2 are free
        c = httpx.post(f"{url}/v1/jobs", json=spec(1)).json()  # would fit, but comes after b
        get = lambda job: httpx.get(f"{url}/v1/jobs/{job['id']}").json()  # noqa: E731
        wait_for(lambda: get(a)["step"] >= 3, 90, what="the first job to make progress")
        waiting = wait_for(lambda: get(b)["waiting_for"], 30, what="a waiting reason")
        assert f"job {b['id']} needs 3 CPU(s)" in waiting, waiting
        assert get(c)["state"] == "queued" and get(c)["waiting_for"] == waiting
        health = httpx.get(f"{url}/healthz").json()
        assert health["ray"] == "connected" and health["running"] == [a["id"]]

        assert httpx.post(f"{url}/v1/jobs/{a['id']}/cancel").json()["state"] in ("running", "cancelled")
        assert wait_state(url, a["id"])["state"] == "cancelled"
        wait_for(lambda: get(b)["state"] == get(c)["state"] == "running", 90, what="b and c to start")
        started = {job["id"]: [t["at"] for t in get(job)["transitions"] if t["to"] == "running"][0] for job in (b, c)}
        assert started[b["id"]] <= started[c["id"]]
        assert get(b)["waiting_for"] is None
        for job in (b, c):
            assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel").status_code == 200
        for job in (b, c):
            assert wait_state(url, job["id"])["state"] == "cancelled"
        wait_for(lambda: ray.available_resources().get("CPU", 0) == total, 30, what="CPUs freed")
