"""/: the live loss dashboard, one self-contained page (no build step, no CDN:
its script and styles are inline) that polls the job API."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = resources.files("service").joinpath("static/index.html").read_text()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard() -> str:
    return PAGE
