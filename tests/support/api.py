"""The typed clients (shoal.clients) for tests and the bench, which are synchronous: each call
runs on its own short event loop. The raw wire is left to the tests that are about it (guards,
malformed requests, announce and scrape)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from shoal import clients, protocol
from shoal.clients import OriginClient, SignedMetainfo, TrackerClient
from shoal.oci import Digest

T = TypeVar("T")


def run(call: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    async def go() -> T:
        async with aiohttp.ClientSession() as http:
            return await call(http)

    return asyncio.run(go())


def audit_events(origin: str, token: str, **filters: Any) -> list[dict[str, Any]]:
    """The collector's events matching `filters` (protocol.AuditQuery's fields)."""
    query = protocol.AuditQuery(**{"limit": 100_000, **filters})
    return run(lambda http: OriginClient(http, origin, token).audit(query)).events


def seed_blob(origin: str, token: str, digest: str, ns: str, repository: str) -> SignedMetainfo:
    request = protocol.SeedRequest(ns, repository)
    return run(lambda http: OriginClient(http, origin, token).seed(Digest.parse(digest), request, within=120))


def swarm_token(origin: str, token: str, node: str, public_key: str) -> protocol.SwarmToken:
    """A swarm token and a certificate for `public_key` (PEM), as the origin gives a node."""
    request = protocol.SwarmTokenRequest(node, public_key)
    return run(lambda http: OriginClient(http, origin, token).swarm_token(request, within=10))


def metainfo(tracker: str, token: str, digest: str) -> SignedMetainfo | None:
    return run(lambda http: TrackerClient(http, tracker, token).metainfo(Digest.parse(digest), within=10))


def seeded(origin: str, token: str) -> set[str]:
    """The digests the origin seeds."""
    return {b.digest for b in run(lambda http: OriginClient(http, origin, token).seeded()).blobs}


def status(url: str) -> dict[str, Any]:
    return run(lambda http: clients.status(http, url))
