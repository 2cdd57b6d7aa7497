"""How the API reads request bodies: at most `max_body_bytes`, JSON only
(sent as `application/json`), and the two bodies the API defines itself as pydantic models.

(A job spec is `core.spec`'s: the submit route hands it to `parse_spec`.)
Every refusal reads like the rest of the API's errors, naming the field and
the value: a body model raises `refused(message)`, which the app's validation
handler shows as it is.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_PREDICT_ROWS = 100_000
JSON_TYPE = "application/json"
REFUSED = "shardprop_refused"  # the error type whose message is a whole `detail`
Body = TypeVar("Body", bound=BaseModel)


class BodyLimit:
    """ASGI middleware refusing bodies over `max_bytes` with 413: at once when
    the declared Content-Length is over it, and as soon as the bytes
    received pass it when the body is streamed (no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.max_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            return await _refusal(400, f"Content-Length must be an integer, got {length!r}")(scope, receive, send)
        if length is not None and int(length) > cap:
            return await _refusal(413, f"request body is {length} bytes, the limit is {cap}")(scope, receive, send)
        received = 0

        async def receive_capped() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cap:  # raised inside the route: the app's HTTP error handler answers
                raise HTTPException(413, f"request body exceeds the limit of {cap} bytes")
            return message

        await self.app(scope, receive_capped, send)


def _refusal(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def read_json(request: Request) -> Any:
    """The body as JSON, or a 400 saying why it is not; 415 unless it is sent
    as `application/json` (a page can send any other type to any origin
    without asking first, see service/guard.py)."""
    body = await request.body()
    if not body.strip():
        raise HTTPException(400, "request body is empty; expected a JSON object")
    return _decode(body, request.headers.get("content-type"))


async def read_optional_json(request: Request) -> Any:
    """As `read_json`, but an empty body is None: for calls whose body says nothing."""
    body = await request.body()
    return _decode(body, request.headers.get("content-type")) if body.strip() else None


def _decode(body: bytes, content_type: str | None) -> Any:
    media, *params = (content_type or "").split(";")
    charsets = [v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                if k.strip().lower() == "charset"]
    if media.strip().lower() != JSON_TYPE or any(c not in ("utf-8", "utf8") for c in charsets):
        given = f"{content_type!r:.100}" if content_type is not None else "none"
        raise HTTPException(415, f"Content-Type must be {JSON_TYPE} (optionally; charset=utf-8), got {given}")
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise HTTPException(400, f"request body is not UTF-8: {err}")
    except json.JSONDecodeError as err:
        raise HTTPException(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}")
    except (ValueError, RecursionError) as err:  # a 5000-digit integer, nesting deeper than Python's stack
        raise HTTPException(400, f"malformed JSON: {str(err) or type(err).__name__}")


RawJSON = Annotated[Any, Depends(read_json)]
OptionalJSON = Annotated[Any, Depends(read_optional_json)]


def validated(model: type[Body], raw: Any, **context) -> Body:
    """`raw` as `model` (`context` is the validators'), or a 422 naming what is wrong.

    A route takes `raw: RawJSON` (after the job its path names) and calls
    this itself, rather than taking a FastAPI body parameter, so that a
    request is checked in the order the API answers in: the token (401), the
    job the path names (404), the body's type (415) and JSON (400), the
    body's fields (422)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False), body=raw)


def documented(model: type[BaseModel]) -> dict:
    """`openapi_extra` showing `model` as a route's JSON body in /docs (a
    model without nested models: their `$defs` would not resolve there)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# ---------------------------------------------------------------- the bodies


def refused(message: str) -> PydanticCustomError:
    return PydanticCustomError(REFUSED, message)


def _fields(raw: Any, allowed: set[str], example: str, hint: str = "") -> dict:
    if not isinstance(raw, dict):
        raise refused(f"body must be an object like {example}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise refused(f"{unknown[0]}: unknown field{hint}")
    return raw


class Resize(BaseModel):
    """`{"workers": n}`: the new number of gradient workers of a running job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"workers": 2}]})
    workers: StrictInt

    @model_validator(mode="before")
    @classmethod
    def _check(cls, raw: Any) -> Any:
        raw = _fields(raw, {"workers"}, '{"workers": 2}', " (only 'workers' can be changed)")
        if "workers" not in raw:
            raise refused("workers: field required")
        workers = raw["workers"]
        if not isinstance(workers, int) or isinstance(workers, bool):
            raise refused(f"workers must be an integer, got {workers!r}")
        return raw


class Predict(BaseModel):
    """`{"rows": [[...], ...]}`: at most MAX_PREDICT_ROWS rows of finite
    numbers, all of one length: the model's input width when the context
    gives it (`validated(Predict, raw, width=..., widest=..., max_values=...)`),
    and at most `max_values` when multiplied by the model's widest layer
    (the size of the largest array predicting builds)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"rows": [[0.0, 1.5, 2.0]]}]})
    rows: list[list[float]]

    @model_validator(mode="before")
    @classmethod
    def _check(cls, raw: Any, info: ValidationInfo) -> Any:
        width = (info.context or {}).get("width")
        rows = _fields(raw, {"rows"}, '{"rows": [[...]]}').get("rows")
        if not isinstance(rows, list) or not rows:
            raise refused(f"rows must be a non-empty list of rows, got {rows!r:.80}")
        if len(rows) > MAX_PREDICT_ROWS:
            raise refused(f"rows has {len(rows)} rows, at most {MAX_PREDICT_ROWS} are allowed")
        widest, limit = (info.context or {}).get("widest"), (info.context or {}).get("max_values")
        if widest is not None and limit is not None and len(rows) * widest > limit:
            raise refused(f"rows has {len(rows)} rows and the model's widest layer {widest} units: "
                          f"{len(rows) * widest} values, more than the limit of {limit} (max_predict_values)")
        for i, row in enumerate(rows):
            if not isinstance(row, list):
                raise refused(f"rows[{i}] must be a list of numbers, got {row!r:.80}")
            if width is not None and len(row) != width:
                raise refused(f"rows[{i}] has {len(row)} values, the model takes {width}")
            for j, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not _fits_float64(v):
                    shown = f"an integer of {len(str(abs(v)))} digits" if type(v) is int else f"{v!r:.80}"
                    raise refused(f"rows[{i}][{j}] must be a finite number within float64's range, got {shown}")
        if len({len(r) for r in rows}) != 1:
            raise refused("rows must all have the same length")
        return raw


def _fits_float64(v: int | float) -> bool:
    try:
        return math.isfinite(float(v))  # an int past 1.8e308 raises OverflowError
    except OverflowError:
        return False
