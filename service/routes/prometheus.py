"""/metrics: the Prometheus exposition of `service.metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import MetricsDep

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def prometheus(metrics: MetricsDep) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
