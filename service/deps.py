"""What the routes are given: the app's settings, store, scheduler and
metrics, the token check, and the job a path names.

Each is read from `request.app.state` (set by `create_app`), so a test can
swap any of them with `app.dependency_overrides[get_store] = ...`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from service.metrics import ServiceMetrics
from service.scheduler import Scheduler
from service.settings import Settings
from service.store import NotFound, Store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def require_token(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """With a token set, every call that changes or reveals jobs (their
    specs, metrics, models, predictions; Prometheus' /metrics too) needs
    `Authorization: Bearer <SHARDPROP_TOKEN>`; /healthz and the dashboard's
    page (static, no data) do not."""
    if not settings.token:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
        raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <SHARDPROP_TOKEN>)",
                            {"WWW-Authenticate": "Bearer"})


def find_job(store: Store, scheduler: Scheduler, job_id: str, details: bool = False) -> dict:
    """The job as the API shows it, or a 404 naming the id."""
    try:
        return with_waiting(store.get_job(job_id, details=details), scheduler)
    except NotFound as err:
        raise HTTPException(404, str(err))


def with_waiting(job: dict, scheduler: Scheduler) -> dict:
    # FIFO: every queued job waits on what holds up the head of the queue
    job["waiting_for"] = scheduler.waiting_for if job["state"] == "queued" else None
    job["phase"] = scheduler.phase(job["id"]) if job["state"] == "running" else None
    return job


def existing_job(job_id: str, store: StoreDep, scheduler: SchedulerDep) -> dict:
    return find_job(store, scheduler, job_id)


JobDep = Annotated[dict, Depends(existing_job)]
