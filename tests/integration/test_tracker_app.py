"""The tracker application in process: registration, whitelist, announce, scrape, metainfo."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shoal import bencode, metainfo
from shoal.oci import Digest
from tracker import app as tracker_app
from tracker import config as tracker_config

TOKEN = "registration-secret-0123456789"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def meta(tmp_path: Path) -> metainfo.Metainfo:
    data = b"layer" * 100_000
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / digest.hex).write_bytes(data)
    return metainfo.parse(metainfo.create(tmp_path / digest.hex, digest, announce="http://t/announce"))


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"}, "data_dir": str(tmp_path / "t")})
    c: Client = await aiohttp_client(tracker_app.build(cfg))
    return c


def announce_query(info_hash: bytes, port: int, left: int, **extra: str) -> str:
    q = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(b'-SA0100-' + bytes(12))}"
         f"&port={port}&uploaded=0&downloaded=0&left={left}&compact=1")
    return q + "".join(f"&{k}={v}" for k, v in extra.items())


async def announce(client: Client, info_hash: bytes, port: int, left: int, **extra: str) -> dict[bytes, object]:
    r = await client.get("/announce?" + announce_query(info_hash, port, left, **extra))
    assert r.status == 200
    doc = bencode.decode(await r.read())
    assert isinstance(doc, dict)
    return doc  # type: ignore[return-value]


async def register(client: Client, meta: metainfo.Metainfo, token: str = TOKEN) -> int:
    r = await client.put(f"/v1/metainfo/{meta.digest}", data=meta.raw, headers={"Authorization": f"Bearer {token}"})
    return r.status


async def test_registration_needs_the_token(client: Client, meta: metainfo.Metainfo) -> None:
    assert await register(client, meta, token="wrong-token-0123456789") == 401
    r = await client.put(f"/v1/metainfo/{meta.digest}", data=meta.raw)
    assert r.status == 401
    assert (await client.get(f"/v1/metainfo/{meta.digest}")).status == 404
    assert await register(client, meta) == 201
    r = await client.get(f"/v1/metainfo/{meta.digest}")
    assert r.status == 200 and await r.read() == meta.raw


async def test_registration_rejects_mismatched_metainfo(client: Client, meta: metainfo.Metainfo) -> None:
    other = "sha256:" + "0" * 64
    r = await client.put(f"/v1/metainfo/{other}", data=meta.raw, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 400
    r = await client.put(f"/v1/metainfo/{meta.digest}", data=b"garbage", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 400
    assert (await client.get("/v1/metainfo/sha256:..%2f..%2fetc")).status in (400, 404)


async def test_unregistered_infohash_is_refused(client: Client, meta: metainfo.Metainfo) -> None:
    doc = await announce(client, meta.tracker_hash, 6881, 10)
    assert b"failure reason" in doc and b"unregistered" in doc[b"failure reason"]  # type: ignore[operator]


async def test_announce_lists_seeders_first_and_ignores_ip(client: Client, meta: metainfo.Metainfo) -> None:
    assert await register(client, meta) == 201
    ih = meta.tracker_hash
    first = await announce(client, ih, 7001, 0, event="started", ip="10.9.9.9")  # a seeder claiming another IP
    assert first[b"peers"] == b""
    await announce(client, ih, 7002, 100, event="started")
    doc = await announce(client, ih, 7003, 100, event="started")
    peers = doc[b"peers"]
    assert isinstance(peers, bytes) and len(peers) == 12
    addrs = [(peers[i:i + 4], int.from_bytes(peers[i + 4:i + 6], "big")) for i in range(0, len(peers), 6)]
    assert addrs[0] == (bytes([127, 0, 0, 1]), 7001)  # the seeder, at its real source address
    assert (bytes([127, 0, 0, 1]), 7002) in addrs
    assert doc[b"complete"] == 1 and doc[b"incomplete"] == 2
    r = await client.get(f"/scrape?info_hash={quote_from_bytes(ih)}")
    scrape = bencode.decode(await r.read())
    assert isinstance(scrape, dict)
    assert scrape[b"files"] == {ih: {b"complete": 1, b"downloaded": 0, b"incomplete": 2}}
    await announce(client, ih, 7002, 0, event="completed")
    await announce(client, ih, 7003, 100, event="stopped")
    r = await client.get(f"/scrape?info_hash={quote_from_bytes(ih)}")
    scrape = bencode.decode(await r.read())
    assert isinstance(scrape, dict)
    files = scrape[b"files"]
    assert isinstance(files, dict)
    assert files[ih] == {b"complete": 2, b"downloaded": 1, b"incomplete": 0}


async def test_bad_announce_gets_failure_reason(client: Client) -> None:
    r = await client.get("/announce?info_hash=abc&peer_id=x&port=1")
    doc = bencode.decode(await r.read())
    assert isinstance(doc, dict) and b"failure reason" in doc


async def test_metainfo_persists_across_restart(aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                meta: metainfo.Metainfo) -> None:
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"}, "data_dir": str(tmp_path / "p")})
    c1 = await aiohttp_client(tracker_app.build(cfg))
    assert await register(c1, meta) == 201
    await c1.close()
    c2 = await aiohttp_client(tracker_app.build(cfg))
    r = await c2.get(f"/v1/metainfo/{meta.digest}")
    assert r.status == 200 and await r.read() == meta.raw


async def test_ipv6_peers_come_back_in_peers6(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              meta: metainfo.Metainfo) -> None:
    """BEP 7: a tracker on IPv6 records the announcer's v6 source address and answers `peers6`."""
    import aiohttp
    from aiohttp.test_utils import TestServer

    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"}})
    server = TestServer(tracker_app.build(cfg), host="::1")
    await server.start_server()
    try:
        base = f"http://[::1]:{server.port}"
        async with aiohttp.ClientSession() as http:
            r = await http.put(f"{base}/v1/metainfo/{meta.digest}", data=meta.raw,
                               headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status == 201
            ih = meta.tracker_hash
            await http.get(f"{base}/announce?" + announce_query(ih, 7001, 0, event="started"))
            r = await http.get(f"{base}/announce?" + announce_query(ih, 7002, 5, event="started"))
            doc = bencode.decode(await r.read())
    finally:
        await server.close()
    assert isinstance(doc, dict)
    assert doc[b"peers"] == b""
    assert doc[b"peers6"] == b"\x00" * 15 + b"\x01" + (7001).to_bytes(2, "big")
