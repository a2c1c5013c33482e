"""What every component's HTTP side shares: health, readiness, metrics and running the app."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shoal import protocol
from shoal.errors import ShoalError

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else a short reason shown by /readyz."""


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

    for route, handler in ((protocol.HEALTHZ, healthz), (protocol.READYZ, readyz), (protocol.METRICS, metrics)):
        app.router.add_route(route.method, route.pattern, handler)


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
