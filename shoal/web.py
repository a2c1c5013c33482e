"""What every component's HTTP side shares: one way to answer an error, one way to guard a route,
health, readiness, metrics, and running the app."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shoal import errors, protocol
from shoal.errors import ShoalError

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason shown by /readyz."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Who may call a route: anyone ("public"), a cluster node with the node token ("node"), or the
# origin registering torrents at the tracker ("registration"). Declared once per route, in the
# route table; checked before the handler runs, so a handler cannot forget it.
Guard = Literal["public", "node", "registration"]
GUARDS_KEY = web.AppKey("guards", dict)
_REFUSALS: dict[str, str] = {
    "node": "this API is for cluster nodes (the node token)",
    "registration": "this API is for the origin (the registration token)",
}


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> web.Response:
    """The one error answer of every component: the OCI error document, whose status and code
    come from the error (a ShoalError, or aiohttp's own 4xx for unknown paths and methods);
    anything else is a 500 that says nothing about its cause (the caller logs it)."""
    if isinstance(exc, ShoalError):
        oci, message, detail = exc.oci, str(exc), exc.detail
    elif isinstance(exc, web.HTTPException) and 400 <= exc.status < 500:
        code = {404: errors.NOT_FOUND, 405: errors.UNSUPPORTED}.get(exc.status, errors.INVALID_REQUEST)
        oci, message, detail = errors.OciCode(code.code, exc.status, exc.reason), exc.reason, None
    else:
        oci, message, detail = errors.UNKNOWN, errors.UNKNOWN.message, None
    return web.Response(status=oci.status, body=errors.error_body(oci, message, detail),
                        headers={"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def error_middleware() -> Middleware:
    """For the origin's and the tracker's APIs (the agent's mirror API has its own, OCI-shaped
    with the registry's headers, built on `error_response` too)."""

    @web.middleware
    async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc)
        except ShoalError as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("internal error serving %s %s", request.method, request.rel_url.path)
            return error_response(exc)

    return api_errors


def guarded(handler: Handler, guard: Guard, expected: str | None,
            refused: Callable[[], None] | None = None) -> Handler:
    """`handler` behind `guard`: the request's Authorization must be exactly `expected`
    ("Bearer <token>"), compared in constant time. `refused` counts a refusal, if given."""
    if guard == "public":
        return handler
    if not expected:
        raise ValueError(f"a {guard!r} route needs its token")
    want = expected.encode()

    async def check(request: web.Request) -> web.StreamResponse:
        # aiohttp decodes header bytes as UTF-8 with surrogateescape: encode them back the same way
        # (invalid UTF-8 from a client is a wrong token, not a crash and an ERROR traceback).
        sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent, want):
            if refused is not None:
                refused()
            raise errors.Unauthorized(_REFUSALS[guard])
        return await handler(request)

    return check


def add_routes(app: web.Application, table: Iterable[tuple[protocol.Route, Handler, Guard]],
               tokens: Mapping[Guard, str],
               refused: Mapping[protocol.Route, Callable[[], None]] | None = None) -> None:
    """Register a component's API: each route with its handler and its guard. The guards are kept
    in app[GUARDS_KEY] so that a test can walk every route and prove each is declared."""
    guards: dict[tuple[str, str], Guard] = app.setdefault(GUARDS_KEY, {})
    for route, handler, guard in table:
        hook = (refused or {}).get(route)
        added = app.router.add_route(route.method, route.pattern, guarded(handler, guard, tokens.get(guard), hook))
        assert added.resource is not None
        guards[(route.method, added.resource.canonical)] = guard


def add_ops_routes(app: web.Application, registry: CollectorRegistry, ready: ReadyCheck,
                   refresh: Callable[[], Awaitable[None]] | None = None) -> None:
    """`refresh`, if given, runs before each /metrics render (e.g. to pull libtorrent's counters)."""
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reason = await ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def metrics(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    add_routes(app, ((protocol.HEALTHZ, healthz, "public"), (protocol.READYZ, readyz, "public"),
                     (protocol.METRICS, metrics, "public")), {})


def run(app: web.Application, host: str, port: int, *, shutdown_timeout: float = 10.0) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (cleanup contexts run)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ShoalError(f"listen: cannot bind {host}:{port}: {exc.strerror}") from None
    log.info("listening on http://%s:%d", host if family == socket.AF_INET else f"[{host}]", port)
    web.run_app(app, sock=sock, access_log=None, print=None, shutdown_timeout=shutdown_timeout,
                handle_signals=True)
