"""The journal middleware: a durable `start` record before each /v2/ response's first byte, an
`end` record when it is done. If the start record cannot be written, nothing is served (503)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from shoal import audit as records
from shoal import netaddr
from shoal_agent.journal import Journal, JournalError
from shoal_agent.responses import error_response
from shoal_agent.state import audit_of, state_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_USER_AGENT = 512


def _client_addr(request: web.Request) -> str | None:
    # The TCP peer, never X-Forwarded-For: a client cannot write someone else into the audit.
    # IPv6 in brackets ([::1]:40000), a v4 client of a dual-stack listener as its IPv4 address.
    transport = request.transport
    return netaddr.peer_address(transport.get_extra_info("peername") if transport is not None else None)


def journal_middleware(journal: Journal, node: str) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v2"):
            return await handler(request)
        audit = audit_of(request)
        event_id, ts, started = records.new_event_id(), records.now(), time.monotonic()
        state = {"started": False}

        def start_doc(status: int) -> dict[str, Any]:
            return {
                "event_id": event_id, "phase": "start", "ts": ts, "node": node,
                "client_addr": _client_addr(request),
                "user_agent": request.headers.get("User-Agent", "")[:MAX_USER_AGENT] or None,
                "principal": audit.principal, "principal_confirmed": audit.principal_confirmed,
                "cred_fpr": audit.cred_fpr, "credential": audit.credential,
                "ns": audit.ns, "repository": audit.repository, "kind": audit.kind, "method": request.method,
                "reference": audit.reference, "digest": audit.digest,
                "range": request.headers.get("Range", "")[:200] or None, "status": status,
                "source": audit.source, "authz_method": audit.authz_method, "registry_status": audit.registry_status,
            }

        def end_doc(outcome: str, error: str | None = None, size: int | None = None) -> dict[str, Any]:
            doc = {
                "event_id": event_id, "phase": "end", "ts": records.now(), "node": node,
                "bytes": audit.bytes if size is None else size,
                "duration_ms": round((time.monotonic() - started) * 1000, 3), "outcome": outcome,
                "source": audit.source, "verified": audit.verified, "error": error,
            }
            if audit.fallback is not None:  # (only then: a collector older than the field refuses it)
                doc["fallback"] = audit.fallback
            return doc

        async def before_start(status: int) -> None:
            if state["started"]:
                return
            await journal.record(start_doc(status))
            state["started"] = True

        def end(outcome: str, error: str | None = None, size: int | None = None) -> None:
            journal.record_later(end_doc(outcome, error, size))

        state_of(request).before_start = before_start
        try:
            resp = await handler(request)
        except BaseException as exc:
            if state["started"]:
                end("aborted", type(exc).__name__)
            raise
        body = getattr(resp, "body", None)
        size = len(body) if isinstance(body, bytes) and not audit.bytes else None
        if not state["started"]:
            # Nothing was sent yet (a whole body or a file aiohttp sends after this returns):
            # both records go to disk in one write and one fsync before the first byte.
            try:
                await journal.record(start_doc(resp.status), end_doc("complete", size=size))
            except JournalError as exc:
                return error_response(exc)
            state["started"] = True
            return resp
        end("complete", size=size)
        return resp

    return record
