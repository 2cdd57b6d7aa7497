"""/metrics: the Prometheus exposition of `service.metrics` (job ids and
losses: with a token set, the scraper sends it, see deploy/prometheus.yml)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from service.deps import MetricsDep, require_token

router = APIRouter()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(require_token)])
def prometheus(metrics: MetricsDep) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
