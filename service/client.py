"""A small HTTP client for the job API (used by the CLI and the tests)."""

from __future__ import annotations

import os

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8470"


class ClientError(Exception):
    """A refused or failed request; the message is one line for the user."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, server: str = DEFAULT_SERVER, token: str | None = None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        token = token if token is not None else os.environ.get("SHARDPROP_TOKEN")
        if token and not (token.isascii() and token.isprintable()):
            raise ClientError("SHARDPROP_TOKEN must be printable ASCII (it travels in an HTTP header)")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as err:
            raise ClientError(f"cannot reach the service at {self.server}: {err}") from None
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail") if isinstance(body, dict) else body
            except ValueError:
                detail = response.text.strip()[:200]
            raise ClientError(f"{response.status_code}: {detail}", response.status_code)
        return response

    def submit(self, spec: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def list(self, state: str | None = None) -> list[dict]:
        params = {"state": state} if state else {}
        return self._request("GET", "/v1/jobs", params=params).json()["jobs"]

    def status(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def metrics_page(self, job_id: str, since: int = 0, limit: int | None = None) -> dict:
        """One page of the history: `metrics` (steps after `since`), `next_since`, `more`."""
        params = {"since": since} if limit is None else {"since": since, "limit": limit}
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()

    def metrics(self, job_id: str, since: int = 0) -> list[dict]:
        """Every record of the steps after `since`, page by page."""
        rows = []
        while True:
            page = self.metrics_page(job_id, since)
            rows += page["metrics"]
            since = page["next_since"]
            if not page["more"]:
                return rows

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def resize(self, job_id: str, workers: int) -> dict:
        return self._request("PATCH", f"/v1/jobs/{job_id}", json={"workers": workers}).json()

    def model(self, job_id: str) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/model").content

    def predict(self, job_id: str, rows: list[list[float]]) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/predict", json={"rows": rows}).json()

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()
