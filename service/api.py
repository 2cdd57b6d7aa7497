"""The HTTP API: FastAPI, one router per resource.

`create_app(settings)` builds the app with its store and scheduler; extra
routers (the dashboard, Prometheus) are passed in. Every error is
`{"detail": "..."}` naming the field and the value; bad input never gets a 5xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
from contextlib import asynccontextmanager
from typing import Iterable

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.data import DataError, resolve_data_path
from core.spec import BUILTIN_SOURCES, SpecError, parse_spec
from service.metrics import ServiceMetrics
from service.scheduler import NotRunning, Scheduler
from service.settings import Settings
from service.signals import reclaim_stop_signals
from service.states import STATES
from service.store import IdempotencyConflict, IllegalTransition, NotFound, Store

log = logging.getLogger("shardprop.api")

MAX_PREDICT_ROWS = 100_000
MAX_IDEMPOTENCY_KEY = 200
CANCEL_WAIT_S = 2.0  # a running job stops within a step or two; clients time out after 5 s or more


def _error(status: int, detail: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=detail, headers=headers)


# ---------------------------------------------------------------- request helpers


async def read_json(request: Request, settings: Settings):
    """The body as JSON, refusing bodies over the cap (413) and malformed JSON (400)."""
    cap = settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise _error(400, f"Content-Length must be an integer, got {length!r}")
        if declared > cap:
            raise _error(413, f"request body is {declared} bytes, the limit is {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _error(413, f"request body exceeds the limit of {cap} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise _error(400, "request body is empty; expected a JSON object")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _error(400, f"request body is not UTF-8: {err}")
    except json.JSONDecodeError as err:
        raise _error(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}")
    except (ValueError, RecursionError) as err:
        raise _error(400, f"malformed JSON: {str(err) or type(err).__name__}")


def _canonical_hash(raw) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _clean(value):
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


# ---------------------------------------------------------------- routers


def jobs_router(settings: Settings, store: Store, scheduler: Scheduler) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    def require_token(authorization: str | None = Header(None)) -> None:
        if not settings.token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise _error(401, "missing or wrong bearer token (Authorization: Bearer <SHARDPROP_TOKEN>)",
                         {"WWW-Authenticate": "Bearer"})

    def get_or_404(job_id: str, details: bool = False) -> dict:
        try:
            return with_waiting(store.get_job(job_id, details=details))
        except NotFound as err:
            raise _error(404, str(err))

    def with_waiting(job: dict) -> dict:
        # FIFO: every queued job waits on what holds up the head of the queue
        job["waiting_for"] = scheduler.waiting_for if job["state"] == "queued" else None
        return job

    @router.post("", status_code=201, dependencies=[Depends(require_token)],
                 summary="Submit a job (body: the job spec as JSON)")
    async def submit(request: Request,
                     idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
        raw = await read_json(request, settings)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise _error(422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters, "
                              f"got {len(idempotency_key)}")
        # validation and SQLite off the event loop
        job, created = await run_in_threadpool(_create, raw, idempotency_key)
        if created:
            scheduler.wake()
        return JSONResponse(job, status_code=201 if created else 200)

    def _create(raw, idempotency_key: str | None) -> tuple[dict, bool]:
        try:
            spec = parse_spec(raw)
        except SpecError as err:
            raise _error(422, str(err))
        if spec.data.source not in BUILTIN_SOURCES:
            try:
                resolve_data_path(spec.data.source, [str(r) for r in settings.data_roots])
            except DataError as err:
                raise _error(422, str(err))
        try:
            return store.create_job(spec.model_dump(mode="json"), idempotency_key=idempotency_key,
                                    body_hash=_canonical_hash(raw) if idempotency_key else None)
        except IdempotencyConflict as err:
            raise _error(409, str(err))

    @router.get("", summary="List jobs, newest first")
    def list_jobs(state: str | None = Query(None, description="one of " + ", ".join(STATES)),
                  limit: int = Query(1000, ge=1, le=100_000)):
        if state is not None and state not in STATES:
            raise _error(422, f"state must be one of {', '.join(STATES)}, got {state!r}")
        return {"jobs": [with_waiting(job) for job in store.list_jobs(state, limit)]}

    @router.get("/{job_id}", summary="A job: spec, state, step, latest metrics, transitions")
    def get_job(job_id: str):
        return _clean(get_or_404(job_id, details=True))

    @router.get("/{job_id}/metrics", summary="The per-step history")
    def metrics(job_id: str, since: int = Query(0, ge=0, description="only steps after this one")):
        try:
            return _clean({"job_id": job_id, "metrics": store.metrics(job_id, since)})
        except NotFound as err:
            raise _error(404, str(err))

    @router.post("/{job_id}/cancel", dependencies=[Depends(require_token)],
                 summary="Cancel a job (a running one is given a few seconds to stop)")
    def cancel(job_id: str):
        get_or_404(job_id)
        try:
            scheduler.cancel(job_id, wait_s=CANCEL_WAIT_S)
        except IllegalTransition as err:
            raise _error(409, str(err))
        return get_or_404(job_id)

    @router.patch("/{job_id}", dependencies=[Depends(require_token)],
                  summary='Resize a running job: {"workers": n}')
    async def resize(job_id: str, request: Request):
        raw = await read_json(request, settings)
        get_or_404(job_id)
        if not isinstance(raw, dict):
            raise _error(422, f"body must be an object like {{\"workers\": 2}}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"workers"})
        if unknown:
            raise _error(422, f"{unknown[0]}: unknown field (only 'workers' can be changed)")
        if "workers" not in raw:
            raise _error(422, "workers: field required")
        workers = raw["workers"]
        if not isinstance(workers, int) or isinstance(workers, bool):
            raise _error(422, f"workers must be an integer, got {workers!r}")
        try:
            await run_in_threadpool(scheduler.resize, job_id, workers)
        except NotRunning as err:
            raise _error(409, str(err))
        except ValueError as err:
            raise _error(422, str(err))
        return get_or_404(job_id)

    @router.get("/{job_id}/model", summary="The trained model file (MLP.save format)")
    def model(job_id: str):
        job = get_or_404(job_id)
        path = settings.model_path(job_id)
        if job["state"] != "succeeded" or not path.exists():
            raise _error(409, f"job {job_id} is {job['state']}; a model exists only once it has succeeded")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.npz")

    models: dict[str, object] = {}

    @router.post("/{job_id}/predict", dependencies=[Depends(require_token)],
                 summary='Predict: {"rows": [[...], ...]} -> {"outputs", "labels"}')
    async def predict(job_id: str, request: Request):
        raw = await read_json(request, settings)
        return await run_in_threadpool(_predict, job_id, raw)

    def _predict(job_id: str, raw) -> dict:
        from core.mlp import MLP
        from core.trainer import predicted_labels

        job = get_or_404(job_id)
        path = settings.model_path(job_id)
        if job["state"] != "succeeded" or not path.exists():
            raise _error(409, f"job {job_id} is {job['state']}; predictions need a succeeded job")
        net = models.get(job_id)
        if net is None:
            net = models[job_id] = MLP.load(path)
            if len(models) > 32:
                models.pop(next(iter(models)))
        rows = _rows(raw, net.config["sizes"][0])
        outputs = np.asarray(net.predict(rows), dtype=float)
        result = {"outputs": outputs.tolist(), "labels": None}
        if net.config.get("loss") == "cross_entropy":
            result["labels"] = predicted_labels(outputs).tolist()
        return _clean(result)

    return router


def _rows(raw, width: int | None) -> np.ndarray:
    if not isinstance(raw, dict):
        raise _error(422, f'body must be an object like {{"rows": [[...]]}}, got {type(raw).__name__}')
    unknown = sorted(set(raw) - {"rows"})
    if unknown:
        raise _error(422, f"{unknown[0]}: unknown field")
    rows = raw.get("rows")
    if not isinstance(rows, list) or not rows:
        raise _error(422, f"rows must be a non-empty list of rows, got {rows!r:.80}")
    if len(rows) > MAX_PREDICT_ROWS:
        raise _error(422, f"rows has {len(rows)} rows, at most {MAX_PREDICT_ROWS} are allowed")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise _error(422, f"rows[{i}] must be a list of numbers, got {row!r:.80}")
        if width is not None and len(row) != width:
            raise _error(422, f"rows[{i}] has {len(row)} values, the model takes {width}")
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _error(422, f"rows[{i}][{j}] must be a finite number, got {v!r:.80}")
    if len({len(r) for r in rows}) != 1:
        raise _error(422, "rows must all have the same length")
    return np.asarray(rows, dtype=np.float64)


def health_router(store: Store, scheduler: Scheduler) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    def healthz():
        return {"status": "ok", "jobs": store.counts(), "running": scheduler.running_ids(),
                "max_concurrent_jobs": scheduler.max_concurrent_jobs, "ray": scheduler.ray_status(),
                "waiting_for": scheduler.waiting_for}

    return router


# ---------------------------------------------------------------- the app


def _format_validation(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{loc or 'request'}: {e.get('msg')} (got {e.get('input')!r:.80})")
    return "; ".join(parts)


def create_app(settings: Settings, scheduler: Scheduler | None = None, *,
               store: Store | None = None, extra_routers: Iterable[APIRouter] = (),
               metrics=None) -> FastAPI:
    """The service. Owns (starts and stops) the scheduler it creates or is given."""
    if scheduler is None:
        store = store or Store(settings.store_path)
        scheduler = Scheduler(settings, store, metrics if metrics is not None else ServiceMetrics())
    store = scheduler.store

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        scheduler.on_ray_connected = lambda: loop.call_soon_threadsafe(reclaim_stop_signals)
        scheduler.start()
        try:
            yield
        finally:
            scheduler.on_ray_connected = None  # uvicorn is putting its own handlers back
            left = scheduler.stop()
            if left:
                log.warning("stopped; job(s) %s stay running and resume from their latest checkpoint at the next "
                            "start", ", ".join(left))

    app = FastAPI(title="shardprop", version="0.1.0", lifespan=lifespan,
                  description="Distributed data-parallel training jobs on Ray.")
    app.state.settings, app.state.store, app.state.scheduler = settings, store, scheduler

    @app.middleware("http")
    async def cap_declared_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse({"detail": f"request body is {length} bytes, the limit is "
                                           f"{settings.max_body_bytes}"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return JSONResponse({"detail": _format_validation(err)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)

    app.include_router(jobs_router(settings, store, scheduler))
    app.include_router(health_router(store, scheduler))
    for router in extra_routers:
        app.include_router(router)
    return app
