"""The typed API clients against the real tracker app in process: each call's answer or its
ApiError with the status, and a dead server as a transport error (not an ApiError)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shoal import metainfo
from shoal.clients import ApiError, TrackerClient
from shoal.oci import Digest
from shoal.protocol import REGISTER_METAINFO
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
    # (in a thread: libtorrent's hashing, and its import if it comes first, would hold the loop)
    raw = await asyncio.to_thread(metainfo.create, tmp_path / digest.hex, digest, announce=f"{tracker}/x",
                                  root_cert=keys.root_cert)
    async with aiohttp.ClientSession() as http:
        origin, node = TrackerClient(http, tracker, REGISTRATION), TrackerClient(http, tracker, NODE)
        with pytest.raises(ApiError) as refused:
            await node.register(digest, raw, keys.sign(raw), within=5)  # the node token cannot register
        assert refused.value.status == 401
        with pytest.raises(ApiError) as bad:
            await origin.register(digest, raw, "not-a-signature", within=5)
        assert bad.value.status == 400
        await origin.register(digest, raw, keys.sign(raw), within=5)
        # (a GET on the registration path: what earlier versions answered nodes with metainfo)
        async with http.get(REGISTER_METAINFO.url(tracker, digest=str(digest)),
                            headers={"Authorization": f"Bearer {NODE}"}) as r:
            assert r.status == 405  # the tracker hands no metainfo out (nodes get it with an admission)
        with pytest.raises(ApiError) as unauthorized:
            await node.unregister(digest, within=5)
        assert unauthorized.value.status == 401
        await origin.unregister(digest, within=5)
        await origin.unregister(digest, within=5)  # again: already gone is fine
        dead = TrackerClient(http, f"http://127.0.0.1:{free_port()}", REGISTRATION)
        with pytest.raises(aiohttp.ClientError):
            await dead.register(digest, raw, keys.sign(raw), within=5)
