"""attack19: the origin_spare rule (tracker/peers.py ORIGIN_SPARE) under attack, both stores."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from shoal import metainfo, protocol
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from shoal_tracker import redisstore
from shoal_tracker.peers import SPARE_SCAN, Peer, PeerStore
from tests.integration import test_tracker_app as app_tests
from tests.integration.conftest import Keys
from tests.integration.test_tracker_app import Client, announce, register, tracker_doc
from tests.integration.test_tracker_redis import compact_ports, prefix, replica
from tests.support.redis import RedisServer

meta = app_tests.meta
tokens = app_tests.tokens
__all__ = ["prefix"]  # a fixture

PID = b"-SA0100-" + bytes(12)


async def test_both_stores_look_at_the_same_seeders_for_origin_spare(redis_server: RedisServer, prefix: str) -> None:
    """Finding 1: the in-memory store looked at the SPARE_SCAN *longest-listed* seeders (any zone,
    fresh or not), Redis at the SPARE_SCAN *latest* boundary seeders: one node listing SPARE_SCAN
    seeder entries first (or last) decided differently in the two stores whether two honest seeders
    spare the origin. Both must decide alike (as Redis does: the latest fresh boundary seeders)."""
    client = redisstore.client(host="127.0.0.1", port=redis_server.port, db=0, username=None,
                               password=redis_server.password, timeout=2, max_connections=4)
    shared = redisstore.RedisSwarms(client, prefix=prefix, ttl=60, max_peers=1000, max_per_address=1000,
                                    zone_gateways=2)
    memory = PeerStore(ttl=60, max_peers=1000, max_per_address=1000)
    try:
        for first_listed in (True, False):
            ih = secrets.token_bytes(20)
            await redisstore._command(client.hset(f"{prefix}torrents", ih.hex(), "a" * 64))

            async def put(peer: Peer, event: str, ih: bytes = ih, case: bool = first_listed) -> set[tuple[str, int]]:
                memory.announce(ih, peer, event)
                handed_memory = {(p.ip, p.port) for p in memory.select(
                    ih, (peer.ip, peer.port), want=2000, seeder=peer.is_seeder, zone=peer.zone, node=peer.node)}
                answer = await shared.announce(ih, peer, event, want=2000)
                assert answer is not None
                handed_redis = {(ip, port) for ip, port, _ in answer.peers}
                assert handed_memory == handed_redis, (case, peer)
                return handed_memory

            async def flood() -> None:  # one node, SPARE_SCAN seeder entries
                for port in range(1, SPARE_SCAN + 1):
                    await put(Peer("127.0.1.1", port, PID, 0, time.monotonic(), node="m"),
                              "completed")

            await put(Peer("127.0.0.1", 1, PID, 0, time.monotonic(), node="origin", origin=True), "started")
            if first_listed:
                await flood()
            for ip, node in (("127.0.0.2", "a"), ("127.0.0.3", "b")):
                await put(Peer(ip, 1, PID, 0, time.monotonic(), node=node), "completed")
            if not first_listed:
                await flood()
            await put(Peer("127.0.0.9", 1, PID, 5, time.monotonic(), node="joiner"), "started")
    finally:
        await client.aclose()


async def test_a_seeder_that_missed_its_announces_does_not_spare_the_origin_under_a_long_peer_ttl(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """Finding 2: the freshness window was peer_ttl / 3, "about one interval" only at the default
    peer_ttl. An operator who raises peer_ttl (allowed; say 60 s with a 1 s interval) made two
    seeders gone without a word (a node pool's rolling upgrade, spot instances) hide the origin
    for 20 s, 19 missed announces: every joiner then stalled until its fallback. The window must
    follow the interval (at most the default ttl's third: interval + ANNOUNCE_TIMEOUT / 3)."""
    doc = tracker_doc(keys, interval=1, peer_ttl=60, max_peers_per_address=100)
    assert tracker_config.load(doc).spare_window == 13 / 3  # (3 intervals + the announce timeout) / 3
    assert tracker_config.load({**doc, "peer_ttl": 11}).spare_window == 11 / 3  # shorter: stays shorter
    memory: Client = await aiohttp_client(tracker_app.build(tracker_config.load(doc)))
    shared: Client = await aiohttp_client(tracker_app.build(tracker_config.load(
        {**doc, "redis": redis_server.settings(prefix)})))
    ih = meta.tracker_hash
    for c in (memory, shared):
        assert await register(c, meta, keys) == 201
        await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
        for port in (7001, 7002):
            await announce(c, ih, port, 0, token=keys.token(f"node-{port}", blob=meta.digest.hex), event="completed")
        d = await announce(c, ih, 7003, 5, token=keys.token("node-7003", blob=meta.digest.hex), event="started")
        assert 7000 not in compact_ports(d)  # two fresh seeders of its own: spared, as designed
    await asyncio.sleep(5.5)  # 7001 and 7002 miss five announces (interval 1 s); they are gone
    for c in (memory, shared):
        await announce(c, ih, 7000, 0, token=keys.token("origin"))  # the origin keeps announcing
        d = await announce(c, ih, 7004, 5, token=keys.token("node-7004", blob=meta.digest.hex), event="started")
        assert 7000 in compact_ports(d), c  # the joiner must get the origin: its other sources are dead


class Both:
    """One swarm in each store, fed the same announces: each answer must be the same set."""

    def __init__(self, client: Any, prefix: str, ih: bytes) -> None:
        self.shared = redisstore.RedisSwarms(client, prefix=prefix, ttl=60, max_peers=1000, max_per_address=1000,
                                             zone_gateways=2)
        self.memory = PeerStore(ttl=60, max_peers=1000, max_per_address=1000)
        self.ih = ih

    async def put(self, ip: str, port: int, left: int, node: str, event: str = "", *,
                  origin: bool = False) -> set[tuple[str, int]]:
        peer = Peer(ip, port, PID, left, time.monotonic(), node=node, origin=origin)
        self.memory.announce(self.ih, peer, event)
        handed_memory = {(p.ip, p.port) for p in self.memory.select(
            self.ih, (ip, port), want=200, seeder=peer.is_seeder, node=node)}
        answer = await self.shared.announce(self.ih, peer, event, want=200)
        assert answer is not None
        assert handed_memory == {(a, p) for a, p, _ in answer.peers}, peer
        return handed_memory


async def both(redis_server: RedisServer, prefix: str) -> tuple[Any, Both]:
    client = redisstore.client(host="127.0.0.1", port=redis_server.port, db=0, username=None,
                               password=redis_server.password, timeout=2, max_connections=4)
    ih = secrets.token_bytes(20)
    await redisstore._command(client.hset(f"{prefix}torrents", ih.hex(), "a" * 64))
    return client, Both(client, prefix, ih)


async def test_the_joiners_own_node_does_not_spare_the_origin_for_it(redis_server: RedisServer,
                                                                     prefix: str) -> None:
    """Finding 3: a node's own seeder entry counted toward the two nodes that spare the origin for
    that node's own download. An agent restarted with an empty cache (a new port; its old entry,
    dead, stays fresh for the window) joins with one other seeder in the swarm: it was not handed
    the origin, and its one real source was the other node (a liar there: no source at all)."""
    client, stores = await both(redis_server, prefix)
    try:
        await stores.put("127.0.0.1", 1, 0, "origin", "started", origin=True)
        await stores.put("127.0.0.2", 1, 0, "a", "completed")
        await stores.put("127.0.0.3", 1, 0, "j", "completed")  # node j, before its restart
        handed = await stores.put("127.0.0.3", 2, 5, "j", "started")  # node j again, cache lost
        assert ("127.0.0.1", 1) in handed  # one other node only: the origin is handed out
        handed = await stores.put("127.0.0.9", 1, 5, "k", "started")  # another node: a and j spare it
        assert ("127.0.0.1", 1) not in handed
    finally:
        await client.aclose()


async def test_seeders_of_the_other_address_family_do_not_spare_the_origin(redis_server: RedisServer,
                                                                           prefix: str) -> None:
    """Finding 4: seeders that announced over IPv6 spared the origin for a joiner that announced
    over IPv4 (a dual-stack tracker, node pools of either family, a migration): it was handed
    only peers it cannot reach, the origin left out."""
    client, stores = await both(redis_server, prefix)
    try:
        await stores.put("127.0.0.1", 1, 0, "origin", "started", origin=True)
        await stores.put("fd00::2", 1, 0, "a", "completed")
        await stores.put("fd00::3", 1, 0, "b", "completed")
        handed = await stores.put("127.0.0.9", 1, 5, "k", "started")
        assert ("127.0.0.1", 1) in handed  # no seeder of its own it can reach: the origin
        handed = await stores.put("fd00::9", 1, 5, "l", "started")
        assert ("127.0.0.1", 1) not in handed  # two of its family: spared
    finally:
        await client.aclose()


async def test_every_swarm_key_expires_and_unregistering_leaves_none(
        aiohttp_client: Any, keys: Keys, redis_server: RedisServer, prefix: str, meta: metainfo.Metainfo) -> None:
    """Checked sound: the keys ORIGIN_SPARE adds (:o, :n) expire with the swarm and go with it."""
    c = await replica(aiohttp_client, keys, redis_server, prefix)
    assert await register(c, meta, keys) == 201
    ih = meta.tracker_hash
    await announce(c, ih, 7000, 0, token=keys.token("origin"), event="started")
    for port, zone in ((7001, ""), (7002, "a"), (7003, "b")):
        token = keys.token(f"node-{port}", blob=meta.digest.hex)
        await announce(c, ih, port, 5, token=token, event="started", zone=zone)
        await announce(c, ih, port, 0, token=token, event="completed", zone=zone)
    await announce(c, ih, 7004, 5, token=keys.token("node-7004", blob=meta.digest.hex), event="started")
    client = redisstore.client(host="127.0.0.1", port=redis_server.port, db=0, username=None,
                               password=redis_server.password, timeout=2, max_connections=2)
    try:
        swarm = [k.decode() for k in await client.keys(f"{prefix}swarm:*")]
        assert {f"{prefix}swarm:{ih.hex()}:{s}" for s in ("o", "n")} <= set(swarm)
        for key in swarm:
            assert await client.pttl(key) > 0, key
        r = await c.delete(protocol.UNREGISTER_METAINFO.path(digest=str(meta.digest)),
                           headers={"Authorization": "Bearer registration-secret-0123456789"})
        assert r.status == 204
        assert await client.keys(f"{prefix}swarm:*") == []
    finally:
        await client.aclose()
