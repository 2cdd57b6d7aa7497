"""/healthz: is the service up, what it holds, and whether Ray is reachable."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import SchedulerDep, StoreDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(store: StoreDep, scheduler: SchedulerDep):
    return {"status": "ok", "jobs": store.counts(), "running": scheduler.running_ids(),
            "max_concurrent_jobs": scheduler.max_concurrent_jobs, "ray": scheduler.ray_status(),
            "waiting_for": scheduler.waiting_for}
