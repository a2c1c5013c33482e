"""RegistryClient.blob_sample, what agent/provenance.py asks a registry: the bytes at an offset,
what counts as "the registry does not hold this sample", and what as "it cannot answer now"."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import aiohttp
import pytest

from shoal import errors
from shoal.oci import Digest
from shoal.registry import SAMPLE_USER_AGENT, RegistryClient
from tests.support.fakeregistry import Canned, FakeServer

BLOB = bytes(range(256)) * 64
DIGEST = Digest(hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/private/app/blobs/{DIGEST}"


@pytest.fixture
def registry() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


async def sample(registry: FakeServer, canned: Canned) -> tuple[int, bytes] | None:
    registry.routes[("GET", PATH)] = canned
    async with aiohttp.ClientSession() as http:
        client = RegistryClient(http, registry.url, credentials=None, user_agent="shoal-agent/t", retry_budget=0)
        return await client.blob_sample("private/app", DIGEST, 100, 64)


async def test_the_sample_asked_for(registry: FakeServer) -> None:
    got = await sample(registry, Canned(206, {"Content-Range": f"bytes 100-163/{len(BLOB)}"}, BLOB[100:164]))
    assert got == (100, BLOB[100:164])
    seen = registry.seen[-1]
    assert seen.headers["Range"] == "bytes=100-163"
    assert seen.headers["User-Agent"] == f"shoal-agent/t {SAMPLE_USER_AGENT}"


async def test_a_registry_that_ignores_range_is_sampled_from_the_start(registry: FakeServer) -> None:
    assert await sample(registry, Canned(200, {}, BLOB)) == (0, BLOB[:64])


@pytest.mark.parametrize("canned", [
    Canned(206, {"Content-Range": f"bytes 0-63/{len(BLOB)}"}, BLOB[:64]),  # not the range asked for
    Canned(404), Canned(401), Canned(403), Canned(416),
], ids=["other-range", "404", "401", "403", "416"])
async def test_an_answer_without_the_sample_proves_nothing(registry: FakeServer, canned: Canned) -> None:
    assert await sample(registry, canned) is None


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_a_registry_that_cannot_answer_now_is_an_upstream_error(registry: FakeServer, status: int) -> None:
    with pytest.raises(errors.UpstreamError):
        await sample(registry, Canned(status))
