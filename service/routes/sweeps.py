"""/v1/sweeps: submit, list, read (with the leaderboard) and cancel sweeps.

A sweep's trials are ordinary jobs (`GET /v1/jobs` lists them, each with
its `sweep`); the sweep runner (service/sweep_runner.py) submits them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from core.spec import SpecError
from service.admission import Refused
from service.bodies import OptionalJSON, RawJSON
from service.deps import SchedulerDep, SettingsDep, StoreDep, require_token
from service.jsonable import json_safe
from service.routes.jobs import check_idempotency_key
from service.states import STATES
from service.store import IdempotencyConflict, IllegalTransition, NotFound
from service.sweeps import create_sweep, sweep_view

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], dependencies=[Depends(require_token)])


@router.post("", status_code=201, summary="Submit a sweep (body: the sweep document as JSON, its base spec inline)")
async def submit(raw: RawJSON, settings: SettingsDep, store: StoreDep, scheduler: SchedulerDep,
                 idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
    check_idempotency_key(idempotency_key)
    sweep, created = await run_in_threadpool(_create, settings, store, raw, idempotency_key)
    if created:
        scheduler.wake()
    return JSONResponse(json_safe(sweep), status_code=201 if created else 200)


def _create(settings, store, raw, idempotency_key):
    try:
        return create_sweep(settings, store, raw, idempotency_key)
    except (SpecError, Refused) as err:  # a SweepError is a SpecError
        raise HTTPException(422, str(err))
    except IdempotencyConflict as err:
        raise HTTPException(409, str(err))


@router.get("", summary="List sweeps, newest first")
def list_sweeps(store: StoreDep,
                state: Annotated[str | None, Query(description="one of " + ", ".join(STATES))] = None,
                limit: Annotated[int, Query(ge=1, le=100_000)] = 1000):
    if state is not None and state not in STATES:
        raise HTTPException(422, f"state must be one of {', '.join(STATES)}, got {state!r}")
    return {"sweeps": store.list_sweeps(state, limit)}


@router.get("/{sweep_id}", summary="A sweep: state, trials by state, leaderboard, best trial, promotions")
def get_sweep(sweep_id: str, store: StoreDep):
    try:
        return json_safe(sweep_view(store, sweep_id))
    except NotFound as err:
        raise HTTPException(404, str(err))


@router.post("/{sweep_id}/cancel", summary="Cancel a sweep and its queued and running trial jobs; no body, or any JSON")
def cancel(sweep_id: str, _body: OptionalJSON, store: StoreDep, scheduler: SchedulerDep):
    try:
        scheduler.sweeps.cancel(sweep_id)
    except NotFound as err:
        raise HTTPException(404, str(err))
    except IllegalTransition as err:
        raise HTTPException(409, str(err))
    return json_safe(sweep_view(store, sweep_id))
