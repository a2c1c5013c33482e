"""The origin's seeder has an upload slot for each swarm being downloaded (four at least), not
four in all, and no swarm more than four.

With the session's four slots shared by every swarm, peers of one swarm waited for turns behind
peers of others (the soak: 3 MB blobs up to 11 s on loopback, and a node's download that got no
piece for 10 s fell back to the registry)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metainfo, protocol
from shoal.oci import Digest
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, SEEDER_SLOTS, Swarm, SwarmSettings
from tests.integration.conftest import REGISTRATION_TOKEN, Keys, tracker_server
from tests.support import pki
from tests.support.procs import free_port

BLOBS = 6  # swarms: more than the four slots of one
LEECHERS = 2


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    async with tracker_server(keys, monkeypatch, interval="2s", min_interval="1s") as server:
        yield server


async def register(tracker: TestServer, keys: Keys, seed_dir: Path, n: int) -> metainfo.Metainfo:
    data = random.Random(n).randbytes(4 << 20)
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

