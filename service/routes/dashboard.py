"""/, /sweeps and /static/*: the dashboard, its pages and their scripts and styles, served
as they are from `service/static/` (no build step, nothing from a CDN). The
files are read once, at import; only those names are served, so no path
from a request ever reaches the file system. The page holds no data: it
asks the job API for it (with the token, when the service has one)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8"}
FILES = {f.name: f.read_bytes() for f in resources.files("service").joinpath("static").iterdir()
         if f.is_file() and any(f.name.endswith(suffix) for suffix in TYPES)}
PAGE, SWEEPS_PAGE = FILES["index.html"].decode(), FILES["sweep.html"].decode()
# Revalidated on every load: a page from a newer service never runs an older script.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@router.get("/", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=HEADERS)


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps_page() -> HTMLResponse:
    """A sweep's leaderboard and its trials' validation curves (?sweep=ID)."""
    return HTMLResponse(SWEEPS_PAGE, headers=HEADERS)


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, f"no dashboard file {name[:80]!r}")
    return Response(FILES[name], media_type=TYPES[name[name.rindex("."):]], headers=HEADERS)
