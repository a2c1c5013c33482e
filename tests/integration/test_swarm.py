"""Two libtorrent sessions (shoal.swarm) on 127.0.0.2 and .3 with the real tracker in process:
pieces stream in order, the flushed file hashes to the digest, move_storage keeps seeding."""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metainfo
from shoal.oci import Digest
from shoal.store import sha256_file
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Swarm, SwarmSettings
from tests.support.procs import free_port
from tracker import app as tracker_app
from tracker import config as tracker_config

TOKEN = "registration-secret-0123456789"


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch) -> TestServer:  # type: ignore[misc]
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"}, "interval": "2s",
                               "min_interval": "1s", "peer_ttl": "10s"})
    server = TestServer(tracker_app.build(cfg), host="127.0.0.1", port=free_port())
    await server.start_server()
    yield server
    await server.close()


async def start_swarm(ip: str, fingerprint: str) -> Swarm:
    swarm = Swarm(SwarmSettings(listen_ip=ip, listen_port=free_port(ip), fingerprint=fingerprint))
    await swarm.start()
    return swarm


async def test_stream_verify_move(tmp_path: Path, tracker: TestServer) -> None:
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
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status == 201

    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT)
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT)
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
                job.prioritize(index)
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
