"""libtorrent sessions (shoal.swarm) with the real tracker in process on [::1] (issue 15).

A session listening on several addresses (torrent.listen [::] or 0.0.0.0 expands to one per
interface) announces only from those that can reach the tracker and reports each of the others
as "skipping tracker announce (unreachable)". That is not a tracker out of reach: taken as one,
every pull fell back to the registry at once (bench --ipv6 with torrent.listen [::]: 4.75x
registry egress). Here a session listens on 127.0.0.3 and [::1] (both loopback) with the
tracker on IPv6 only: it is not marked unreachable and downloads from the v6 seeder; a session
on 127.0.0.3 alone still is (every address skipped), so it falls back at once as before."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from shoal import metainfo, protocol
from shoal.oci import Digest
from shoal.store import sha256_file
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Swarm, SwarmSettings
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from tests.integration.conftest import NODE_TOKEN, REGISTRATION_TOKEN, Keys
from tests.support import pki
from tests.support.procs import free_port, has_ipv6_loopback

pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


@dataclass(frozen=True, slots=True)
class TwoAddresses(SwarmSettings):
    """Listens on 127.0.0.3 and [::1] at one port, as an unspecified listen address would on
    every interface (kept on loopback here)."""

    def listen_interfaces(self) -> str:
        return f"127.0.0.3:{self.listen_port}s,[::1]:{self.listen_port}s"


@pytest.fixture
async def tracker6(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    monkeypatch.setenv("SHOAL_TEST_TOKEN", REGISTRATION_TOKEN)
    monkeypatch.setenv("SHOAL_TEST_NODE_TOKEN", NODE_TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"},
                               "node_token": {"env": "SHOAL_TEST_NODE_TOKEN"},
                               "origin_public_key": str(keys.public_path), "interval": "2s", "min_interval": "1s"})
    server = TestServer(tracker_app.build(cfg), host="::1", port=free_port("::1"))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def registered(tmp_path: Path, tracker: TestServer, keys: Keys) -> tuple[metainfo.Metainfo, Path, bytes]:
    data = random.Random(615).randbytes(5 * (1 << 20) + 777)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / digest.hex).write_bytes(data)
    base = f"http://[::1]:{tracker.port}"
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest, announce=protocol.ANNOUNCE.url(base),
                                  root_cert=keys.root_cert)
    async with aiohttp.ClientSession() as http:
        r = await http.put(protocol.REGISTER_METAINFO.url(base, digest=str(digest)), data=raw,
                           headers={"Authorization": f"Bearer {REGISTRATION_TOKEN}",
                                    protocol.SIGNATURE_HEADER: keys.sign(raw)})
        assert r.status == 201
    return metainfo.parse(raw), seed_dir, data


async def started(settings: SwarmSettings, keys: Keys, node: str) -> Swarm:
    swarm = Swarm(settings)
    await swarm.start()
    pki.admit(swarm, keys.key, node)
    return swarm


async def test_an_address_that_cannot_reach_the_tracker_is_not_an_unreachable_tracker(
        tmp_path: Path, tracker6: TestServer, keys: Keys) -> None:
    meta, seed_dir, data = await registered(tmp_path, tracker6, keys)
    port = free_port("::1")
    seeder = await started(SwarmSettings(listen_ip="::1", listen_port=free_port("::1"),
                                         fingerprint=SEEDER_FINGERPRINT, allow_multiple_connections_per_ip=True),
                           keys, "origin")
    leecher = await started(TwoAddresses(listen_ip="::1", listen_port=port, fingerprint=AGENT_FINGERPRINT,
                                         allow_multiple_connections_per_ip=True), keys, "node-a")
    try:
        seeder.add(meta, seed_dir, seed=True)
        leech_dir = tmp_path / "leech"
        leech_dir.mkdir()
        job = leecher.add(meta, leech_dir, seed=False)
        async with asyncio.timeout(60):
            while not job.finished.is_set():
                # the download path gives up on the swarm the moment this is set
                assert not job.tracker_unreachable, "a skipped announce was taken for an unreachable tracker"
                await job.wait_change(0.2)
        await job.flush()
        assert await asyncio.to_thread(sha256_file, leech_dir / meta.digest.hex, meta.digest) == meta.digest
        assert (leech_dir / meta.digest.hex).read_bytes() == data
        assert ("127.0.0.3", port) in job.skipped_endpoints  # libtorrent did skip the IPv4 address
        assert leecher.tracker_errors == 0
    finally:
        await leecher.stop()
        await seeder.stop()


async def test_a_session_that_can_reach_the_tracker_from_no_address_is_told_so(
        tmp_path: Path, tracker6: TestServer, keys: Keys) -> None:
    meta, _seed_dir, _data = await registered(tmp_path, tracker6, keys)
    leecher = await started(SwarmSettings(listen_ip="127.0.0.3", listen_port=free_port("127.0.0.3"),
                                          fingerprint=AGENT_FINGERPRINT), keys, "node-b")
    try:
        leech_dir = tmp_path / "leech"
        leech_dir.mkdir()
        job = leecher.add(meta, leech_dir, seed=False)
        async with asyncio.timeout(15):
            while not job.tracker_unreachable:
                await job.wait_change(0.2)
        assert leecher.tracker_errors >= 1
    finally:
        await leecher.stop()
