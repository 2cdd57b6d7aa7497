"""What keeps a web page the user happens to have open from using the
service: the `Host` header must name the service (against DNS rebinding),
and a request that changes state must come from the service's own origin
(against cross-site request forgery). No CORS headers are ever sent, so no
other origin can read an answer either. docs/security.md has the rules.

`BrowserGuard` is ASGI middleware, so these checks come before any route:
a refused request reaches no route and stores nothing.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # the methods no route changes state on
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
DEFAULT_PORTS = {"http": 80, "https": 443}
# Fetch Metadata: "same-site" is another port or subdomain of this site (a
# dev server on localhost:3000 is same-site with localhost:8470): refused too.
REFUSED_FETCH_SITES = ("cross-site", "same-site")


def split_host(value: str, default_port: int | None) -> tuple[str, int | None]:
    """`name[:port]` (an IPv6 address in brackets) as (lower-case name, port);
    port None when it is not a number."""
    value = value.strip().lower()
    name, sep, port = value.rpartition(":")
    if not sep or (name.startswith("[") and not name.endswith("]")) or ("[" not in name and ":" in name):
        return value, default_port  # no port; or a bare IPv6 address, whose colons are not a port
    return name, int(port) if port.isdigit() else None


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def served_names(settings: Settings, local_address: str | None) -> set[str]:
    """The names a request may give in `Host` (with the served port): the
    bind address; for a loopback bind also the loopback names; for a
    wildcard bind the loopback names and the address the request came in on
    (a wildcard serves every address of the machine)."""
    host = settings.host.strip().lower()
    if host in WILDCARDS:
        return {*LOOPBACK_NAMES, *([_bracketed(local_address.lower())] if local_address else [])}
    names = {_bracketed(host)}
    if is_loopback(host):
        names.update(LOOPBACK_NAMES)
    return names


class BrowserGuard:
    """ASGI middleware: `Host` checked on every request (`421`), `Origin` and
    `Sec-Fetch-Site` on every request whose method can change state (`403`)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings
        self.extra = [split_host(h, None) for h in settings.allowed_hosts]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope, Headers(scope=scope))
            if refusal is not None:
                status, detail = refusal
                return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        scheme = scope.get("scheme", "http")
        host = headers.get("host")
        if not host:
            return 400, "the request has no Host header"
        if not self._serves(host, scheme, scope.get("server")):
            return 421, (f"Host {host!r:.100} is not an address this service answers to "
                         "(to add one, start it with serve --allowed-host NAME)")
        if scope["method"] in SAFE_METHODS:
            return None
        site = headers.get("sec-fetch-site", "").lower()
        if site in REFUSED_FETCH_SITES:
            return 403, (f"Sec-Fetch-Site is {site}: a page from another site may not {scope['method']} "
                         "here; use the dashboard this service serves, or a client outside the browser")
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, scheme, host):
            return 403, (f"Origin {origin!r:.100} is not this service's own ({scheme}://{host}): "
                         f"cross-origin {scope['method']} refused")
        return None

    def _serves(self, host: str, scheme: str, server: tuple | None) -> bool:
        local_address, port = (server or (None, None))[:2]
        port = port or self.settings.port
        name, given_port = split_host(host, DEFAULT_PORTS.get(scheme))
        if given_port is None:
            return False
        if (name, None) in self.extra or (name, given_port) in self.extra:
            return True  # a name the operator gave: with any port (a proxy's), or the one given with it
        return given_port == port and name in served_names(self.settings, local_address)


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """`Origin` (`scheme://name[:port]`, or `null`) names the same scheme,
    name and port as this request's scheme and (already checked) Host."""
    given_scheme, sep, authority = origin.strip().lower().partition("://")
    if not sep or given_scheme != scheme or "/" in authority:
        return False
    default = DEFAULT_PORTS.get(scheme)
    return split_host(authority, default) == split_host(host, default)
