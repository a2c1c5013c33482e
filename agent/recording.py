"""The journal middleware: a durable `start` record before each /v2/ response's first byte, an
`end` record when it is done. If the start record cannot be written, nothing is served (503)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.api import audit_of
from agent.journal import Journal, JournalError
from agent.responses import BEFORE_START, error_response
from shoal import audit as records

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_USER_AGENT = 512


def _client_addr(request: web.Request) -> str | None:
    # The TCP peer, never X-Forwarded-For: a client cannot write someone else into the audit.
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else None


def journal_middleware(journal: Journal, node: str) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2"):
            return await handler(request)
        audit = audit_of(request)
        event_id, ts, started = records.new_event_id(), records.now(), time.monotonic()
        state = {"started": False}

        async def before_start(status: int) -> None:
            if state["started"]:
                return
            await journal.record({
                "event_id": event_id, "phase": "start", "ts": ts, "node": node,
                "client_addr": _client_addr(request),
                "user_agent": request.headers.get("User-Agent", "")[:MAX_USER_AGENT] or None,
                "principal": audit.principal, "cred_fpr": audit.cred_fpr, "credential": audit.credential,
                "ns": audit.ns, "repository": audit.repository, "kind": audit.kind, "method": request.method,
                "reference": audit.reference, "digest": audit.digest,
                "range": request.headers.get("Range", "")[:200] or None, "status": status,
                "source": audit.source, "authz_method": audit.authz_method, "origin_status": audit.origin_status,
            })
            state["started"] = True

        async def end(outcome: str, error: str | None = None, size: int | None = None) -> None:
            doc: dict[str, Any] = {
                "event_id": event_id, "phase": "end", "ts": records.now(), "node": node,
                "bytes": audit.bytes if size is None else size,
                "duration_ms": round((time.monotonic() - started) * 1000, 3), "outcome": outcome,
                "source": audit.source, "verified": audit.verified, "error": error,
            }
            await journal.record(doc)

        request[BEFORE_START] = before_start
        try:
            resp = await handler(request)
        except BaseException as exc:
            if state["started"]:
                await end("aborted", type(exc).__name__)
            raise
        if not state["started"]:
            try:
                await before_start(resp.status)
            except JournalError as exc:
                return error_response(exc)
        body = getattr(resp, "body", None)
        await end("complete", size=len(body) if isinstance(body, bytes) and not audit.bytes else None)
        return resp

    return record
