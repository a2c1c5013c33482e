"""Two libtorrent sessions (shoal.swarm) on 127.0.0.2 and .3 with the real tracker in process:
pieces stream in order, the flushed file hashes to the digest, move_storage keeps seeding."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metainfo
from shoal.oci import Digest
from shoal.store import sha256_file
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Swarm, SwarmSettings
from tests.integration.conftest import Keys
from tests.support.procs import free_port
from tracker import app as tracker_app
from tracker import config as tracker_config

TOKEN = "registration-secret-0123456789"


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SHOAL_TEST_NODE_TOKEN", "node-secret-0123456789abcdef")
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"},
                               "node_token": {"env": "SHOAL_TEST_NODE_TOKEN"},
                               "origin_public_key": str(keys.public_path), "interval": "2s",
                               "min_interval": "1s", "peer_ttl": "10s"})
    server = TestServer(tracker_app.build(cfg), host="127.0.0.1", port=free_port())
    await server.start_server()
    yield server
    await server.close()


async def start_swarm(ip: str, fingerprint: str, token: str | None) -> Swarm:
    swarm = Swarm(SwarmSettings(listen_ip=ip, listen_port=free_port(ip), fingerprint=fingerprint))
    await swarm.start()
    if token is not None:
        swarm.set_token(token)
    return swarm


async def test_stream_verify_move(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    data = random.Random(5).randbytes(9 * (1 << 20) + 12345)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seed_dir, leech_dir, final_dir = tmp_path / "seed", tmp_path / "leech", tmp_path / "final"
    for d in (seed_dir, leech_dir, final_dir):
        d.mkdir()
    (seed_dir / digest.hex).write_bytes(data)
    announce = f"http://127.0.0.1:{tracker.port}/announce"
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest, announce=announce)
    meta = metainfo.parse(raw)
    async with aiohttp.ClientSession() as http:
        r = await http.put(f"http://127.0.0.1:{tracker.port}/v1/metainfo/{digest}", data=raw,
                           headers={"Authorization": f"Bearer {TOKEN}", "Shoal-Signature": keys.sign(raw)})
        assert r.status == 201

    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys.token("origin"))
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys.token("node-a"))
    try:
        seeder.add(meta, seed_dir, seed=True)
        job = leecher.add(meta, leech_dir, seed=False)
        streamed = bytearray()
        index = 0
        async with asyncio.timeout(60):
            while index < meta.num_pieces:
                if job.has_piece(index):
                    streamed += await job.read_piece(index)
                    index += 1
                    continue
                job.want(index)
                await job.wait_change(1.0)
                if job.have_count == 0:
                    leecher.force_reannounce(job)
            await job.finished.wait()
        assert hashlib.sha256(streamed).hexdigest() == digest.hex
        await job.flush()
        assert await asyncio.to_thread(sha256_file, leech_dir / digest.hex, digest) == digest
        assert job.peer_bytes.from_seeders > 0 and job.peer_bytes.from_agents == 0
        await job.move_to(final_dir)
        assert (final_dir / digest.hex).exists() and not (leech_dir / digest.hex).exists()
        assert (final_dir / digest.hex).read_bytes() == data
        await leecher.remove(digest.hex)
        assert leecher.job(digest.hex) is None and (final_dir / digest.hex).exists()
    finally:
        await leecher.stop()
        await seeder.stop()


async def test_no_token_no_swarm(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    """A node without a swarm token (or with a forged one) gets no peers, so no bytes."""
    data = random.Random(6).randbytes(3 * (1 << 20))
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / "seed").mkdir()
    (tmp_path / "leech").mkdir()
    (tmp_path / "seed" / digest.hex).write_bytes(data)
    raw = await asyncio.to_thread(metainfo.create, tmp_path / "seed" / digest.hex, digest,
                                  announce=f"http://127.0.0.1:{tracker.port}/announce")
    meta = metainfo.parse(raw)
    async with aiohttp.ClientSession() as http:
        r = await http.put(f"http://127.0.0.1:{tracker.port}/v1/metainfo/{digest}", data=raw,
                           headers={"Authorization": f"Bearer {TOKEN}", "Shoal-Signature": keys.sign(raw)})
        assert r.status == 201
    forged = Keys(tmp_path / "attacker").token("intruder")
    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys.token("origin"))
    intruder = await start_swarm("127.0.0.4", AGENT_FINGERPRINT, forged)
    try:
        seeder.add(meta, tmp_path / "seed", seed=True)
        job = intruder.add(meta, tmp_path / "leech", seed=False)
        for _ in range(6):
            intruder.force_reannounce(job)
            await job.wait_change(0.5)
        assert job.have_count == 0
        assert intruder.tracker_errors >= 1
    finally:
        await intruder.stop()
        await seeder.stop()
