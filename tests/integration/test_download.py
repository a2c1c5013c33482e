"""A Download in process, on the registry path, against a scripted registry (the swarm path and
the real registry run end to end in tests/e2e): readers attached to one download get the blob
whole and right; wrong or short bytes from the registry are never cached, never left partial,
and never reach a whole-blob reader as a complete body."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from shoal import errors
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal_agent.config import SwarmPolicy
from shoal_agent.download import Collaborators, Download
from shoal_agent.metrics import AgentMetrics
from shoal_agent.upstreams import Upstream
from tests.support.fakeregistry import Canned, FakeServer

BLOB = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 7)  # ~3 MiB, several chunks
DIGEST = Digest(hashlib.sha256(BLOB).hexdigest())
PATH = f"/v2/private/app/blobs/{DIGEST}"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
async def parts(tmp_path: Path, fake: FakeServer) -> AsyncIterator[tuple[Collaborators, Upstream]]:
    http = aiohttp.ClientSession()
    store = BlobStore(tmp_path / "cache", max_bytes=64 << 20)
    await store.open()
    deps = Collaborators(store=store, metrics=AgentMetrics(CollectorRegistry()), policy=SwarmPolicy())
    # (a short body ends in a read timeout: 2 s here, 30 s in production)
    client = RegistryClient(http, fake.url, credentials=None, user_agent="t", retry_budget=0, read_timeout=2.0)
    yield deps, Upstream("reg", client)
    await store.close()
    await http.close()


async def read_all(download: Download, into: bytearray | None = None) -> bytes:
    out = bytearray() if into is None else into
    async for chunk in download.stream(0, len(BLOB), whole=True):
        out += chunk
    return bytes(out)


async def start(deps: Collaborators, up: Upstream) -> tuple[Download, asyncio.Task[None]]:
    download = Download(deps, up, "private/app", DIGEST, len(BLOB), None)
    task = download.task = asyncio.create_task(download.run())
    return download, task


async def test_readers_of_one_download_get_the_blob_whole(parts: tuple[Collaborators, Upstream],
                                                          fake: FakeServer) -> None:
    deps, up = parts
    fake.routes[("GET", PATH)] = Canned(200, {"Content-Type": "application/octet-stream"}, BLOB)
    download, task = await start(deps, up)
    bodies = await asyncio.gather(*(read_all(download) for _ in range(4)))
    assert all(hashlib.sha256(b).hexdigest() == DIGEST.hex for b in bodies)
    await task
    assert download.error is None and download.source == "registry"
    assert deps.store.has(DIGEST) and deps.store.path(DIGEST).read_bytes() == BLOB
    assert sum(1 for s in fake.seen if s.method == "GET") == 1  # one fetch for every reader
    assert deps.metrics.downloads.labels("registry", "ok")._value.get() == 1
    assert list(deps.store.downloads_dir.iterdir()) == []


@pytest.mark.parametrize("damage", ["wrong bytes", "short body"])
async def test_bad_registry_bytes_are_never_cached_or_served_whole(parts: tuple[Collaborators, Upstream],
                                                                   fake: FakeServer, damage: str) -> None:
    deps, up = parts
    if damage == "wrong bytes":
        fake.routes[("GET", PATH)] = Canned(200, {}, BLOB[:-1] + bytes([BLOB[-1] ^ 1]))
    else:
        fake.routes[("GET", PATH)] = Canned(200, {}, BLOB[: len(BLOB) // 2], declared_length=len(BLOB))
    download, task = await start(deps, up)
    got = bytearray()
    with pytest.raises(errors.ShoalError):
        await read_all(download, got)
    assert len(got) < len(BLOB)  # the reader never had a complete (wrong) body
    await task
    assert isinstance(download.error, errors.ShoalError)
    assert not deps.store.has(DIGEST)
    assert list(deps.store.downloads_dir.iterdir()) == []  # nothing partial stays
    assert deps.metrics.downloads.labels("registry", "failed")._value.get() == 1
    if damage == "wrong bytes":
        assert deps.metrics.integrity_failures.labels("registry")._value.get() == 1


async def test_a_whole_reader_holds_back_the_last_chunk_until_the_digest_matches(
        parts: tuple[Collaborators, Upstream]) -> None:
    """The registry path streams bytes before they are verified; the reader hashes what it sends
    and refuses to send the chunk that would complete a wrong body. Set up as `_from_registry`
    leaves it just before its own check: the whole (wrong) file written, not yet verified."""
    deps, up = parts
    download = Download(deps, up, "private/app", DIGEST, len(BLOB), None)
    wrong = BLOB[:-1] + bytes([BLOB[-1] ^ 1])
    partial = deps.store.download_path(DIGEST)
    partial.write_bytes(wrong)
    download.partial, download.written = partial, len(wrong)
    got = bytearray()
    with pytest.raises(errors.IntegrityError):
        await read_all(download, got)
    assert 0 < len(got) < len(BLOB) and bytes(got) == wrong[: len(got)]
    partial.write_bytes(BLOB)  # the right bytes go out whole
    assert hashlib.sha256(await read_all(download)).hexdigest() == DIGEST.hex


async def test_only_the_registrys_own_refusal_is_a_refused_credential(fake: FakeServer) -> None:
    """A 401 or 403 from the registry to a blob GET refuses the puller's credential: pullers who
    joined its download fetch with theirs, and the refused yes is dropped (agent/api.py). A 403
    from object storage the registry redirected to (a signed URL that expired) refuses nobody."""
    storage = FakeServer("127.0.0.1")  # named "localhost" below: another origin than the registry
    try:
        storage.routes[("GET", "/bucket/blob")] = Canned(403, {}, b"<Error>AccessDenied</Error>")
        async with aiohttp.ClientSession() as http:
            client = RegistryClient(http, fake.url, credentials=None, user_agent="t", retry_budget=0,
                                    redirect_hosts=["localhost"])

            async def fetch() -> None:
                async for _ in client.stream_blob("private/app", DIGEST, authorization="Basic YTpi"):
                    pass

            for status in (401, 403):
                fake.routes[("GET", PATH)] = Canned(status, {}, b'{"errors":[]}')
                with pytest.raises(errors.CredentialRefused):
                    await fetch()
            fake.routes[("GET", PATH)] = Canned(307, {"Location": f"http://localhost:{storage.port}/bucket/blob?s=x"})
            with pytest.raises(errors.UpstreamError) as caught:
                await fetch()
            assert not isinstance(caught.value, errors.CredentialRefused)
            assert storage.seen  # (the redirect was followed)
    finally:
        storage.close()
