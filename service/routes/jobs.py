"""/v1/jobs: submit, list, read, follow (per-step metrics, events), cancel and resize jobs."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from core.data import DataError
from core.spec import SpecError, parse_spec
from service.admission import Refused, admit
from service.bodies import OptionalJSON, RawJSON, Resize, documented, validated
from service.deps import JobDep, SchedulerDep, SettingsDep, StoreDep, find_job, require_token, with_waiting
from service.jsonable import json_safe
from service.provenance import job_provenance, spec_sha256
from service.scheduler import NotRunning
from service.settings import Settings
from service.states import STATES
from service.store import IdempotencyConflict, IllegalTransition, NotFound, Store

MAX_IDEMPOTENCY_KEY = 200
MAX_NAME_FILTER = 200  # characters of GET /v1/jobs?name=
METRICS_PAGE, MAX_METRICS_PAGE = 1000, 10_000  # records per GET .../metrics, by default and at most
EVENTS_PAGE, MAX_EVENTS_PAGE = 1000, 10_000  # events per GET .../events, by default and at most
CANCEL_WAIT_S = 2.0  # a running job stops within a step or two; clients time out after 5 s or more

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)])


def check_idempotency_key(key: str | None) -> None:
    """A 422 for an Idempotency-Key header that is empty or too long (jobs' and sweeps')."""
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise HTTPException(422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters, got {len(key)}")


@router.post("", status_code=201,
             summary="Submit a job (body: the job spec as JSON)")
async def submit(raw: RawJSON, settings: SettingsDep, store: StoreDep, scheduler: SchedulerDep,
                 idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None):
    # raw is any JSON: parse_spec says what is wrong with it
    check_idempotency_key(idempotency_key)
    # validation, admission and SQLite off the event loop
    job, created = await run_in_threadpool(_create, settings, store, raw, idempotency_key)
    if created:
        scheduler.wake()
    return JSONResponse(job, status_code=201 if created else 200)


def _create(settings: Settings, store: Store, raw, idempotency_key: str | None) -> tuple[dict, bool]:
    try:
        spec = parse_spec(raw)
    except SpecError as err:
        raise HTTPException(422, str(err))
    try:
        admit(spec, settings)  # reads the data's metadata in bounded memory
    except Refused as err:
        raise HTTPException(422, str(err))
    try:
        provenance = job_provenance(spec, settings)  # the data's bytes read once, in chunks
    except (DataError, OSError) as err:  # gone or unreadable since admission read it
        raise HTTPException(422, f"data.source {spec.data.source!r}: {getattr(err, 'strerror', None) or err}")
    try:
        return store.create_job(spec.model_dump(mode="json"), idempotency_key=idempotency_key,
                                body_hash=spec_sha256(spec) if idempotency_key else None, provenance=provenance)
    except IdempotencyConflict as err:
        raise HTTPException(409, str(err))


@router.get("", summary="List jobs, newest first")
def list_jobs(store: StoreDep, scheduler: SchedulerDep,
              state: Annotated[str | None, Query(description="one of " + ", ".join(STATES))] = None,
              name: Annotated[str | None, Query(max_length=MAX_NAME_FILTER,
                                                description="only jobs whose name contains this (any case)")] = None,
              limit: Annotated[int, Query(ge=1, le=100_000)] = 1000):
    if state is not None and state not in STATES:
        raise HTTPException(422, f"state must be one of {', '.join(STATES)}, got {state!r}")
    # The dashboard polls this with hundreds of jobs: plain data, encoded once (not by jsonable_encoder)
    return JSONResponse({"jobs": [with_waiting(job, scheduler) for job in store.list_jobs(state, limit, name=name)]})


@router.get("/{job_id}", summary="A job: spec, state, step, latest metrics, transitions")
def get_job(job_id: str, store: StoreDep, scheduler: SchedulerDep):
    return json_safe(find_job(store, scheduler, job_id, details=True))


@router.get("/{job_id}/metrics", summary="The per-step history, a page at a time")
def metrics(job_id: str, store: StoreDep,
            since: Annotated[int, Query(ge=0, description="only steps after this one")] = 0,
            limit: Annotated[int, Query(ge=1, le=MAX_METRICS_PAGE, description="at most this many records")]
            = METRICS_PAGE):
    """`next_since` is the `since` to ask for next (the last step given, or
    `since` when none); `more` says whether steps after it are stored already."""
    try:
        records = store.metrics_json(job_id, since, limit + 1)
    except NotFound as err:
        raise HTTPException(404, str(err))
    page = records[:limit]
    next_since = json.loads(page[-1])["step"] if page else since
    # Polled often: the records go out as the JSON text they were stored as.
    body = (f'{{"job_id":{json.dumps(job_id)},"metrics":[{",".join(page)}],"next_since":{next_since},'
            f'"more":{json.dumps(len(records) > limit)}}}')
    return Response(body, media_type="application/json")


@router.get("/{job_id}/events", summary="The job's timeline (state changes, failures, recoveries), a page at a time")
def events(job_id: str, store: StoreDep,
           since: Annotated[int, Query(ge=0, description="only events numbered after this one")] = 0,
           limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE, description="at most this many events")]
           = EVENTS_PAGE):
    """Events are numbered 1, 2, ... per job, and a number is never given
    twice (also across a restart of the service): a reader that asks again
    from the last `seq` it holds misses nothing and sees nothing twice.
    `next_since` is the `since` to ask for next; `more`: more are stored."""
    try:
        found = store.events(job_id, since, limit + 1)
    except NotFound as err:
        raise HTTPException(404, str(err))
    page = found[:limit]
    return {"job_id": job_id, "events": page, "next_since": page[-1]["seq"] if page else since,
            "more": len(found) > limit}


@router.post("/{job_id}/cancel",
             summary="Cancel a job (a running one is given a few seconds to stop); no body, or any JSON")
def cancel(job_id: str, _: JobDep, _body: OptionalJSON, store: StoreDep, scheduler: SchedulerDep):
    try:
        scheduler.cancel(job_id, wait_s=CANCEL_WAIT_S)
    except IllegalTransition as err:
        raise HTTPException(409, str(err))
    return find_job(store, scheduler, job_id)


@router.patch("/{job_id}", openapi_extra=documented(Resize),
              summary='Resize a running job: {"workers": n}')
def resize(job_id: str, _: JobDep, raw: RawJSON, store: StoreDep, scheduler: SchedulerDep):
    workers = validated(Resize, raw).workers
    try:
        scheduler.resize(job_id, workers)
    except NotRunning as err:
        raise HTTPException(409, str(err))
    except ValueError as err:  # the coordinator names the bounds
        raise HTTPException(422, str(err))
    return find_job(store, scheduler, job_id)
