"""The typed API clients against the real tracker app in process: each call's answer or its
ApiError with the status, and a dead server as a transport error (not an ApiError)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shoal import metainfo
from shoal.clients import ApiError, TrackerClient
from shoal.oci import Digest
from tests.integration.conftest import NODE_TOKEN, REGISTRATION_TOKEN, Keys, tracker_server
from tests.support.procs import free_port

REGISTRATION, NODE = REGISTRATION_TOKEN, NODE_TOKEN


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[str]:
    async with tracker_server(keys, monkeypatch) as server:
        yield str(server.make_url("")).rstrip("/")


async def test_tracker_client(tracker: str, keys: Keys, tmp_path: Path) -> None:
    data = b"client" * 10_000
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / digest.hex).write_bytes(data)
    raw = metainfo.create(tmp_path / digest.hex, digest, announce=f"{tracker}/x", root_cert=keys.root_cert)
    async with aiohttp.ClientSession() as http:
        origin, node = TrackerClient(http, tracker, REGISTRATION), TrackerClient(http, tracker, NODE)
        assert await node.metainfo(digest, within=5) is None  # not registered: None, not an error
        with pytest.raises(ApiError) as refused:
            await node.register(digest, raw, keys.sign(raw), within=5)  # the node token cannot register
        assert refused.value.status == 401
        with pytest.raises(ApiError) as bad:
            await origin.register(digest, raw, "not-a-signature", within=5)
        assert bad.value.status == 400
        await origin.register(digest, raw, keys.sign(raw), within=5)
        found = await node.metainfo(digest, within=5)
        assert found is not None and found.raw == raw and found.signature == keys.sign(raw)
        with pytest.raises(ApiError) as wrong:
            await origin.metainfo(digest, within=5)  # the registration token cannot read
        assert wrong.value.status == 401
        await origin.unregister(digest, within=5)
        await origin.unregister(digest, within=5)  # again: already gone is fine
        assert await node.metainfo(digest, within=5) is None
        dead = TrackerClient(http, f"http://127.0.0.1:{free_port()}", NODE)
        with pytest.raises(aiohttp.ClientError):
            await dead.metainfo(digest, within=5)
