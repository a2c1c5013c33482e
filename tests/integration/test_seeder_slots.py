"""The origin's seeder has an upload slot for each swarm being downloaded (four at least), not
four in all, and no swarm more than four.

With the session's four slots shared by every swarm, peers of one swarm waited for turns behind
peers of others (the soak: 3 MB blobs up to 11 s on loopback, and a node's download that got no
piece for 10 s fell back to the registry)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metainfo, peercerts, protocol, signing
from shoal import swarm as swarm_module
from shoal.metrics import SwarmCollector
from shoal.oci import Digest
from shoal.slowpeers import SlowPeerGuard
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, SEEDER_SLOTS, Swarm, SwarmSettings
from tests.integration.conftest import REGISTRATION_TOKEN, Keys, tracker_server
from tests.support import peerprobe, pki
from tests.support.procs import free_port

BLOBS = 6  # swarms: more than the four slots of one
LEECHERS = 2


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    async with tracker_server(keys, monkeypatch, interval="2s", min_interval="1s") as server:
        yield server


async def register(tracker: TestServer, keys: Keys, seed_dir: Path, n: int, size: int = 4 << 20
                   ) -> metainfo.Metainfo:
    data = random.Random(n).randbytes(size)
    digest = Digest(hashlib.sha256(data).hexdigest())
    (seed_dir / digest.hex).write_bytes(data)
    base = f"http://127.0.0.1:{tracker.port}"
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest,
                                  announce=protocol.ANNOUNCE.url(base), root_cert=keys.root_cert)
    async with aiohttp.ClientSession() as http:
        r = await http.put(protocol.REGISTER_METAINFO.url(base, digest=str(digest)), data=raw,
                           headers={"Authorization": f"Bearer {REGISTRATION_TOKEN}",
                                    protocol.SIGNATURE_HEADER: keys.sign(raw)})
        assert r.status == 201
    return metainfo.parse(raw)


async def unchoked(seeder: Swarm) -> int:
    await seeder.fresh_stats()
    return seeder.stats.get("peer.num_peers_up_unchoked", 0)


async def test_every_swarm_gets_its_own_slots(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    metas = [await register(tracker, keys, seed_dir, n) for n in range(BLOBS)]
    seeder = Swarm(SwarmSettings("127.0.0.2", free_port("127.0.0.2"), SEEDER_FINGERPRINT))
    await seeder.start()
    pki.admit(seeder, keys.key, "origin")
    leechers: list[Swarm] = []
    try:
        for meta in metas:
            seeder.add(meta, seed_dir, seed=True)
        for i in range(LEECHERS):
            ip = f"127.0.0.{3 + i}"
            # slow enough (six 4 MiB blobs at 256 KB/s) to stay leechers throughout
            leecher = Swarm(SwarmSettings(ip, free_port(ip), AGENT_FINGERPRINT, download_rate_limit=256_000))
            await leecher.start()
            leechers.append(leecher)
            pki.admit(leecher, keys.key, f"node-{i}")
            (tmp_path / f"leech{i}").mkdir()
            for meta in metas:
                leecher.add(meta, tmp_path / f"leech{i}", seed=False)
        want = BLOBS  # a slot per swarm
        async with asyncio.timeout(45):
            # as many peers are uploaded to at once (the choker runs every 3 s)
            while await unchoked(seeder) < want:
                for leecher in leechers:
                    for job in leecher.jobs():
                        if job.have_count == 0:
                            leecher.force_reannounce(job)
                await asyncio.sleep(0.5)
        assert seeder.unchoke_slots == want
        assert all(job.handle.max_uploads() == SEEDER_SLOTS for job in seeder.jobs())  # no swarm more
        assert seeder.session.get_settings()["unchoke_slots_limit"] == want
        assert all(job.have_count < job.meta.num_pieces for leecher in leechers for job in leecher.jobs())
        for leecher in leechers:
            await leecher.stop()
        leechers.clear()
        async with asyncio.timeout(30):  # the leechers left: back to one swarm's four
            while seeder.unchoke_slots != SEEDER_SLOTS:
                await asyncio.sleep(0.2)
        assert seeder.session.get_settings()["unchoke_slots_limit"] == SEEDER_SLOTS
    finally:
        for leecher in leechers:
            await leecher.stop()
        await seeder.stop()


@pytest.mark.slow  # long by nature: run with --slow (CI does)
async def test_peers_that_hold_slots_and_do_not_read_are_dropped_for_a_while(
        tmp_path: Path, tracker: TestServer, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """attack20 #3: libtorrent's round robin keeps a peer unchoked while it took more in the last
    round than the peers waiting (none: they are choked), until it has had four pieces and a
    minute has passed. Two peers asking for a block every half second and reading a few bytes
    held the seeder's two regular slots, and an honest peer got no piece for 22 s after its
    optimistic turn (longer than an agent's stall timeout). While a peer waits, the seeder now
    drops a holder that read under the floor over a whole window, refusing its address a while."""
    monkeypatch.setattr(swarm_module, "SLOTS_RECOUNT", 0.2)
    monkeypatch.setattr(swarm_module, "GUARD_EVERY", 2)
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    meta = await register(tracker, keys, seed_dir, 0, 8 << 20)
    port = free_port("127.0.0.2")
    # three slots (an operator's fixed number: the guard holds for it too), one of them the
    # optimistic unchoke
    seeder = Swarm(SwarmSettings("127.0.0.2", port, SEEDER_FINGERPRINT, extra={"unchoke_slots_limit": 3}))
    await seeder.start()
    assert seeder.slow_peers is not None
    # production: 30 s, 8 KiB/s, a 10 s kick first. The tricklers' blocks go into the seeder's
    # socket buffers (1 MiB and more on loopback) and count as sent: 32 KiB/s each by libtorrent's
    # count, which keeps them ahead of a waiting peer every round, and under this floor.
    guard = seeder.slow_peers = SlowPeerGuard(window=4.0, floor=64 << 10, kick=12.0, spare=["127.0.0.2"])
    pki.admit(seeder, keys.key, "origin")
    seeder.add(meta, seed_dir, seed=True)
    tricklers: list[peerprobe.Trickler] = []
    identities = []
    leecher = None
    try:
        for i in range(2):  # first: they take the regular slots while no one else wants one
            node_key = peercerts.NodeKey.generate()
            identities.append(peerprobe.node_identity(node_key, peercerts.issue_grant(
                keys.key, f"trickler-{i}", node_key.public_key, signing.EVERY_BLOB, 600)[1]))
            tricklers.append(peerprobe.Trickler(("127.0.0.2", port), meta, source_ip=f"127.0.0.{9 + i}",
                                                identity=identities[i], every=0.5, within=90))
            async with asyncio.timeout(10):
                while not tricklers[i].unchoked.is_set():
                    await asyncio.sleep(0.05)
        # an honest peer that reads, slowly (400 KB/s, six times the floor: 8 MiB take it 20 s)
        leecher = Swarm(SwarmSettings("127.0.0.3", free_port("127.0.0.3"), AGENT_FINGERPRINT,
                                      download_rate_limit=400_000))
        await leecher.start()
        pki.admit(leecher, keys.key, "honest-node")
        (tmp_path / "leech").mkdir()
        job = leecher.add(meta, tmp_path / "leech", seed=False)
        async with asyncio.timeout(60):
            while not seeder.banned_addresses:
                await asyncio.sleep(0.1)
        # one peer waits: one holder is dropped, whose slot the honest peer then takes; nobody
        # waits behind the other one, which is left alone
        assert len(seeder.banned_addresses) == 1
        ip = seeder.banned_addresses[0]
        i = int(ip.rsplit(".", 1)[1]) - 9
        async with asyncio.timeout(10):
            while not tricklers[i].hung_up.is_set():
                await asyncio.sleep(0.1)
        assert guard.dropped == 1
        families = {f.name: f for f in SwarmCollector("shoal_origin", seeder).collect()}
        assert families["shoal_origin_swarm_slow_peers_dropped"].samples[0].value == 1
        assert families["shoal_origin_swarm_addresses_banned"].samples[0].value == 1
        # while banned, the address is hung up on (another gets the BitTorrent handshake)
        seeder_address = ("127.0.0.2", port)
        assert await asyncio.to_thread(peerprobe.refused, seeder_address, meta, source_ip=ip,
                                       identity=identities[i])
        assert not await asyncio.to_thread(peerprobe.refused, seeder_address, meta, source_ip="127.0.0.11",
                                           identity=identities[i])
        # the honest peer gets the whole blob, and is never dropped
        async with asyncio.timeout(60):
            await job.finished.wait()
        await job.flush()
        assert hashlib.sha256((tmp_path / "leech" / meta.digest.hex).read_bytes()).hexdigest() == meta.digest.hex
        assert guard.dropped == 1
        # the kick ends
        async with asyncio.timeout(30):
            while ip in seeder.banned_addresses:
                await asyncio.sleep(0.2)
        first = (seed_dir / meta.digest.hex).read_bytes()[:4 * peerprobe.BLOCK]
        assert await asyncio.to_thread(peerprobe.probe, seeder_address, meta, source_ip=ip,
                                       identity=identities[i], within=8) == first
    finally:
        for t in tricklers:
            t.close()
        if leecher is not None:
            await leecher.stop()
        await seeder.stop()


async def test_a_peer_that_sends_the_seeder_pieces_is_banned_at_once(
        tmp_path: Path, tracker: TestServer, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """attack23 #1: libtorrent's choker ranks first the peers that sent the most in the last
    round, and a seed takes an unasked block without a word; so a peer sending one each round
    kept a slot whatever it read, reconnecting before the slow-peer window ended. The seeder never
    asks for a piece: a peer that sends one is banned at once, for the longest."""
    monkeypatch.setattr(swarm_module, "SLOTS_RECOUNT", 0.2)
    monkeypatch.setattr(swarm_module, "GUARD_EVERY", 2)
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    meta = await register(tracker, keys, seed_dir, 0)
    port = free_port("127.0.0.2")
    seeder = Swarm(SwarmSettings("127.0.0.2", port, SEEDER_FINGERPRINT))
    await seeder.start()
    assert seeder.slow_peers is not None
    # a window longer than the test: only the unasked pieces can get it dropped
    guard = seeder.slow_peers = SlowPeerGuard(window=600.0, ban_max=600.0, spare=["127.0.0.2"])
    pki.admit(seeder, keys.key, "origin")
    seeder.add(meta, seed_dir, seed=True)
    node_key = peercerts.NodeKey.generate()
    identity = peerprobe.node_identity(node_key, peercerts.issue_grant(
        keys.key, "junk", node_key.public_key, signing.EVERY_BLOB, 600)[1])
    junk = peerprobe.Trickler(("127.0.0.2", port), meta, source_ip="127.0.0.9", identity=identity,
                              every=0.5, rate=1 << 20, within=60, junk=True)
    try:
        async with asyncio.timeout(30):
            while not junk.hung_up.is_set():
                await asyncio.sleep(0.1)
        assert junk.unchoked.is_set()  # it had a slot (nobody waited: no contention needed)
        assert guard.dropped == 1
        assert seeder.banned_addresses == ["127.0.0.9"]
        assert guard.ban_length("127.0.0.9", time.monotonic()) > 500
        assert await asyncio.to_thread(peerprobe.refused, ("127.0.0.2", port), meta, source_ip="127.0.0.9",
                                       identity=identity)
    finally:
        junk.close()
        await seeder.stop()
