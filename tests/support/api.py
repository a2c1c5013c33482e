"""The typed clients (shoal.clients) for tests and the bench, which are synchronous: each call
runs on its own short event loop. The raw wire is left to the tests that are about it (guards,
malformed requests, announce and scrape)."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from shoal import audit, clients, peercerts, protocol
from shoal.clients import OperatorClient, OriginClient
from shoal.oci import Digest

T = TypeVar("T")


def run(call: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    async def go() -> T:
        async with aiohttp.ClientSession() as http:
            return await call(http)

    return asyncio.run(go())


def operator(token: str) -> str:
    """The Authorization of an operator token (a registry login is passed as it is sent)."""
    return token if token.startswith(("Basic ", "Bearer ")) else f"Bearer {token}"


def audit_events(origin: str, token: str, *, operator_events: bool = False, **filters: Any) -> list[dict[str, Any]]:
    """The collector's events matching `filters` (protocol.AuditQuery's fields), as the operator
    holding `token` (an operator token, or an Authorization value); the operators' own events
    (this very query is one) only with `operator_events`."""
    query = protocol.AuditQuery(**{"limit": 100_000, **filters})
    events = run(lambda http: OperatorClient(http, origin, operator(token)).audit(query)).events
    return events if operator_events else [e for e in events if e.get("kind") != audit.OPERATOR_KIND]


def admission(origin: str, token: str, digest: str, node: str, key: peercerts.NodeKey, ns: str, repository: str,
              credential: str | None = None) -> protocol.Admission | None:
    """Node `node`'s admission (signed with `key`, the one it enrolled with) to a blob's swarm
    for a puller whose credential is `credential` (an Authorization value; None: anonymous).
    ApiError unless admitted (and the blob seeded)."""
    request = protocol.AdmissionRequest(node, ns, repository)
    answer = run(lambda http: OriginClient(http, origin, token).admission(
        Digest.parse(digest), request, credential, key.private_key, within=120))
    assert not isinstance(answer, protocol.RelayTicket)  # (asked without `relay`)
    return answer


def grants(origin: str, token: str, node: str, key: peercerts.NodeKey,
           renew: list[protocol.Receipt] | None = None) -> protocol.Grants:
    """Enroll `node` with `key` and renew the grants of `renew`, as a node does."""
    request = protocol.GrantsRequest(node, key.public_pem, renew or [])
    return run(lambda http: OriginClient(http, origin, token).grants(request, key.private_key, within=30))


def seeded(origin: str, token: str) -> set[str]:
    """The digests the origin seeds (as an admin operator)."""
    return {b.digest for b in run(lambda http: OperatorClient(http, origin, operator(token)).seeded()).blobs}


def preseed(origin: str, token: str, *images: str, platforms: list[str] | None = None) -> protocol.PreseedJob:
    request = protocol.PreseedRequest(list(images), platforms or [])
    return run(lambda http: OperatorClient(http, origin, operator(token)).preseed(request))


def preseed_job(origin: str, token: str, job: str) -> protocol.PreseedJob:
    return run(lambda http: OperatorClient(http, origin, operator(token)).preseed_job(job))


def ticket_get(listen: str, path: str, token: str, header: str, ticket: str | None,
               timeout: float = 60, extra: dict[str, str] | None = None,
               limit: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """A node's GET of an origin route that takes a ticket (the relay, the first copy), raw:
    `token` the node token ("" for none), the ticket in `header` (None: no header), `extra`
    headers; with `limit`, the body's first `limit` bytes only (then it hangs up)."""
    host, port = listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if ticket is not None:
            headers[header] = ticket
        conn.request("GET", path, headers={**headers, **(extra or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read() if limit is None else r.read(limit)
    finally:
        conn.close()


def status(url: str) -> dict[str, Any]:
    return run(lambda http: clients.status(http, url))
