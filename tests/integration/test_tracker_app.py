"""The tracker application in process: registration, whitelist, announce, scrape, metainfo."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shoal import bencode, metainfo, protocol
from shoal.oci import Digest
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from tests.integration.conftest import Keys
from tests.support.pki import SOME_ROOT
from tests.support.redis import RedisServer

TOKEN = "registration-secret-0123456789"
NODE_TOKEN = "node-secret-0123456789abcdef"
NODE_AUTH = {"Authorization": f"Bearer {NODE_TOKEN}"}
Client = TestClient[web.Request, web.Application]


@pytest.fixture
def meta(tmp_path: Path) -> metainfo.Metainfo:
    data = b"layer" * 100_000
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / digest.hex).write_bytes(data)
    return metainfo.parse(metainfo.create(tmp_path / digest.hex, digest, announce="http://t/announce",
                                                 root_cert=SOME_ROOT))


def tracker_doc(keys: Keys, **extra: Any) -> dict[str, Any]:
    return {"registration_token": {"env": "SHOAL_TEST_TOKEN"}, "node_token": {"env": "SHOAL_TEST_NODE_TOKEN"},
            "origin_public_key": str(keys.public_path), **extra}


@pytest.fixture(autouse=True)
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SHOAL_TEST_NODE_TOKEN", NODE_TOKEN)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Each of the tracker's stores: in its process, and in a real Redis. (Not in the async
    fixture: the first test to ask starts the session's Redis, which would block the event loop
    under the loop guard.)"""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"redis": server.settings(prefix=f"t{secrets.token_hex(6)}:")}
    return {"data_dir": str(tmp_path / "t")}


@pytest.fixture
async def client(aiohttp_client: Any, keys: Keys, store: dict[str, Any]) -> Client:
    """The tracker with each of its stores."""
    c: Client = await aiohttp_client(tracker_app.build(tracker_config.load(tracker_doc(keys, **store))))
    return c


def announce_query(info_hash: bytes, port: int, left: int, **extra: str) -> str:
    q = (f"info_hash={quote_from_bytes(info_hash)}&peer_id={quote_from_bytes(b'-SA0100-' + bytes(12))}"
         f"&port={port}&uploaded=0&downloaded=0&left={left}&compact=1")
    return q + "".join(f"&{k}={v}" for k, v in extra.items())


async def announce(client: Client, info_hash: bytes, port: int, left: int, *, token: str | None,
                   **extra: str) -> dict[bytes, object]:
    if token is not None:
        extra = {"token": token, **extra}
    r = await client.get(protocol.ANNOUNCE.path() + "?" + announce_query(info_hash, port, left, **extra))
    assert r.status == 200
    doc = bencode.decode(await r.read())
    assert isinstance(doc, dict)
    return doc  # type: ignore[return-value]


async def register(client: Client, meta: metainfo.Metainfo, keys: Keys, token: str = TOKEN,
                   signature: str | None = None) -> int:
    sig = keys.sign(meta.raw) if signature is None else signature
    r = await client.put(protocol.REGISTER_METAINFO.path(digest=str(meta.digest)), data=meta.raw,
                         headers={"Authorization": f"Bearer {token}", protocol.SIGNATURE_HEADER: sig})
    return r.status


async def registered(client: Client, meta: metainfo.Metainfo, keys: Keys) -> bool:
    """Whether the tracker tracks the torrent: an announce for it is not refused as unregistered."""
    doc = await announce(client, meta.tracker_hash, 7999, 0, token=keys.token(), event="stopped")
    return b"failure reason" not in doc


async def test_registration_needs_the_token_and_the_origins_signature(client: Client, meta: metainfo.Metainfo,
                                                                       keys: Keys, tmp_path: Path) -> None:
    assert await register(client, meta, keys, token="wrong-token-0123456789") == 401
    r = await client.put(protocol.REGISTER_METAINFO.path(digest=str(meta.digest)), data=meta.raw)
    assert r.status == 401
    assert await register(client, meta, keys, signature="") == 400  # unsigned
    other = Keys(tmp_path / "attacker")
    assert await register(client, meta, keys, signature=other.sign(meta.raw)) == 400  # forged
    assert not await registered(client, meta, keys)
    assert await register(client, meta, keys) == 201
    assert await registered(client, meta, keys)


async def test_the_tracker_hands_no_metainfo_out(client: Client, meta: metainfo.Metainfo, keys: Keys) -> None:
    """Nodes get a blob's metainfo only from the origin, with an admission: the node token reads
    nothing here (the route of earlier versions is gone)."""
    assert await register(client, meta, keys) == 201
    r = await client.get(protocol.REGISTER_METAINFO.path(digest=str(meta.digest)), headers=NODE_AUTH)
    assert r.status == 405 and meta.raw not in await r.read()


async def test_a_token_for_another_blob_gets_no_peers(client: Client, meta: metainfo.Metainfo, keys: Keys) -> None:
    """Swarm tokens name the blob they admit to: a node admitted to one blob learns nothing of
    who holds another, and is not listed as one of its peers."""
    assert await register(client, meta, keys) == 201
    ih = meta.tracker_hash
    seeder = keys.token("origin")  # every blob
    await announce(client, ih, 7001, 0, token=seeder, event="started")
    elsewhere = keys.token("node-a", blob="f" * 64)
    doc = await announce(client, ih, 7002, 10, token=elsewhere, event="started")
    assert b"not admitted to this torrent" in doc[b"failure reason"]  # type: ignore[operator]
    assert b"peers" not in doc
    admitted = keys.token("node-b", blob=meta.digest.hex)
    doc = await announce(client, ih, 7003, 10, token=admitted, event="started")
    assert doc[b"peers"] == bytes([127, 0, 0, 1]) + (7001).to_bytes(2, "big")  # the seeder; node-a never listed


async def test_registration_rejects_mismatched_metainfo(client: Client, meta: metainfo.Metainfo, keys: Keys) -> None:
    other = "sha256:" + "0" * 64
    r = await client.put(protocol.REGISTER_METAINFO.path(digest=other), data=meta.raw,
                         headers={"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(meta.raw)})
    assert r.status == 400
    r = await client.put(protocol.REGISTER_METAINFO.path(digest=str(meta.digest)), data=b"garbage",
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 400
    r = await client.put(protocol.REGISTER_METAINFO.pattern.format(digest="sha256:..%2f..%2fetc"), data=meta.raw,
                         headers={"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(meta.raw)})
    assert r.status in (400, 404)


async def test_unregistered_infohash_is_refused(client: Client, meta: metainfo.Metainfo, keys: Keys) -> None:
    doc = await announce(client, meta.tracker_hash, 6881, 10, token=keys.token())
    assert b"unregistered" in doc[b"failure reason"]  # type: ignore[operator]


async def test_unsigned_forged_and_expired_announces_are_refused(client: Client, meta: metainfo.Metainfo, keys: Keys,
                                                                 tmp_path: Path) -> None:
    assert await register(client, meta, keys) == 201
    ih = meta.tracker_hash
    forged = Keys(tmp_path / "attacker").token()
    good = keys.token()
    payload, _, sig = good.partition(".")
    tampered = signing_payload(payload, node="someone-else") + "." + sig
    expired = keys.token(ttl=-1)
    for token, why in ((None, "no swarm token"), (forged, "does not verify"), (tampered, "does not verify"),
                       (expired, "expired"), ("garbage", "malformed")):
        doc = await announce(client, ih, 7001, 0, token=token, event="started")
        assert why.encode() in doc[b"failure reason"], (token, doc)  # type: ignore[operator]
        assert b"peers" not in doc
    # none of them was recorded as a peer
    doc = await announce(client, ih, 7002, 10, token=good, event="started")
    assert doc[b"peers"] == b""
    assert doc[b"complete"] == 0


def signing_payload(payload_b64: str, **changes: str) -> str:
    import base64
    import json

    raw = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
    doc = {**json.loads(raw), **changes}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).rstrip(b"=").decode()


async def test_announce_lists_seeders_first_and_ignores_ip(client: Client, meta: metainfo.Metainfo, keys: Keys) -> None:
    assert await register(client, meta, keys) == 201
    ih = meta.tracker_hash
    token = keys.token()
    # a seeder claiming another address with every spelling of "ip"
    first = await announce(client, ih, 7001, 0, token=token, event="started", ip="10.9.9.9", ipv4="10.9.9.9",
                           ipv6="fe80::9")
    assert first[b"peers"] == b""
    await announce(client, ih, 7002, 100, token=token, event="started")
    doc = await announce(client, ih, 7003, 100, token=token, event="started")
    peers = doc[b"peers"]
    assert isinstance(peers, bytes)
    assert len(peers) == 12
    addrs = [(peers[i:i + 4], int.from_bytes(peers[i + 4:i + 6], "big")) for i in range(0, len(peers), 6)]
    assert addrs[0] == (bytes([127, 0, 0, 1]), 7001)  # the seeder, at its real source address
    assert (bytes([127, 0, 0, 1]), 7002) in addrs
    assert b"peers6" not in doc  # no v6 peer was recorded from the claimed ipv6=
    assert doc[b"complete"] == 1
    assert doc[b"incomplete"] == 2
    r = await client.get(protocol.SCRAPE.path() + f"?info_hash={quote_from_bytes(ih)}", headers=NODE_AUTH)
    scrape = bencode.decode(await r.read())
    assert isinstance(scrape, dict)
    assert scrape[b"files"] == {ih: {b"complete": 1, b"downloaded": 0, b"incomplete": 2}}
    # seeder counts tell whether a blob is cached: not for anyone without the node token
    r = await client.get(protocol.SCRAPE.path() + f"?info_hash={quote_from_bytes(ih)}")
    assert r.status == 401 and b"files" not in await r.read()
    await announce(client, ih, 7002, 0, token=token, event="completed")
    await announce(client, ih, 7003, 100, token=token, event="stopped")
    r = await client.get(protocol.SCRAPE.path() + f"?info_hash={quote_from_bytes(ih)}", headers=NODE_AUTH)
    scrape = bencode.decode(await r.read())
    assert isinstance(scrape, dict)
    files = scrape[b"files"]
    assert isinstance(files, dict)
    assert files[ih] == {b"complete": 2, b"downloaded": 1, b"incomplete": 0}


async def test_bad_announce_gets_failure_reason(client: Client) -> None:
    r = await client.get(protocol.ANNOUNCE.path() + "?info_hash=abc&peer_id=x&port=1")
    doc = bencode.decode(await r.read())
    assert isinstance(doc, dict)
    assert b"failure reason" in doc


async def test_metainfo_persists_across_restart(aiohttp_client: Any, tmp_path: Path, keys: Keys,
                                                meta: metainfo.Metainfo) -> None:
    cfg = tracker_config.load(tracker_doc(keys, data_dir=str(tmp_path / "p")))
    c1 = await aiohttp_client(tracker_app.build(cfg))
    assert await register(c1, meta, keys) == 201
    await c1.close()
    # a metainfo file tampered with on disk is dropped at start, the genuine one kept
    c2 = await aiohttp_client(tracker_app.build(cfg))
    assert await registered(c2, meta, keys)
    await c2.close()
    (tmp_path / "p" / "metainfo" / f"{meta.digest.hex}.sig").write_text(Keys(tmp_path / "x").sign(meta.raw))
    (tmp_path / "p" / "metainfo" / f"{meta.digest.hex}.src").write_text("left by an earlier version")
    c3 = await aiohttp_client(tracker_app.build(cfg))
    assert not await registered(c3, meta, keys)
    assert not any((tmp_path / "p" / "metainfo").iterdir())


async def test_ipv6_peers_come_back_in_peers6(tmp_path: Path, keys: Keys, meta: metainfo.Metainfo) -> None:
    """BEP 7: a tracker on IPv6 records the announcer's v6 source address and answers `peers6`."""
    import aiohttp
    from aiohttp.test_utils import TestServer

    cfg = tracker_config.load(tracker_doc(keys))
    server = TestServer(tracker_app.build(cfg), host="::1")
    await server.start_server()
    token = keys.token()
    try:
        base = f"http://[::1]:{server.port}"
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(meta.raw)}
            r = await http.put(protocol.REGISTER_METAINFO.url(base, digest=str(meta.digest)), data=meta.raw,
                               headers=headers)
            assert r.status == 201
            ih = meta.tracker_hash
            announce = protocol.ANNOUNCE.url(base) + "?"
            await http.get(announce + announce_query(ih, 7001, 0, event="started", token=token))
            r = await http.get(announce + announce_query(ih, 7002, 5, event="started", token=token))
            doc = bencode.decode(await r.read())
    finally:
        await server.close()
    assert isinstance(doc, dict)
    assert doc[b"peers"] == b""
    assert doc[b"peers6"] == b"\x00" * 15 + b"\x01" + (7001).to_bytes(2, "big")


async def test_one_address_holds_a_bounded_share_of_a_swarm(client: Client, meta: metainfo.Metainfo,
                                                            keys: Keys) -> None:
    assert await register(client, meta, keys) == 201
    token = keys.token()
    for port in range(20_000, 20_040):  # one host, forty ports
        await announce(client, meta.tracker_hash, port, 0, token=token, event="started")
    doc = await announce(client, meta.tracker_hash, 30_000, 100, token=token, event="started", numwant="200")
    peers = doc[b"peers"]
    assert isinstance(peers, bytes)
    ports = {int.from_bytes(peers[i + 4:i + 6], "big") for i in range(0, len(peers), 6)}
    # the default cap: 8 entries (the requester's own is one of them), the newest kept
    assert ports == set(range(20_033, 20_040)) and doc[b"complete"] == 7


async def test_a_registration_arriving_in_pieces_is_read_whole(client: Client, meta: metainfo.Metainfo,
                                                               keys: Keys) -> None:
    """The body was read with read(n), which gives what has arrived: metainfo sent from another
    host in several TCP segments was parsed in part and refused."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        head = (f"PUT {protocol.REGISTER_METAINFO.path(digest=str(meta.digest))} HTTP/1.1\r\nHost: t\r\n"
                f"Authorization: Bearer {TOKEN}\r\n{protocol.SIGNATURE_HEADER}: {keys.sign(meta.raw)}\r\n"
                f"Content-Length: {len(meta.raw)}\r\nConnection: close\r\n\r\n").encode()
        half = len(meta.raw) // 2
        writer.write(head + meta.raw[:half])
        await writer.drain()
        # nothing may be answered from half a body (the old code answered 400 at once)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 1.0)
        writer.write(meta.raw[half:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
