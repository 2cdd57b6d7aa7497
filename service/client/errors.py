"""The client's exceptions: one class per kind of answer, each carrying the
service's own message (`.message`) and the HTTP status (`.status`).

    ShardpropError                 anything the client raises on purpose
    ├── Unreachable                no answer (connection refused, reset, timed out)
    ├── Unauthorized   401         missing or wrong token
    ├── Forbidden      403         refused by the browser guard (Host, Origin)
    ├── NotFound       404         no such job (or model)
    ├── Conflict       409         the job's state does not allow it
    ├── TooLarge       413         the body is over the service's limit
    ├── Refused        422         the spec or the request is invalid, or admission refused it
    ├── Busy           503         the store is busy or the service is starting; `.retry_after` seconds
    ├── Unavailable    507 / 5xx   the store cannot be written, or an internal error
    ├── JobFailed                  the job ended failed (`.job`: its status; `.message`: its error)
    ├── JobCancelled               the job ended cancelled
    └── Timeout                    `Job.wait` gave up (also a TimeoutError)
"""

from __future__ import annotations

import httpx


class ShardpropError(Exception):
    """`str(err)` is one line for a user: "<status>: <message>", or the message."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.message = message
        self.status = status


class Unreachable(ShardpropError):
    pass


class Unauthorized(ShardpropError):
    pass


class Forbidden(ShardpropError):
    pass


class NotFound(ShardpropError):
    pass


class Conflict(ShardpropError):
    pass


class TooLarge(ShardpropError):
    pass


class Refused(ShardpropError):
    pass


class Busy(ShardpropError):
    def __init__(self, message: str, status: int | None = 503, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after


class Unavailable(ShardpropError):
    pass


class JobEnded(ShardpropError):
    """A job that ended otherwise than succeeded; `.job` is its status."""

    def __init__(self, message: str, job: dict):
        super().__init__(message)
        self.job = job


class JobFailed(JobEnded):
    pass


class JobCancelled(JobEnded):
    pass


class Timeout(ShardpropError, TimeoutError):
    pass


BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge, 422: Refused}


def error_for(response: httpx.Response) -> ShardpropError:
    """The exception an error answer stands for, with the service's message."""
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else body
    except ValueError:
        detail = response.text.strip()[:200]
    message = detail if isinstance(detail, str) else str(detail)
    status = response.status_code
    if status == 503:
        return Busy(message, status, _seconds(response.headers.get("Retry-After")))
    if status >= 500:
        return Unavailable(message, status)
    return BY_STATUS.get(status, ShardpropError)(message, status)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
