"""Tracker replicas on a real Redis: shared swarms, exact expiry, zones, restarts and outages."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from shoal import metainfo, protocol
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from shoal_tracker import redisstore
from shoal_tracker import store as tracker_store
from shoal_tracker.peers import Peer, PeerStore
from tests.integration import test_tracker_app as app_tests
from tests.integration.conftest import Keys
from tests.integration.test_tracker_app import Client, announce, register, registered, tracker_doc
from tests.support.redis import RedisServer

meta = app_tests.meta  # the fixtures of the tracker's other tests
tokens = app_tests.tokens

PID = b"-SA0100-" + bytes(12)


def compact_ports(doc: dict[bytes, object]) -> list[int]:
    peers = doc[b"peers"]
    assert isinstance(peers, bytes)
    return [int.from_bytes(peers[i + 4:i + 6], "big") for i in range(0, len(peers), 6)]


async def replica(aiohttp_client: Any, keys: Keys, redis: RedisServer, prefix: str, **extra: Any) -> Client:
    doc = tracker_doc(keys, redis=redis.settings(prefix), max_peers_per_address=100, **extra)
    c: Client = await aiohttp_client(tracker_app.build(tracker_config.load(doc)))
    return c


async def one_swarm(redis: RedisServer, prefix: str, *, ttl: float
                    ) -> tuple[aioredis.Redis, redisstore.RedisSwarms, bytes]:
    """A Redis peer store of its own and one registered torrent (its tracker hash)."""
    client = redisstore.client(host="127.0.0.1", port=redis.port, db=0, username=None,
                               password=redis.password, timeout=2, max_connections=4)
    swarms = redisstore.RedisSwarms(client, prefix=prefix, ttl=ttl, max_peers=100, max_per_address=8,
                                    zone_gateways=2)
    ih = secrets.token_bytes(20)
    await redisstore._command(client.hset(f"{prefix}torrents", ih.hex(), "a" * 64))
    return client, swarms, ih


async def both_stores(aiohttp_client: Any, keys: Keys, redis: RedisServer, prefix: str) -> tuple[Client, Client]:
    """The tracker in memory, and a replica on Redis: a policy test runs against both."""
    memory: Client = await aiohttp_client(tracker_app.build(tracker_config.load(
        tracker_doc(keys, max_peers_per_address=100))))
    return memory, await replica(aiohttp_client, keys, redis, prefix)


async def registered_stores(aiohttp_client: Any, keys: Keys, redis: RedisServer, prefix: str,
                            meta: metainfo.Metainfo) -> tuple[Client, Client]:
    """both_stores, with `meta` registered at each."""
    stores = await both_stores(aiohttp_client, keys, redis, prefix)
    for c in stores:
        assert await register(c, meta, keys) == 201
    return stores


def node_token(keys: Keys, meta: metainfo.Metainfo, port: int) -> str:
    """A node's swarm token for `meta`'s blob alone (the origin's admits it to every blob)."""
    return keys.token(f"node-{port}", blob=meta.digest.hex)


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(6)}:"


async def test_replicas_share_swarms_and_registrations(aiohttp_client: Any, keys: Keys, redis_server: RedisServer,
                                                       prefix: str, meta: metainfo.Metainfo) -> None:
    a = await replica(aiohttp_client, keys, redis_server, prefix)
    b = await replica(aiohttp_client, keys, redis_server, prefix)
    assert await register(a, meta, keys) == 201
    assert await registered(b, meta, keys)  # registered at one replica, known at the other
    token = keys.token()
    await announce(a, meta.tracker_hash, 7001, 0, token=token, event="started")
    await announce(b, meta.tracker_hash, 7002, 5, token=token, event="started")
    doc = await announce(b, meta.tracker_hash, 7003, 5, token=token, event="started")
    assert sorted(compact_ports(doc)) == [7001, 7002] and compact_ports(doc)[0] == 7001  # seeder first
    assert doc[b"complete"] == 1 and doc[b"incomplete"] == 2
    await a.close()  # a replica lost loses nothing
    doc = await announce(b, meta.tracker_hash, 7004, 5, token=token)
    assert sorted(compact_ports(doc)) == [7001, 7002, 7003]
    # "stopped" at one replica removes the entry the other recorded
    await announce(b, meta.tracker_hash, 7001, 0, token=token, event="stopped")
    doc = await announce(b, meta.tracker_hash, 7004, 5, token=token)
    assert sorted(compact_ports(doc)) == [7002, 7003] and doc[b"complete"] == 0


async def test_unregistered_at_one_replica_is_refused_at_the_other(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    a = await replica(aiohttp_client, keys, redis_server, prefix)
    b = await replica(aiohttp_client, keys, redis_server, prefix)
    assert await register(a, meta, keys) == 201
    token = keys.token()
    await announce(b, meta.tracker_hash, 7001, 0, token=token, event="started")  # b now knows the hash
    r = await a.delete(protocol.UNREGISTER_METAINFO.path(digest=str(meta.digest)),
                       headers={"Authorization": "Bearer registration-secret-0123456789"})
    assert r.status == 204
    doc = await announce(b, meta.tracker_hash, 7002, 5, token=token, event="started")
    assert b"unregistered torrent" in doc[b"failure reason"]  # type: ignore[operator]
    assert redis_server.command("EXISTS", f"{prefix}swarm:{meta.tracker_hash.hex()}:s") == b":0"


async def test_peer_expiry_is_exact(redis_server: RedisServer, prefix: str) -> None:
    """A peer is handed out until its TTL has passed by Redis's clock, and never after, whether or
    not a sweep ran; a peer that announces again stays."""
    client, swarms, ih = await one_swarm(redis_server, prefix, ttl=1.0)
    try:
        async def listed() -> set[int]:
            answer = await swarms.announce(ih, Peer("127.0.0.9", 9, PID, 5, 0.0), "", want=50)
            assert answer is not None
            return {port for _, port, _ in answer.peers}

        started = time.monotonic()
        await swarms.announce(ih, Peer("127.0.0.2", 1, PID, 0, 0.0), "started", want=50)
        await swarms.announce(ih, Peer("127.0.0.3", 2, PID, 5, 0.0), "started", want=50)
        assert await listed() == {1, 2}
        deadline = started + 10
        while time.monotonic() < deadline:  # keep peer 2 alive; wait for peer 1 to lapse
            await swarms.announce(ih, Peer("127.0.0.3", 2, PID, 5, 0.0), "", want=50)
            seen = await listed()
            if seen == {2}:
                break
            assert seen == {1, 2}
            await asyncio.sleep(0.05)
        assert await listed() == {2}
        assert time.monotonic() - started >= 0.99  # not before its TTL (1 s) had passed
        totals = await swarms.sweep([ih])
        assert (totals.peers, totals.unseeded) == (2, 1)  # peer 2 and the requester; no seeder left
    finally:
        await client.aclose()


async def test_a_swarm_lives_while_announced_and_leaves_nothing_after(redis_server: RedisServer,
                                                                       prefix: str) -> None:
    """Every key a swarm has outlives its last announce by two TTLs, and no longer: records of
    peers that keep announcing are never lost (written once, kept by every announce), and an
    abandoned swarm - zones, gateways and boundary included - leaves no key behind."""
    client, swarms, ih = await one_swarm(redis_server, prefix, ttl=0.4)
    x, y = Peer("127.0.0.2", 1, PID, 5, 0.0, "z1"), Peer("127.0.0.3", 2, PID, 5, 0.0)
    try:
        await swarms.announce(ih, Peer("127.0.0.4", 3, PID, 0, 0.0), "completed", want=50)
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # nearly four TTLs of announcing
            answer = await swarms.announce(ih, x, "", want=50)
            assert answer is not None
            assert ("127.0.0.3", 2, PID) in answer.peers or time.monotonic() - started < 0.1
            await swarms.announce(ih, y, "", want=50)
            await asyncio.sleep(0.05)

        async def left() -> list[bytes]:
            return list(await redisstore._command(client.keys(f"{prefix}swarm:*")))

        assert await left()
        deadline = time.monotonic() + 10
        while await left() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await left() == []
    finally:
        await client.aclose()


async def test_zones_keep_blobs_inside_them(aiohttp_client: Any, keys: Keys, redis_server: RedisServer,
                                            prefix: str, meta: metainfo.Metainfo, tmp_path: Path) -> None:
    """tracker/zones.py, in both stores: a node gets its zone's peers; only its zone's gateways
    (the first two leechers) and a node alone in its zone also get the boundary (the zone-less
    origin and other zones' gateways); the origin gets only the boundary."""
    memory, shared = await both_stores(aiohttp_client, keys, redis_server, prefix)
    for c in (memory, shared):
        assert await register(c, meta, keys) == 201
        ih = meta.tracker_hash

        def token(port: int) -> str:  # every port another node (gateway slots are per node)
            return keys.token(f"node-{port}")
        await announce(c, ih, 7000, 0, token=token(7000), event="started")  # the origin: no zone
        # zone b: its first node is alone and gets the origin; it and the next are gateways
        doc = await announce(c, ih, 7101, 5, token=token(7101), event="started", zone="b")
        assert compact_ports(doc) == [7000]
        doc = await announce(c, ih, 7102, 5, token=token(7102), event="started", zone="b")
        assert sorted(compact_ports(doc)) == [7000, 7101]
        doc = await announce(c, ih, 7103, 5, token=token(7103), event="started", zone="b")
        assert sorted(compact_ports(doc)) == [7101, 7102]  # not a gateway: its zone only
        # zone a's first node: alone, it is handed the boundary: the origin and b's gateways
        doc = await announce(c, ih, 7201, 5, token=token(7201), event="started", zone="a")
        assert sorted(compact_ports(doc)) == [7000, 7101, 7102]
        await announce(c, ih, 7202, 5, token=token(7202), event="started", zone="a")  # a's second gateway
        for _ in range(3):  # random picks: the rule holds every time
            doc = await announce(c, ih, 7203, 5, token=token(7203), event="started", zone="a")
            assert sorted(compact_ports(doc)) == [7201, 7202]
            # a gateway: the boundary's seeders first, its zone, then the rest of the boundary
            doc = await announce(c, ih, 7201, 5, token=token(7201), zone="a")
            ports = compact_ports(doc)
            assert ports[0] == 7000 and set(ports[1:3]) == {7202, 7203} and sorted(ports[3:]) == [7101, 7102]
            # the origin (no zone) is handed the boundary: every zone's gateways, no other node
            doc = await announce(c, ih, 7000, 0, token=token(7000))
            assert sorted(compact_ports(doc)) == [7101, 7102, 7201, 7202]
        # a gateway that stops is replaced by the next leecher of its zone to announce
        await announce(c, ih, 7201, 5, token=token(7201), event="stopped", zone="a")
        doc = await announce(c, ih, 7203, 5, token=token(7203), zone="a")
        assert 7000 in compact_ports(doc)
        # a node that moves zones leaves its old zone's gateways
        doc = await announce(c, ih, 7202, 5, token=token(7202), zone="b")
        assert sorted(compact_ports(doc)) == [7101, 7102, 7103]
        doc = await announce(c, ih, 7000, 0, token=token(7000))
        assert sorted(compact_ports(doc)) == [7101, 7102, 7203]
    bad = await announce(memory, meta.tracker_hash, 7400, 5, token=keys.token(), zone="no/slash")
    assert b"zone must be" in bad[b"failure reason"]  # type: ignore[operator]


async def test_one_node_takes_one_gateway_slot_and_a_gateway_always_sees_across(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """attack15: an admitted node announcing a zone from several ports took every gateway slot of
    it, and the zone's real nodes never saw the origin; and a gateway in a zone with numwant or
    more peers was handed only its zone. Both stores."""
    memory, shared = await both_stores(aiohttp_client, keys, redis_server, prefix)
    for c in (memory, shared):
        assert await register(c, meta, keys) == 201
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        fake = keys.token("mallory")
        for port in (9001, 9002, 9003):  # one node, three ports: one slot
            await announce(c, ih, port, 5, token=fake, event="started", zone="b")
        doc = await announce(c, ih, 7101, 5, token=keys.token("real-1"), event="started", zone="b")
        assert 7000 in compact_ports(doc)  # the second slot is a real node's: it sees the origin
        doc = await announce(c, ih, 7000, 0, token=keys.token("origin"))
        assert 7101 in compact_ports(doc)
        # a zone with more peers than an answer holds: the gateway still gets the origin
        for port in range(7200, 7230):
            await announce(c, ih, port, 5, token=keys.token(f"busy-{port}"), event="started", zone="b")
        doc = await announce(c, ih, 7101, 5, token=keys.token("real-1"), zone="b", numwant="10")
        ports = compact_ports(doc)
        assert len(ports) == 10 and 7000 in ports[:4]


async def test_without_zones_every_peer_is_handed_out(aiohttp_client: Any, keys: Keys, redis_server: RedisServer,
                                                      prefix: str, meta: metainfo.Metainfo) -> None:
    memory, shared = await both_stores(aiohttp_client, keys, redis_server, prefix)
    for c in (memory, shared):
        assert await register(c, meta, keys) == 201
        token = keys.token()
        for port in range(7001, 7011):
            await announce(c, meta.tracker_hash, port, 5 if port % 2 else 0, token=token, event="started")
        doc = await announce(c, meta.tracker_hash, 7100, 5, token=token, event="started")
        ports = compact_ports(doc)
        assert sorted(ports) == list(range(7001, 7011))
        assert all(p % 2 == 0 for p in ports[:5])  # seeders first


async def test_a_swarm_with_seeders_of_its_own_spares_the_origin_in_both_stores(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """tracker/peers.py ORIGIN_SPARE: a leecher is not handed the origin's seeder (known by its
    token, which admits it to every blob) once two nodes seed the blob; a node's token cannot
    claim to be the origin. Zones or none."""
    node = functools.partial(node_token, keys, meta)
    for c in await registered_stores(aiohttp_client, keys, redis_server, prefix, meta):
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        await announce(c, ih, 7001, 0, token=node(7001), event="completed")
        doc = await announce(c, ih, 7002, 5, token=node(7002), event="started")
        assert sorted(compact_ports(doc)) == [7000, 7001]  # one seeder of its own: not enough
        await announce(c, ih, 7009, 0, token=node(7001), event="completed")  # that node, another port
        doc = await announce(c, ih, 7002, 5, token=node(7002))
        assert 7000 in compact_ports(doc)  # one node, however many ports, cannot hide the origin
        await announce(c, ih, 7009, 0, token=node(7001), event="stopped")
        await announce(c, ih, 7003, 0, token=node(7003), event="completed")
        for _ in range(3):  # random picks: the rule holds every time
            doc = await announce(c, ih, 7004, 5, token=node(7004), event="started")
            ports = compact_ports(doc)
            assert 7000 not in ports and {7001, 7002, 7003} <= set(ports) and ports[:2] in ([7001, 7003], [7003, 7001])
            doc = await announce(c, ih, 7005, 5, token=node(7005), event="started", zone="z")
            assert 7000 not in compact_ports(doc)  # alone in its zone: the boundary, less the origin
        doc = await announce(c, ih, 7000, 0, token=keys.token("origin"))
        assert compact_ports(doc) == []  # nor the origin them: it would connect to them itself
        doc = await announce(c, ih, 7003, 0, token=node(7003), event="stopped")
        doc = await announce(c, ih, 7004, 5, token=node(7004))
        assert 7000 in compact_ports(doc)  # a seeder left: one of its own is not enough


async def test_a_stalled_leecher_is_handed_the_origin_in_both_stores(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """attack19 #5: two nodes that say they seed a blob (lying, gone without a word, or behind a
    blocked port) hid the origin from every joiner, which fell back to the registry. A leecher
    that announces `stalled=1` is handed the origin whatever the swarm has; its next plain
    announce is spared again, and a seeder's `stalled` changes nothing."""
    node = functools.partial(node_token, keys, meta)
    for c in await registered_stores(aiohttp_client, keys, redis_server, prefix, meta):
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        await announce(c, ih, 7001, 0, token=node(7001), event="completed")
        await announce(c, ih, 7003, 0, token=node(7003), event="completed")
        for _ in range(3):  # random picks: the rule holds every time
            assert 7000 not in compact_ports(await announce(c, ih, 7004, 5, token=node(7004), event="started"))
            assert 7000 in compact_ports(await announce(c, ih, 7004, 5, token=node(7004),
                                                        **{protocol.ANNOUNCE_STALLED: "1"}))
            assert 7000 in compact_ports(await announce(c, ih, 7005, 5, token=node(7005), zone="z",
                                                        **{protocol.ANNOUNCE_STALLED: "1"}))
        assert 7000 not in compact_ports(await announce(c, ih, 7004, 5, token=node(7004)))
        # a seeder is handed leechers only, stalled or not; the origin still gets none
        assert 7000 not in compact_ports(await announce(c, ih, 7001, 0, token=node(7001),
                                                        **{protocol.ANNOUNCE_STALLED: "1"}))
        assert compact_ports(await announce(c, ih, 7000, 0, token=keys.token("origin"))) == []
        # a node admitted to another blob learns nothing by saying it is stalled
        doc = await announce(c, ih, 7006, 5, token=keys.token("node-7006", blob="0" * 64),
                             **{protocol.ANNOUNCE_STALLED: "1"})
        assert b"failure reason" in doc and b"peers" not in doc


async def test_a_first_copy_leecher_is_not_handed_the_origin_until_it_stalls_in_both_stores(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """origin/firstcopy.py: a leecher that takes its share of the first copy from the origin over
    HTTP announces `first_copy=1` and is not handed the origin's seeder, even in a swarm with no
    seeder of its own (where a plain leecher gets it): a piece from the seeder would be a second
    copy of one the origin sends another node. Once it stalls it gets the origin as any stalled
    leecher does, and its peers are unchanged. Zones or none."""
    node = functools.partial(node_token, keys, meta)
    first = {protocol.ANNOUNCE_FIRST_COPY: "1"}
    for c in await registered_stores(aiohttp_client, keys, redis_server, prefix, meta):
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        await announce(c, ih, 7001, 5, token=node(7001), event="started", **first)
        for _ in range(3):  # random picks: the rule holds every time
            assert 7000 in compact_ports(await announce(c, ih, 7002, 5, token=node(7002), event="started"))
            ports = compact_ports(await announce(c, ih, 7003, 5, token=node(7003), event="started", **first))
            assert 7000 not in ports and {7001, 7002} <= set(ports)
            assert 7000 not in compact_ports(await announce(c, ih, 7004, 5, token=node(7004), zone="z", **first))
            stalled = compact_ports(await announce(c, ih, 7003, 5, token=node(7003), **first,
                                                   **{protocol.ANNOUNCE_STALLED: "1"}))
            assert stalled[0] == 7000 and {7001, 7002} <= set(stalled)
        # a seeder's `first_copy` changes nothing (it is handed leechers only)
        assert 7000 not in compact_ports(await announce(c, ih, 7005, 0, token=node(7005), event="completed", **first))


async def test_a_stalled_leecher_gets_the_origin_first_in_its_zone_and_among_many_seeders(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """attack21 #3: `stalled` only stopped skipping the origin. A node of a zone that is not one
    of its gateways is handed its zone's peers alone, so two liars in the zone still sent it to
    the registry; and among many listed seeders the origin was drawn at random (missing from
    173 of 200 answers). A stalled leecher gets the origin's seeder first, in both stores."""
    node = functools.partial(node_token, keys, meta)
    for c in await registered_stores(aiohttp_client, keys, redis_server, prefix, meta):
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        for port in (7001, 7002):  # the liars, in zone z
            await announce(c, ih, port, 0, token=node(port), event="completed", zone="z")
        for port in (7011, 7012, 7013):  # leechers of z that came first: its gateways
            await announce(c, ih, port, 5, token=node(port), event="started", zone="z")
        stalled = {protocol.ANNOUNCE_STALLED: "1"}
        for _ in range(3):
            assert 7000 not in compact_ports(await announce(c, ih, 7020, 5, token=node(7020), zone="z"))
            ports = compact_ports(await announce(c, ih, 7020, 5, token=node(7020), zone="z", **stalled))
            assert ports[0] == 7000 and ports.count(7000) == 1
        for port in range(7100, 7180):  # 80 seeders listed (one compromised node's ports, say)
            await announce(c, ih, port, 0, token=node(port), event="completed")
        for _ in range(5):
            ports = compact_ports(await announce(c, ih, 7030, 5, token=node(7030), numwant="20", **stalled))
            assert ports[0] == 7000 and len(ports) == 20


async def test_a_peer_restarted_on_its_port_is_listed_with_its_new_peer_id_in_both_stores(
        redis_server: RedisServer, prefix: str) -> None:
    """attack21 #5: Redis wrote a known zone-less peer's record (its peer id) only when it was new,
    the memory store on every announce: answers without `compact` differed."""
    client, swarms, ih = await one_swarm(redis_server, prefix, ttl=60.0)
    memory = tracker_store.MemorySwarms(PeerStore(ttl=60.0, max_peers=100))
    first, second = b"-SA0100-" + b"\x01" * 12, b"-SA0100-" + b"\x02" * 12
    try:
        def peer(ip: str, port: int, peer_id: bytes, left: int, node: str) -> Peer:
            return Peer(ip, port, peer_id, left, time.monotonic(), node=node)

        for store in (swarms, memory):
            await store.announce(ih, peer("127.0.0.2", 1, first, 0, "node-a"), "started", want=50)
            await store.announce(ih, peer("127.0.0.2", 1, second, 0, "node-a"), "started", want=50)
            answer = await store.announce(ih, peer("127.0.0.3", 2, first, 5, "node-b"), "started", want=50)
            assert answer is not None and [p[2] for p in answer.peers if p[1] == 1] == [second]
    finally:
        await client.aclose()


async def test_seeders_no_other_zone_can_reach_do_not_spare_the_origin(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """Only seeders on the boundary count toward ORIGIN_SPARE: a zone whose gateways left has
    seeders of its own no other zone is handed, and a new zone's gateway still gets the origin."""
    node = functools.partial(node_token, keys, meta)
    for c in await registered_stores(aiohttp_client, keys, redis_server, prefix, meta):
        ih = meta.tracker_hash
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        for port in (7101, 7102, 7103, 7104):  # the first two are zone a's gateways
            await announce(c, ih, port, 5, token=node(port), event="started", zone="a")
        for port in (7103, 7104):
            await announce(c, ih, port, 0, token=node(port), event="completed", zone="a")
        for port in (7101, 7102):
            await announce(c, ih, port, 5, token=node(port), event="stopped", zone="a")
        doc = await announce(c, ih, 7201, 5, token=node(7201), event="started", zone="b")
        assert compact_ports(doc) == [7000]  # alone in b: the boundary, which is the origin alone
        # zone a's seeders as its gateways (they were its first leechers): they spare the origin
        for port in (7301, 7302):
            await announce(c, ih, port, 5, token=node(port), event="started", zone="c")
            await announce(c, ih, port, 0, token=node(port), event="completed", zone="c")
        doc = await announce(c, ih, 7201, 5, token=node(7201), zone="b")
        assert sorted(compact_ports(doc)) == [7301, 7302]


async def test_a_redis_restart_loses_nothing(aiohttp_client: Any, keys: Keys, tmp_path: Path,
                                             meta: metainfo.Metainfo) -> None:
    """With persistence, registrations and swarms survive a Redis restart; while Redis is down an
    announce gets a `failure reason` at once, registration 503 and /readyz says why (no secret)."""
    server = RedisServer(tmp_path / "own").start()
    try:
        c = await replica(aiohttp_client, keys, server, "r:")
        assert await register(c, meta, keys) == 201
        token = keys.token()
        await announce(c, meta.tracker_hash, 7001, 0, token=token, event="started")
        server.stop(kill=True)
        started = time.monotonic()
        doc = await announce(c, meta.tracker_hash, 7002, 5, token=token, event="started")
        assert doc[b"failure reason"] == b"tracker store unavailable; retry later"
        assert time.monotonic() - started < 5
        assert await register(c, meta, keys) == 503
        r = await c.get(protocol.READYZ.path())
        body = await r.text()
        assert r.status == 503 and "redis" in body and server.password not in body
        server.start()
        doc = await announce(c, meta.tracker_hash, 7002, 5, token=token, event="started")
        assert compact_ports(doc) == [7001]  # the seeder announced before the restart is still there
        r = await c.get(protocol.READYZ.path())
        assert r.status == 200
    finally:
        server.stop()


async def test_a_wrong_password_is_named_without_the_secret(aiohttp_client: Any, keys: Keys, tmp_path: Path,
                                                             redis_server: RedisServer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-" + secrets.token_hex(8))
    settings = {**redis_server.settings("w:"), "password": {"file": str(wrong)}}
    c: Client = await aiohttp_client(tracker_app.build(tracker_config.load(tracker_doc(keys, redis=settings))))
    with caplog.at_level(logging.DEBUG):
        r = await c.get(protocol.READYZ.path())
        body = await r.text()
    assert r.status == 503 and "redis" in body
    assert wrong.read_text() not in body + caplog.text and redis_server.password not in body + caplog.text


def test_redis_config_errors_name_the_key(keys: Keys) -> None:
    from shoal.errors import ConfigError

    for redis, key in (({"db": 99}, "redis.db"), ({"timeout": "0s"}, "redis.timeout"),
                       ({"prefix": "a b"}, "redis.prefix"), ({"colour": 1}, "redis.colour")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            tracker_config.load(tracker_doc(keys, redis=redis))
    with pytest.raises(ConfigError, match="data_dir"):
        tracker_config.load(tracker_doc(keys, redis={}, data_dir="/tmp/x"))


def test_peer_records_round_trip_both_families() -> None:
    peers = [Peer("10.1.2.3", 6881, b"A" * 20, 0, 0.0), Peer("fd00::7", 51413, b"B" * 20, 5, 0.0)]
    records = b"".join(redisstore._record(p) for p in peers)
    assert redisstore._peers(records) == [("10.1.2.3", 6881, b"A" * 20), ("fd00::7", 51413, b"B" * 20)]
    assert redisstore._peers(records[:-1]) == [("10.1.2.3", 6881, b"A" * 20)]  # a cut record is dropped


async def test_two_clusters_cannot_share_a_prefix(aiohttp_client: Any, keys: Keys, redis_server: RedisServer,
                                                  prefix: str, meta: metainfo.Metainfo, tmp_path: Path) -> None:
    """attack15: two clusters (two origin keys) on one prefix replaced each other's registrations
    of a shared layer. The first to register owns the prefix; the other's are refused, saying why."""
    ours = await replica(aiohttp_client, keys, redis_server, prefix)
    other_keys = Keys(tmp_path / "other")
    theirs = await replica(aiohttp_client, other_keys, redis_server, prefix)
    assert await register(ours, meta, keys) == 201
    r = await theirs.put(protocol.REGISTER_METAINFO.path(digest=str(meta.digest)), data=meta.raw,
                         headers={"Authorization": "Bearer registration-secret-0123456789",
                                  protocol.SIGNATURE_HEADER: other_keys.sign(meta.raw)})
    assert r.status == 503 and "another cluster" in await r.text()
    assert await registered(ours, meta, keys)


async def test_a_peer_without_a_zone_is_not_removed_and_re_added_on_each_announce(redis_server: RedisServer,
                                                                                   prefix: str) -> None:
    """attack19 #7: the script compared a zone-less peer's recorded node (none) with its node, so
    every announce of such a peer (the origin's seeder, every node where no zone is set) removed
    it (six ZREMs and two HDELs) and wrote it again. A peer that moves into a zone, or to another
    zone, still leaves its old place."""
    client, swarms, ih = await one_swarm(redis_server, prefix, ttl=60.0)
    try:
        async def hdels() -> int:
            stats = await client.info("commandstats")
            return int(stats.get("cmdstat_hdel", {}).get("calls", 0))

        peer = Peer("127.0.0.2", 1, PID, 5, 0.0, node="node-a")
        await swarms.announce(ih, peer, "started", want=50)
        before = await hdels()
        for _ in range(3):
            assert await swarms.announce(ih, peer, "", want=50) is not None
        assert await hdels() == before
        # into a zone, then another: the old zone's entries go (a zoned answer sees only its zone)
        other = Peer("127.0.0.3", 2, PID, 5, 0.0, zone="b", node="node-b")
        await swarms.announce(ih, other, "started", want=50)
        await swarms.announce(ih, Peer("127.0.0.2", 1, PID, 5, 0.0, zone="a", node="node-a"), "", want=50)
        await swarms.announce(ih, Peer("127.0.0.2", 1, PID, 5, 0.0, zone="b", node="node-a"), "", want=50)
        assert await client.zrange(f"{swarms._base(ih)}zl:a", 0, -1) == []
        assert sorted(await client.zrange(f"{swarms._base(ih)}zl:b", 0, -1)) == [b"127.0.0.2|1", b"127.0.0.3|2"]
        assert await hdels() > before
    finally:
        await client.aclose()
