"""The HTTP API: the FastAPI app, its error handlers, and the routers of
`service/routes/` (jobs, models, sweeps, health, the dashboard, Prometheus).

`create_app(settings)` builds the app with its store, scheduler and metrics,
kept in `app.state`, where `service/deps.py` reads them for the routes. Every
request passes `service/guard.py` first (Host, Origin). Every error is
`{"detail": "..."}` naming the field and the value; bad input never gets a
5xx.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.bodies import REFUSED, BodyLimit
from service.guard import BrowserGuard
from service.metrics import ServiceMetrics
from service.provenance import code_version
from service.routes import dashboard, health, jobs, models, prometheus, sweeps
from service.scheduler import Scheduler
from service.settings import Settings
from service.signals import reclaim_stop_signals
from service.store import Store, StoreBusy, StoreUnavailable
from service.store_lock import StoreOwner

log = logging.getLogger("shardprop.api")

ROUTERS = (jobs.router, models.router, sweeps.router, health.router, dashboard.router, prometheus.router)


def create_app(settings: Settings, scheduler: Scheduler | None = None, *,
               store: Store | None = None, extra_routers: Iterable[APIRouter] = (),
               metrics: ServiceMetrics | None = None, owner: StoreOwner | None = None) -> FastAPI:
    """The service. Owns (starts and stops) the scheduler it creates or is given.
    It runs only as the store's one owner: with `owner`, the lock `serve` took
    first; without, its lifespan takes it (StoreOwned if another holds it)."""
    code_version()  # found once, at start (a git call): every job submitted records it
    if scheduler is None:
        store = store or Store(settings.store_path)
        scheduler = Scheduler(settings, store, metrics if metrics is not None else ServiceMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        held = owner or StoreOwner.acquire(settings.store_path, settings.url)
        loop = asyncio.get_running_loop()
        scheduler.ray.on_connected = lambda: loop.call_soon_threadsafe(reclaim_stop_signals)
        scheduler.start()
        try:
            yield
        finally:
            scheduler.ray.on_connected = None  # uvicorn is putting its own handlers back
            try:
                left = scheduler.stop()
                if left:
                    log.warning("stopped; job(s) %s stay running and resume from their latest checkpoint at the "
                                "next start", ", ".join(left))
                scheduler.store.flush()  # what jobs reported while the file was locked
            finally:
                held.release()

    app = FastAPI(title="shardprop", version="0.1.0", lifespan=lifespan,
                  description="Distributed data-parallel training jobs on Ray.")
    app.state.settings, app.state.store = settings, scheduler.store
    app.state.scheduler, app.state.metrics = scheduler, scheduler.metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BrowserGuard, settings=settings)  # added last: runs first
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_exception_handler(StoreBusy, _store_busy)  # a StoreUnavailable, answered sooner
    app.add_exception_handler(Exception, _internal_error)
    for router in (*ROUTERS, *extra_routers):
        app.include_router(router)
    return app


# ---------------------------------------------------------------- errors


def _format_validation(err: RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        if e.get("type") == REFUSED:  # one of our own messages (service/bodies.py), whole
            parts.append(e["msg"])
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header"))
        parts.append(f"{loc or 'request'}: {e.get('msg')} (got {e.get('input')!r:.80})")
    return "; ".join(parts)


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _format_validation(err)}, status_code=422)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=err.headers)


async def _store_unavailable(request: Request, err: StoreUnavailable) -> JSONResponse:
    # 507 Insufficient Storage for a full disk, 503 for other disk errors; nothing was stored
    log.error("%s %s: %s", request.method, request.url.path, err)
    return JSONResponse({"detail": f"{err}; nothing was stored, try again later"},
                        status_code=507 if err.disk_full else 503, headers={"Retry-After": "10"})


async def _store_busy(request: Request, err: StoreBusy) -> JSONResponse:
    return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after_s)})


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)
