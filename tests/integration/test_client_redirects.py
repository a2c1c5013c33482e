"""The typed clients of the components' APIs (shoal/clients.py) follow no redirect: a server
that answers with one (a hijacked or misconfigured address, a proxy in front of it) gets an
ApiError, and the address it names never sees the request. aiohttp would follow it, dropping
only Authorization and Cookie: a puller's credential, a relay ticket and a journal batch would
have gone along."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import protocol
from shoal.clients import ApiError, OriginClient
from shoal.oci import Digest

DIGEST = Digest("ab" * 32)
ALICE = "Basic YWxpY2U6czNjcmV0"  # alice:s3cret


@pytest.fixture
async def servers() -> AsyncIterator[tuple[TestServer, list[web.Request]]]:
    """(the origin's address, which redirects everything with a 307, and what the redirect's
    target received)"""
    seen: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({})

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", record)
    target = TestServer(target_app, host="127.0.0.2")
    await target.start_server()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(target.make_url(request.path_qs)))

    origin_app = web.Application()
    origin_app.router.add_route("*", "/{tail:.*}", redirect)
    origin = TestServer(origin_app, host="127.0.0.1")
    await origin.start_server()
    yield origin, seen
    await origin.close()
    await target.close()


async def test_an_admission_and_a_relay_are_not_redirected(servers: tuple[TestServer, list[web.Request]]) -> None:
    origin, seen = servers
    async with aiohttp.ClientSession() as http:
        client = OriginClient(http, str(origin.make_url("")).rstrip("/"), "t" * 32)
        request = protocol.AdmissionRequest(node="n1", ns="registry.test", repository="private/app")
        with pytest.raises(ApiError) as refused:
            await client.admission(DIGEST, request, ALICE, Ed25519PrivateKey.generate(), within=10)
        assert refused.value.status == 307
        with pytest.raises(ApiError) as refused:
            async for _ in client.relay(DIGEST, protocol.RelayTicket("ticket-for-n1"), connect=5, idle=5):
                pass
        assert refused.value.status == 307
    assert seen == []  # neither alice's password nor the ticket went to the redirect's target
