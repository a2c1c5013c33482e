"""What every component's HTTP side shares: one way to answer an error, one way to guard a route,
health, readiness, metrics, and running the app within limits a hostile client cannot exhaust."""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal, Protocol

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shoal import errors, protocol
from shoal.errors import ShoalError

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason shown by /readyz."""

WATCHDOG_SECRET_KEY = web.AppKey("watchdog_secret", bytes)
"""Optional: the secret /readyz proves to a watchdog's challenge (protocol.WATCHDOG_*)."""
BEFORE_STOP_KEY = web.AppKey("before_stop", list)
"""Optional: coroutine functions run when the server is told to stop, before its listening
socket closes (the agent takes containerd's files off its address while it still holds it)."""
READY_CHECK_KEY = web.AppKey[ReadyCheck]("ready_check")
"""The app's /readyz check (add_ops_routes keeps it here)."""
SERVICE_READY_KEY = web.AppKey("service_ready", asyncio.Event)
"""Optional: an Event the app sets when it may be called started, beyond /readyz. The agent's
node configurator writes containerd's hosts.toml only once /readyz says ready, and systemd must
not call the agent started (so kubelet, ordered after it, must not start pulling) before those
files exist: the configurator delays READY=1 with this Event. /readyz cannot be that gate (the
configurator waits on it). See service_ready()."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Who may call a route: anyone ("public"), a cluster node with the node token ("node"), the
# origin registering torrents at the tracker ("registration"), the registry's push notifications
# ("registry", the notification token), or an operator holding a role
# ("seed", "audit", "admin"; admin holds every role). Declared once per route, in the route table;
# checked before the handler runs, so a handler cannot forget it.
Guard = Literal["public", "node", "registration", "origin", "registry", "seed", "audit", "admin"]
Role = Literal["seed", "audit", "admin"]
OPERATOR_GUARDS: tuple[Role, ...] = ("seed", "audit", "admin")
GUARDS_KEY = web.AppKey("guards", dict)
_REFUSALS: dict[str, str] = {
    "node": "this API is for cluster nodes (the node token)",
    "registration": "this API is for the origin (the registration token)",
    "origin": "this API is for the cluster's other origins (the peer token)",
    "registry": "this API is for the registry's push notifications (the notification token)",
}


@dataclass(frozen=True, slots=True)
class Operator:
    """Who an operator route is serving, as its guard authenticated them."""

    principal: str  # "token:NAME" for a static token, else the registry's user
    roles: frozenset[str]
    method: Literal["token", "registry"]
    # static tokens: the registry/name globs it may pre-seed
    repositories: tuple[str, ...] = ()
    # registry operators: the Authorization they presented, to ask the registry as them (never
    # logged, never stored)
    credential: str | None = field(default=None, repr=False)

    def has(self, role: Role) -> bool:
        return "admin" in self.roles or role in self.roles


class OperatorAuth(Protocol):
    """How a component authenticates its operators (the origin's origin/operators.py)."""

    async def authenticate(self, request: web.Request, role: Role) -> Operator:
        """The operator presenting the request's credential, if it holds `role`; else raises
        errors.Unauthorized (no usable credential) or errors.Denied (a credential without it)."""
        ...


_OPERATOR = web.RequestKey("operator", Operator)


def operator_of(request: web.Request) -> Operator:
    """The operator an operator route's guard admitted (only such routes may call this)."""
    try:
        return request[_OPERATOR]
    except KeyError:
        raise AssertionError("operator_of() called on a route without an operator guard") from None


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
            refused: Callable[[], None] | None = None, operators: OperatorAuth | None = None) -> Handler:
    """`handler` behind `guard`: for a token guard the request's Authorization must be exactly
    `expected` ("Bearer <token>"), compared in constant time; for an operator guard `operators`
    must authenticate an operator holding that role (the handler reads it with `operator_of`).
    `refused` counts a refusal of a token guard, if given."""
    if guard == "public":
        return handler
    if guard in OPERATOR_GUARDS:
        if operators is None:
            raise ValueError(f"a {guard!r} route needs an operator authenticator")
        role: Role = guard  # (narrowed by the test above)
        auth = operators

        async def operator(request: web.Request) -> web.StreamResponse:
            request[_OPERATOR] = await auth.authenticate(request, role)
            return await handler(request)

        return operator
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
               refused: Mapping[protocol.Route, Callable[[], None]] | None = None,
               operators: OperatorAuth | None = None) -> None:
    """Register a component's API: each route with its handler and its guard. The guards are kept
    in app[GUARDS_KEY] so that a test can walk every route and prove each is declared."""
    guards: dict[tuple[str, str], Guard] = app.setdefault(GUARDS_KEY, {})
    for route, handler, guard in table:
        hook = (refused or {}).get(route)
        added = app.router.add_route(route.method, route.pattern,
                                     guarded(handler, guard, tokens.get(guard), hook, operators))
        assert added.resource is not None
        guards[(route.method, added.resource.canonical)] = guard


def add_ops_routes(app: web.Application, registry: CollectorRegistry, ready: ReadyCheck,
                   refresh: Callable[[], Awaitable[None]] | None = None) -> None:
    """`refresh`, if given, runs before each /metrics render (e.g. to pull libtorrent's counters)."""
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reason = await ready()
        headers = {}
        secret = request.app.get(WATCHDOG_SECRET_KEY)
        challenge = request.headers.get(protocol.WATCHDOG_CHALLENGE_HEADER)
        if secret is not None and challenge is not None and len(challenge) <= 128:
            headers[protocol.WATCHDOG_PROOF_HEADER] = protocol.watchdog_proof(secret, challenge)
        if reason is None:
            return web.json_response({"status": "ready"}, headers=headers)
        return web.json_response({"status": "not ready", "reason": reason}, status=503, headers=headers)

    async def metrics(_: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    add_routes(app, ((protocol.HEALTHZ, healthz, "public"), (protocol.READYZ, readyz, "public"),
                     (protocol.METRICS, metrics, "public")), {})
    app[READY_CHECK_KEY] = ready


async def service_ready(app: web.Application) -> bool:
    """Whether the component may tell its service manager it is started (systemd's READY=1,
    shoal/sdnotify.py): the one place that decision is made. Its /readyz check passes, and the
    Event under SERVICE_READY_KEY, if the app put one there, is set."""
    check = app.get(READY_CHECK_KEY)
    if check is not None and await check() is not None:
        return False
    gate = app.get(SERVICE_READY_KEY)
    return gate is None or gate.is_set()


# What one client may hold of a server (every component's; README "Operations" lists them). A real
# client sends its request head at once (containerd's, a registry token included, is under 4 KiB)
# and its body at the pace of a network; an attacker's trickles, idle connections and oversized
# heads are closed within these bounds, so each connection holds at most a few tens of KiB for a
# few seconds (500 connections sending never-finished 1 MiB heads had taken the origin to 1.09 GB).
HEADER_TIMEOUT = 10.0
"""A request's head (request line and headers) must be complete this long after the connection
opened, or after its first byte on a kept-alive connection; else 408 and the connection closes.
A connection that sends nothing is closed after it too."""
BODY_TIMEOUT = 60.0
"""A request's body must have arrived this long after its head; else the connection closes."""
KEEPALIVE_TIMEOUT = 75.0
"""An idle kept-alive connection is closed after this (aiohttp's run_app default, as before)."""
MAX_HEADER_BYTES = 32 * 1024
"""Request line and headers together (nginx's default is 32 KiB too); past it 431 and close."""
MAX_LINE_SIZE = MAX_FIELD_SIZE = 8190
"""One request line, one header (aiohttp's defaults); past it 400 and close."""
MAX_HEADERS = 64
"""Headers in one request; past it 400 and close."""


def _refusal(status: HTTPStatus, message: str) -> bytes:
    """A whole HTTP/1.1 response, written straight to a connection the server then closes: the
    one error document (INVALID_REQUEST / UNAVAILABLE), never an echo of what the client sent."""
    oci = errors.UNAVAILABLE if status >= 500 else errors.INVALID_REQUEST
    body = errors.error_body(errors.OciCode(oci.code, status, status.phrase), message)
    return (f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_TRIM_AFTER = 128


def _malloc_trim() -> None:
    with suppress(OSError, AttributeError):  # glibc only; elsewhere nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Connections:
    """The open connections of one server, oldest first, at most `limit`. One more closes the
    oldest connection that is not serving a request (idle, or still sending its head): a flood of
    slow or idle connections cannot lock real clients out, and requests being served are never
    cut. When every connection is serving one, the new connection is refused with 503."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[_GuardedHandler, None] = {}
        self._closed = self._refused = 0
        self._reported = float("-inf")
        self._peak = 0  # most connections open at once since the last trim
        self._trim: asyncio.TimerHandle | None = None

    def opened(self, conn: _GuardedHandler) -> None:
        self.open[conn] = None
        self._peak = max(self._peak, len(self.open))
        if len(self.open) <= self.limit:
            return
        victim = next((c for c in self.open if c is not conn and c.waiting()), None)
        if victim is not None:
            self._closed += 1
            victim.refuse(None)
        else:
            self._refused += 1
            conn.refuse(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")
        now = asyncio.get_running_loop().time()
        if now - self._reported >= 60:  # one line a minute at most, however hard the flood
            log.warning("connection limit (%d) reached: closed %d idle or slow connections and refused "
                        "%d new ones since the last report", self.limit, self._closed, self._refused)
            self._reported, self._closed, self._refused = now, 0, 0

    def lost(self, conn: _GuardedHandler) -> None:
        self.open.pop(conn, None)
        if self._peak >= _TRIM_AFTER and len(self.open) <= self._peak // 4:
            # A flood of connections is over: give what glibc kept of their buffers back to the
            # system (origin and agent stayed 60 MiB above their baseline after 1000 connections
            # without it: freed memory in the middle of the heap is never returned on its own).
            self._peak = len(self.open)
            if self._trim is None:  # a second later, when the rest of the flood has closed too
                self._trim = asyncio.get_running_loop().call_later(1.0, self._trimmed)

    def _trimmed(self) -> None:
        self._trim = None
        _malloc_trim()


class _GuardedHandler(RequestHandler):
    """aiohttp's connection, with what it lacks: a deadline for the request head and body (it has
    none; its keep-alive timer covers a connection only between requests), a bound on the head's
    total size (it bounds each line and the number of headers only: 128 x 8 KiB held per
    connection), a body refused from its Content-Length before the handler runs, a place in
    `_Connections`, and a 400 that neither echoes the bad header nor logs a traceback."""

    __slots__ = ("_body", "_connections", "_deadline", "_head_bytes", "_max_body")

    def __init__(self, manager: Server, *, loop: asyncio.AbstractEventLoop, connections: _Connections,
                 max_body: int, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._connections = connections
        self._max_body = max_body
        self._head_bytes = 0  # of the head being received
        self._deadline: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # of the last request, while it arrives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(HEADER_TIMEOUT, self._head_late)
        self._connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.lost(self)
        self._disarm()
        self._body = None
        super().connection_lost(exc)

    def waiting(self) -> bool:
        """Idle or receiving a head: no request being served."""
        return not self._force_close and self._waiter is not None and not self._waiter.done()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        in_body = self._body is not None and not self._body.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a head is complete
            self._head_bytes = 0
            message, body = self._messages[-1] if self._messages else (None, None)
            self._body = body if body is not None and not body.is_eof() else None
            length = message.headers.get("Content-Length", "") if isinstance(message, RawRequestMessage) else ""
            if length.isdigit() and int(length) > self._max_body:
                self._messages.pop()
                self.refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"bodies are at most {self._max_body} bytes")
            elif self._body is not None:
                self._arm(BODY_TIMEOUT, self._body_late)
            else:
                self._disarm()
        elif not in_body and data:
            if self._body is not None:  # the last request's body is complete: this starts a head
                self._body = None
                self._disarm()
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self.refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                            f"request line and headers are at most {MAX_HEADER_BYTES} bytes")
            elif self._deadline is None:
                self._arm(HEADER_TIMEOUT, self._head_late)

    def refuse(self, status: HTTPStatus | None, message: str = "") -> None:
        """Answer `status` (if any) and close the connection, whatever it was doing."""
        self._disarm()
        if status is not None and self.transport is not None:
            log.debug("closing a connection from %s: %d %s", self.peername, status.value, message)
            self.transport.write(_refusal(status, message))
        self.force_close()
        self._connections.lost(self)

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self._loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if not self.waiting() and self._request_in_progress:
            # the start of a pipelined head while a request is served: its time starts when it is next
            self._arm(HEADER_TIMEOUT, self._head_late)
        elif self._head_bytes:
            self.refuse(HTTPStatus.REQUEST_TIMEOUT, f"the request head took more than {HEADER_TIMEOUT:g}s")
        else:
            self.refuse(None)

    def _body_late(self) -> None:
        self._deadline = None
        if self._body is not None and not self._body.is_eof():
            log.debug("closing a connection from %s: its body took more than %gs", self.peername, BODY_TIMEOUT)
            self.refuse(None)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        # A malformed request (aiohttp's parser: line too long, too many headers, bad syntax):
        # routine from scanners and attackers, so no ERROR traceback, and aiohttp's message, which
        # quotes the offending header, is not sent back.
        log.debug("bad request from %s: %s", request.remote, type(exc).__name__)
        resp = error_response(web.HTTPBadRequest())
        resp.force_close()
        return resp


class _GuardedSite(web.SockSite):
    """A SockSite whose connections are `_GuardedHandler`s."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, *, max_connections: int,
                 max_body: int, handler_args: dict[str, Any]) -> None:
        super().__init__(runner, sock)
        self._connections = _Connections(max_connections)
        self._max_body = max_body
        self._handler_args = handler_args

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; SockSite.start would listen with aiohttp's protocol
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> _GuardedHandler:
            return _GuardedHandler(server, loop=loop, connections=self._connections, max_body=self._max_body,
                                   **self._handler_args)

        self._server = await loop.create_server(connection, sock=self._sock, backlog=self._backlog)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
        # [::] is dual stack: IPv4 clients arrive v4-mapped on the same socket, whatever the
        # host's net.ipv6.bindv6only default says (a specific IPv6 address is IPv6 only anyway)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ShoalError(f"listen: cannot bind {where}: {exc.strerror}") from None
    log.info("listening on http://%s", where)
    return sock


async def start(app: web.Application, sock: socket.socket, *, max_connections: int,
                shutdown_timeout: float = 10.0, handle_signals: bool = False) -> web.AppRunner:
    """Serve `app` on the bound `sock` within the limits above and at most `max_connections`
    connections at once; the caller cleans the runner up."""
    handler_args: dict[str, Any] = {
        "keepalive_timeout": KEEPALIVE_TIMEOUT, "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
        "max_headers": MAX_HEADERS, "access_log": None}
    runner = web.AppRunner(app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **handler_args)
    await runner.setup()
    try:
        # The app's client_max_size is what its largest route reads; a longer declared body is
        # refused before any handler runs (aiohttp itself counts only as a handler reads).
        site = _GuardedSite(runner, sock, max_connections=max_connections, max_body=app._client_max_size,
                            handler_args=handler_args)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


Serving = Callable[[], AbstractAsyncContextManager[None]]
"""What runs around a started server until it stops (shoal/sdnotify.py's service())."""


async def _serve(app: web.Application, sock: socket.socket, *, max_connections: int,
                 shutdown_timeout: float, serving: Serving | None) -> None:
    runner = await start(app, sock, max_connections=max_connections, shutdown_timeout=shutdown_timeout,
                         handle_signals=True)
    try:
        # left (cancelled) on SIGINT/SIGTERM before the cleanup, which may wait for connections
        async with serving() if serving is not None else nullcontext():
            await asyncio.Event().wait()  # until SIGINT/SIGTERM (GracefulExit) or cancelled
    finally:
        for callback in app.get(BEFORE_STOP_KEY, []):
            try:
                await callback()
            except Exception:
                log.exception("while stopping")
        await runner.cleanup()


def run(app: web.Application, host: str, port: int, *, max_connections: int,
        shutdown_timeout: float = 10.0, serving: Serving | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (cleanup contexts run), within the
    limits above and at most `max_connections` connections at once (as aiohttp's run_app, whose
    loop handling this follows, with the guarded connections). `serving` runs from when the
    socket listens (and the app's startup is done) until the shutdown starts."""
    sock = _bind(host, port)
    loop = asyncio.new_event_loop()
    main = loop.create_task(_serve(app, sock, max_connections=max_connections, shutdown_timeout=shutdown_timeout,
                                   serving=serving))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            for task in rest:
                if not task.cancelled() and task.exception() is not None:
                    loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                                 "exception": task.exception(), "task": task})
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            sock.close()
