"""`Client`: one service, its token, and the calls of its HTTP API.

Every call answers plain data (dicts, lists, bytes) or a `Job` handle, and
every error is a typed exception (service.client.errors) carrying the
service's message. Reads that follow a job (`Job.wait`, `Job.events`,
`Job.metrics`) ride out a dropped connection or a restarting service: they
are tried again with a growing wait (0.2 s, doubling, at most 5 s; a 503's
Retry-After when it says more) for at most `retry_s` seconds in a row.
Writes are never repeated by the client.

A new resource (sweeps, say) is a few methods here, or a module of this
package with a handle like `Job`, using `request`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Mapping

import httpx

from service.client.errors import Busy, ShardpropError, Unreachable, error_for
from service.client.specs import load_spec

if TYPE_CHECKING:
    from service.client.diff import RunDiff
    from service.client.job import Job
    from service.client.sweep import Sweep

DEFAULT_SERVER = "http://127.0.0.1:8470"
FIRST_RETRY_S, LAST_RETRY_S = 0.2, 5.0


class Client:
    """`Client(server, token)`: the server defaults to $SHARDPROP_SERVER or
    http://127.0.0.1:8470, the token to $SHARDPROP_TOKEN."""

    def __init__(self, server: str | None = None, token: str | None = None, timeout: float = 30.0,
                 retry_s: float = 60.0):
        self.server = (server or os.environ.get("SHARDPROP_SERVER") or DEFAULT_SERVER).rstrip("/")
        token = token if token is not None else os.environ.get("SHARDPROP_TOKEN")
        if token and not (token.isascii() and token.isprintable()):
            raise ShardpropError("SHARDPROP_TOKEN must be printable ASCII (it travels in an HTTP header)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)
        self.retry_s = retry_s

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.server!r})"

    # ------------------------------------------------------------ the wire

    def request(self, method: str, path: str, *, retry: bool = False, **kw) -> httpx.Response:
        """One call; with `retry`, tried again while the service cannot be
        reached or answers 503, for at most `retry_s` seconds in a row."""
        wait, deadline = FIRST_RETRY_S, time.monotonic() + self.retry_s
        while True:
            try:
                return self._once(method, path, **kw)
            except (Unreachable, Busy) as err:
                left = deadline - time.monotonic()
                if not retry or left <= 0:
                    raise
                pause = max(wait, getattr(err, "retry_after", None) or 0.0)
                time.sleep(min(pause, left))
                wait = min(2 * wait, LAST_RETRY_S)

    def _once(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise Unreachable(f"cannot reach the service at {self.server}: {err}") from None
        if response.status_code >= 400:
            raise error_for(response)
        return response

    def get(self, path: str, retry: bool = False, **params):
        return self.request("GET", path, retry=retry,
                            params={k: v for k, v in params.items() if v is not None}).json()

    # ------------------------------------------------------------ jobs

    def submit(self, spec: Mapping | str | os.PathLike, *, idempotency_key: str | None = None) -> "Job":
        """Submit a job: `spec` is a mapping, a YAML/JSON file's path, or YAML text."""
        from service.client.job import Job

        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        info = self.request("POST", "/v1/jobs", json=load_spec(spec), headers=headers).json()
        return Job(self, info["id"], info)

    def job(self, job_id: str) -> "Job":
        """A handle on a stored job (NotFound if there is none)."""
        from service.client.job import Job

        return Job(self, job_id, self.status(job_id))

    def jobs(self, state: str | None = None) -> list["Job"]:
        from service.client.job import Job

        return [Job(self, j["id"], j) for j in self.list(state)]

    def list(self, state: str | None = None) -> list[dict]:
        """The jobs, newest first, as the service lists them."""
        return self.get("/v1/jobs", state=state)["jobs"]

    def status(self, job_id: str, retry: bool = False) -> dict:
        """A job's state, step, spec, provenance, transitions and latest metrics."""
        return self.get(f"/v1/jobs/{job_id}", retry)

    def metrics_page(self, job_id: str, since: int = 0, limit: int | None = None, retry: bool = False) -> dict:
        """One page of the history: `metrics` (steps after `since`), `next_since`, `more`."""
        return self.get(f"/v1/jobs/{job_id}/metrics", retry, since=since, limit=limit)

    def metrics(self, job_id: str, since: int = 0, retry: bool = False) -> list[dict]:
        """Every record of the steps after `since`, page by page."""
        rows = []
        while True:
            page = self.metrics_page(job_id, since, retry=retry)
            rows += page["metrics"]
            since = page["next_since"]
            if not page["more"]:
                return rows

    def events_page(self, job_id: str, since: int = 0, limit: int | None = None, retry: bool = False) -> dict:
        """One page of the timeline: `events` (numbered after `since`), `next_since`, `more`."""
        return self.get(f"/v1/jobs/{job_id}/events", retry, since=since, limit=limit)

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def resize(self, job_id: str, workers: int) -> dict:
        return self.request("PATCH", f"/v1/jobs/{job_id}", json={"workers": workers}).json()

    def model(self, job_id: str) -> bytes:
        """The trained model file's bytes (an .npz that core.mlp.MLP.load reads)."""
        return self.request("GET", f"/v1/jobs/{job_id}/model").content

    def predict(self, job_id: str, rows) -> dict:
        """`labels` (classifiers) or `outputs` for `rows` (a list of lists, or an array)."""
        rows = rows.tolist() if hasattr(rows, "tolist") else [list(r) for r in rows]
        return self.request("POST", f"/v1/jobs/{job_id}/predict", json={"rows": rows}).json()

    # ------------------------------------------------------------ sweeps

    def submit_sweep(self, document: Mapping | str | os.PathLike, *, idempotency_key: str | None = None) -> "Sweep":
        """Submit a sweep: `document` is a mapping, a YAML/JSON file's path, or YAML text."""
        from service.client.sweep import Sweep

        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        info = self.request("POST", "/v1/sweeps", json=load_spec(document), headers=headers).json()
        return Sweep(self, info["id"], info)

    def sweep(self, sweep_id: str) -> "Sweep":
        """A handle on a stored sweep (NotFound if there is none)."""
        from service.client.sweep import Sweep

        return Sweep(self, sweep_id, self.sweep_status(sweep_id))

    def sweeps(self) -> list[dict]:
        """The sweeps, newest first, as the service lists them."""
        return self.get("/v1/sweeps")["sweeps"]

    def sweep_status(self, sweep_id: str, retry: bool = False) -> dict:
        """A sweep's state, leaderboard, best trial and trials by state."""
        return self.get(f"/v1/sweeps/{sweep_id}", retry)

    def cancel_sweep(self, sweep_id: str) -> dict:
        """Cancel a sweep and its queued and running trial jobs."""
        return self.request("POST", f"/v1/sweeps/{sweep_id}/cancel").json()

    def health(self) -> dict:
        return self.get("/healthz")

    def diff(self, job_a: str, job_b: str) -> "RunDiff":
        """How two jobs differ: their specs, provenance and parameters (service.client.diff)."""
        from service.client.diff import compare

        a, b = self.status(job_a), self.status(job_b)
        return compare(a, b, self.metrics(job_a), self.metrics(job_b))
