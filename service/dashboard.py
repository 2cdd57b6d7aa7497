"""The live loss dashboard and the Prometheus endpoint, as one router.

`GET /` serves a single self-contained page (no build step, no CDN: its
script and styles are inline) that polls the job API; `GET /metrics` is the
Prometheus exposition of `service.metrics`.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from service.metrics import ServiceMetrics


def dashboard_router(metrics: ServiceMetrics) -> APIRouter:
    router = APIRouter()
    page = resources.files("service").joinpath("static/index.html").read_text()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> str:
        return page

    @router.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return router
