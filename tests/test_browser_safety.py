"""What a web page, a rebinding DNS name or another user of the machine can
do to a service on loopback: each case of docs/security.md against a real
uvicorn server, a real SQLite file and real files on disk."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import httpx
import numpy as np
import pytest
from starlette.datastructures import Headers

from core.mlp import MLP
from service.cli import main
from service.guard import BrowserGuard
from service.settings import Settings, token_weakness
from service.store import Store
from service_helpers import service, tiny_spec

EVIL = "http://evil.example"
TOKEN = "correct-horse-battery-staple"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def paused(tmp_path):
    with service(tmp_path) as (url, app):
        yield url, app


def _submit(url: str, **headers) -> httpx.Response:
    """A valid spec POSTed as JSON, with `headers` changed (None: left out)."""
    sent = {k: v for k, v in {**JSON, **headers}.items() if v is not None}
    return httpx.post(f"{url}/v1/jobs", content=json.dumps(tiny_spec()), headers=sent)


# (case, extra request headers, status, words the detail must contain); every
# one is a POST of a valid spec
SUBMITS = [
    ("a form's text/plain from another origin", {"Origin": EVIL, "Content-Type": "text/plain"}, 403,
     ["Origin 'http://evil.example'", "cross-origin POST"]),
    ("JSON from another origin", {"Origin": EVIL}, 403, ["Origin 'http://evil.example'"]),
    ("an opaque origin", {"Origin": "null"}, 403, ["Origin 'null'"]),
    ("the same host on another scheme", {"Origin": "https://127.0.0.1:{port}"}, 403, ["Origin"]),
    ("Sec-Fetch-Site cross-site", {"Sec-Fetch-Site": "cross-site"}, 403, ["Sec-Fetch-Site is cross-site"]),
    ("Sec-Fetch-Site same-site (another port)", {"Sec-Fetch-Site": "same-site"}, 403, ["same-site"]),
    ("text/plain without an Origin", {"Content-Type": "text/plain"}, 415, ["application/json", "'text/plain'"]),
    ("a form's urlencoded", {"Content-Type": "application/x-www-form-urlencoded"}, 415, ["urlencoded"]),
    ("no Content-Type", {"Content-Type": None}, 415, ["application/json", "got none"]),
    ("an empty Content-Type", {"Content-Type": ""}, 415, ["got ''"]),
    ("JSON in another charset", {"Content-Type": "application/json; charset=latin-1"}, 415, ["latin-1"]),
    ("the dashboard's own origin", {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}, 201, []),
    ("typed by hand in the address bar", {"Sec-Fetch-Site": "none"}, 201, []),
    ("JSON with charset, no browser headers", {"Content-Type": "application/json; charset=UTF-8"}, 201, []),
]


@pytest.mark.parametrize("case,headers,status,words", SUBMITS, ids=[c[0] for c in SUBMITS])
def test_submit_from_a_browser(paused, case, headers, status, words):
    url, app = paused
    port = url.rsplit(":", 1)[1]
    before = app.state.store.snapshot()
    r = _submit(url, **{k: v and v.format(port=port) for k, v in headers.items()})
    assert r.status_code == status, r.text
    assert "access-control-allow-origin" not in r.headers
    if status == 201:
        assert r.json()["state"] == "queued"
        return
    for word in words:
        assert word in r.json()["detail"], (word, r.json()["detail"])
    assert app.state.store.snapshot() == before


HOSTS = [
    # (Host header, allowed): the loopback names with the served port, and nothing else
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True), ("LOCALHOST:{port}", True),
    ("evil.example:{port}", False),  # a DNS-rebinding page's name for 127.0.0.1
    ("evil.example", False), ("127.0.0.1:1", False), ("localhost", False), ("127.0.0.1:{port}.evil.example", False),
    ("10.0.0.1:{port}", False), ("ray-head:{port}", False),
]


@pytest.mark.parametrize("host,allowed", HOSTS, ids=[h for h, _ in HOSTS])
def test_host_must_name_the_service(paused, host, allowed):
    url, app = paused
    host = host.format(port=url.rsplit(":", 1)[1])
    for path in ("/healthz", "/v1/jobs", "/"):
        r = httpx.get(f"{url}{path}", headers={"Host": host})
        if allowed:
            assert r.status_code == 200, (path, r.text)
        else:
            assert r.status_code == 421, (path, r.text)
            assert r.json()["detail"].startswith(f"Host {host!r} is not an address this service answers to")
    before = app.state.store.snapshot()
    assert (_submit(url, Host=host).status_code == 201) is allowed
    if not allowed:
        assert app.state.store.snapshot() == before


def test_allowed_host_adds_names(tmp_path):
    with service(tmp_path, allowed_hosts=["ray-head", "proxy.example:9443"]) as (url, _):
        port = url.rsplit(":", 1)[1]
        # a NAME given alone is answered with any port (a proxy in front shows its own); NAME:PORT with that one
        for host, status in [(f"ray-head:{port}", 200), ("ray-head", 200), ("ray-head:1", 200),
                             ("proxy.example:9443", 200), (f"proxy.example:{port}", 421), ("proxy.example", 421),
                             (f"evil.example:{port}", 421), (f"127.0.0.1:{port}", 200)]:
            assert httpx.get(f"{url}/metrics", headers={"Host": host}).status_code == status, host


BINDS = [
    # (bind address, the address a request came in on, Host, answered)
    ("0.0.0.0", "10.1.2.3", "10.1.2.3:8470", True),  # a wildcard serves the address a request came in on
    ("0.0.0.0", "10.1.2.3", "127.0.0.1:8470", True),  # ... and loopback (compose publishes 8470 there)
    ("0.0.0.0", "10.1.2.3", "10.9.9.9:8470", False),
    ("0.0.0.0", "10.1.2.3", "evil.example:8470", False),
    ("::", "fd00::5", "[fd00::5]:8470", True),
    ("10.1.2.3", "10.1.2.3", "10.1.2.3:8470", True),
    ("10.1.2.3", "10.1.2.3", "127.0.0.1:8470", False),  # that bind does not serve loopback
    ("127.0.0.2", "127.0.0.2", "127.0.0.2:8470", True),
    ("127.0.0.2", "127.0.0.2", "localhost:8470", True),
]


@pytest.mark.parametrize("bind,local,host,answered", BINDS, ids=[f"{b} {h}" for b, _, h, _ in BINDS])
def test_the_names_each_bind_answers(bind, local, host, answered):
    guard = BrowserGuard(None, Settings(host=bind, port=8470))
    refusal = guard.refusal({"method": "GET", "scheme": "http", "server": (local, 8470)}, Headers({"host": host}))
    assert (refusal is None) is answered, refusal


def test_cross_origin_cancel_and_resize_are_refused_and_cancel_takes_an_empty_body(paused):
    url, app = paused
    job = _submit(url).json()
    path = f"{url}/v1/jobs/{job['id']}"
    for method, target, body in [("POST", "/cancel", None), ("PATCH", "", {"workers": 1}),
                                 ("PUT", "", {}), ("DELETE", "", None)]:
        r = httpx.request(method, path + target, json=body, headers={"Origin": EVIL})
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], (method, r.text)
    r = httpx.post(f"{path}/cancel", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "'text/plain'" in r.json()["detail"]
    assert httpx.get(path).json()["state"] == "queued"
    # a cross-origin read is answered (no CORS header: the other page cannot read it)
    r = httpx.get(path, headers={"Origin": EVIL})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.post(f"{path}/cancel")  # no body, no Content-Type
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    second = _submit(url).json()
    r = httpx.post(f"{url}/v1/jobs/{second['id']}/cancel", json={})
    assert r.status_code == 200 and r.json()["state"] == "cancelled"


# ---------------------------------------------------------------- with a token


def _succeeded_job(app) -> tuple[str, MLP]:
    """A job the (paused) scheduler never ran, marked succeeded in the real
    store with a real model file where the scheduler puts one."""
    store, settings = app.state.store, app.state.settings
    job = store.create_job(tiny_spec(), idempotency_key=None, body_hash=None)[0]
    store.transition(job["id"], "running")
    net = MLP([3, 4, 2], seed=7, dtype="float64")
    settings.model_path(job["id"]).parent.mkdir(parents=True, exist_ok=True)
    net.save(settings.model_path(job["id"]))
    store.transition(job["id"], "succeeded")
    return job["id"], net


def test_the_token_guards_every_read_of_job_contents(tmp_path):
    with service(tmp_path, token=TOKEN) as (url, app):
        job_id, net = _succeeded_job(app)
        ok = {"Authorization": f"Bearer {TOKEN}"}
        reads = ["/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics", f"/v1/jobs/{job_id}/model",
                 "/metrics"]
        for path in reads:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = httpx.get(f"{url}{path}", headers=headers)
                assert r.status_code == 401 and "token" in r.json()["detail"], (path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
            assert httpx.get(f"{url}{path}", headers=ok).status_code == 200, path
        model = httpx.get(f"{url}/v1/jobs/{job_id}/model", headers=ok)
        assert model.content == app.state.settings.model_path(job_id).read_bytes()
        rows = {"rows": [[0.5, -1.0, 2.0]]}
        assert httpx.post(f"{url}/v1/jobs/{job_id}/predict", json=rows).status_code == 401
        r = httpx.post(f"{url}/v1/jobs/{job_id}/predict", json=rows, headers=ok)
        assert r.status_code == 200
        assert r.json()["outputs"] == net.predict(np.array(rows["rows"])).tolist()
        # open: health (counts, no contents) and the dashboard page (static HTML, no data)
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        page, script = httpx.get(f"{url}/"), httpx.get(f"{url}/static/api.js")
        assert page.status_code == script.status_code == 200 and job_id not in page.text + script.text
        assert "/static/app.js" in page.text and "sessionStorage" in script.text


HUGE = [
    # (case, the value in rows[0][1], words the detail must contain)
    ("an integer of 401 digits", 10**400, ["rows[0][1]", "float64", "an integer of 401 digits"]),
    ("an integer just past float64's largest", 2**1024, ["rows[0][1]", "an integer of 309 digits"]),
    ("a float literal past float64's largest", "1e400", ["rows[0][1]", "inf"]),
    ("a negative integer of 400 digits", -(10**399), ["rows[0][1]", "an integer of 400 digits"]),
]


@pytest.mark.parametrize("case,value,words", HUGE, ids=[c[0] for c in HUGE])
def test_predict_refuses_numbers_float64_cannot_hold(paused, case, value, words):
    url, app = paused
    job_id, _ = _succeeded_job(app)
    body = '{"rows": [[0.5, %s, 2.0]]}' % value
    r = httpx.post(f"{url}/v1/jobs/{job_id}/predict", content=body, headers=JSON)
    assert r.status_code == 422, r.text
    for word in words:
        assert word in r.json()["detail"], (word, r.json()["detail"])
    assert len(r.json()["detail"]) < 200  # the number is described, never echoed


# ---------------------------------------------------------------- files and tokens


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_folder_0700_and_its_files_0600(paused, tmp_path):
    url, _ = paused
    assert _submit(url).status_code == 201  # a write: SQLite has made its -wal and -shm files
    db = tmp_path / "store" / "shardprop.db"
    assert _mode(db.parent) == 0o700
    for name in ("shardprop.db", "shardprop.db-wal", "shardprop.db-shm"):
        assert _mode(db.parent / name) == 0o600, name


def test_a_world_readable_store_from_before_is_made_private(tmp_path):
    db = tmp_path / "old.db"
    folder_mode = _mode(tmp_path)
    sqlite3.connect(db).close()
    os.chmod(db, 0o644)  # as an earlier version left it
    store = Store(db)
    try:
        store.create_job(tiny_spec())
        for name in ("old.db", "old.db-wal", "old.db-shm"):
            assert _mode(tmp_path / name) == 0o600, name
    finally:
        store.close()
    assert _mode(tmp_path) == folder_mode  # a folder that was there is not this service's to change


WEAK = [
    ("s3cret", "6 characters, at least 16"),
    ("aaaaaaaaaaaaaaaaaaaaaaaa", "1 different characters, at least 8"),
    ("abababab12121212", "4 different characters"),
]


@pytest.mark.parametrize("token,why", WEAK, ids=[w[0] for w in WEAK])
def test_serve_beyond_loopback_refuses_a_weak_token(monkeypatch, capsys, token, why):
    monkeypatch.setenv("SHARDPROP_TOKEN", token)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0 (not loopback) with a weak SHARDPROP_TOKEN" in err and why in err, err


def test_a_strong_token_passes():
    import secrets

    assert token_weakness(secrets.token_urlsafe(32)) is None
    assert token_weakness("0123456789abcdef") is None  # 16 characters, 16 different


# ---------------------------------------------------------------- shardprop train


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "a/../../escaped", "..", ".hidden",
                                  "nul\x00byte", "back\\slash"])
def test_train_never_writes_outside_its_folder(tmp_path, monkeypatch, capsys, name):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    spec = {**tiny_spec(steps=2), "name": name}
    (cwd / "job.json").write_text(json.dumps(spec))
    assert main(["train", "job.json", "--reference"]) == 2
    err = capsys.readouterr().err
    assert "name: must be letters, digits" in err and "(it names files)" in err, err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/job.json"]
    assert not os.path.exists("/tmp/escaped.npz")


def test_a_spec_name_with_a_path_is_refused_at_submit_too(paused):
    url, app = paused
    before = app.state.store.snapshot()
    r = httpx.post(f"{url}/v1/jobs", json={**tiny_spec(), "name": "../../etc/x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("name: must be letters, digits"), r.text
    assert app.state.store.snapshot() == before
