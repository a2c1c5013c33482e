"""Two libtorrent sessions (shoal.swarm) on 127.0.0.2 and .3 with the real tracker in process:
pieces stream in order, the flushed file hashes to the digest, move_storage keeps seeding."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import aiohttp
import libtorrent as lt
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from shoal import announcing, bencode, metainfo, peercerts, protocol, signing
from shoal import swarm as swarm_module
from shoal.clients import OriginClient
from shoal.oci import Digest
from shoal.store import sha256_file
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Grant, Swarm, SwarmSettings
from shoal_agent import firstcopy
from shoal_agent.metrics import AgentMetrics
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from tests.integration.conftest import NODE_TOKEN, REGISTRATION_TOKEN, Keys, tracker_server
from tests.support import pki
from tests.support.procs import free_port, metric_sum, parse_metrics

TOKEN = REGISTRATION_TOKEN


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    async with tracker_server(keys, monkeypatch, interval="2s", min_interval="1s") as server:
        yield server


async def start_swarm(ip: str, fingerprint: str, ca: Keys, node: str) -> Swarm:
    """A session admitted by the CA `ca` as `node`."""
    swarm = Swarm(SwarmSettings(listen_ip=ip, listen_port=free_port(ip), fingerprint=fingerprint))
    await swarm.start()
    pki.admit(swarm, ca.key, node)
    return swarm


async def test_stream_verify_move(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    data = random.Random(5).randbytes(9 * (1 << 20) + 12345)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seed_dir, leech_dir, final_dir = tmp_path / "seed", tmp_path / "leech", tmp_path / "final"
    for d in (seed_dir, leech_dir, final_dir):
        d.mkdir()
    (seed_dir / digest.hex).write_bytes(data)
    announce = protocol.ANNOUNCE.url(f"http://127.0.0.1:{tracker.port}")
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest, announce=announce,
                                  root_cert=keys.root_cert)
    meta = metainfo.parse(raw)
    async with aiohttp.ClientSession() as http:
        url = protocol.REGISTER_METAINFO.url(f"http://127.0.0.1:{tracker.port}", digest=str(digest))
        r = await http.put(url, data=raw,
                           headers={"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(raw)})
        assert r.status == 201

    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys, "origin")
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys, "node-a")
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
                                  announce=protocol.ANNOUNCE.url(f"http://127.0.0.1:{tracker.port}"),
                                  root_cert=keys.root_cert)
    meta = metainfo.parse(raw)
    async with aiohttp.ClientSession() as http:
        url = protocol.REGISTER_METAINFO.url(f"http://127.0.0.1:{tracker.port}", digest=str(digest))
        r = await http.put(url, data=raw,
                           headers={"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(raw)})
        assert r.status == 201
    forged = Keys(tmp_path / "attacker")
    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys, "origin")
    intruder = await start_swarm("127.0.0.4", AGENT_FINGERPRINT, forged, "intruder")
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


async def _registered_blob(tmp_path: Path, port: int, keys: Keys, seed: int) -> tuple[metainfo.Metainfo, Path]:
    data = random.Random(seed).randbytes(1 << 20)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seed_dir = tmp_path / f"seed{seed}"
    seed_dir.mkdir()
    (seed_dir / digest.hex).write_bytes(data)
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest,
                                  announce=protocol.ANNOUNCE.url(f"http://127.0.0.1:{port}"),
                                  root_cert=keys.root_cert)
    async with aiohttp.ClientSession() as http:
        r = await http.put(protocol.REGISTER_METAINFO.url(f"http://127.0.0.1:{port}", digest=str(digest)), data=raw,
                           headers={"Authorization": f"Bearer {TOKEN}", protocol.SIGNATURE_HEADER: keys.sign(raw)})
        assert r.status == 201
    return metainfo.parse(raw), seed_dir


async def _seeders(port: int, meta: metainfo.Metainfo) -> int:
    url = protocol.SCRAPE.url(f"http://127.0.0.1:{port}") + f"?info_hash={quote_from_bytes(meta.tracker_hash)}"
    async with aiohttp.ClientSession() as http, http.get(url, headers={"Authorization": f"Bearer {NODE_TOKEN}"}) as r:
        doc = bencode.decode(await r.read())
    assert isinstance(doc, dict)
    files = doc[b"files"]
    assert isinstance(files, dict)
    entry = files.get(meta.tracker_hash, {})
    assert isinstance(entry, dict)
    complete = entry.get(b"complete", 0)
    assert isinstance(complete, int)
    return complete


async def _until_listed(port: int, meta: metainfo.Metainfo, seeds: list[Swarm]) -> None:
    """Until the tracker lists every one of `seeds` as a seeder of `meta` (they announce again
    meanwhile, not at their interval)."""
    async with asyncio.timeout(30):
        while await _seeders(port, meta) < len(seeds):
            for s in seeds:
                job = s.job(meta.digest.hex)
                assert job is not None
                s.force_reannounce(job)
            await asyncio.sleep(0.2)


async def _ok_announces(port: int) -> float:
    async with aiohttp.ClientSession() as http, http.get(protocol.METRICS.url(f"http://127.0.0.1:{port}")) as r:
        text = await r.text()
    return metric_sum(parse_metrics(text), "shoal_tracker_announces_total", result="ok")


async def test_an_expired_certificate_is_refused_and_a_renewed_one_used(tmp_path: Path, tracker: TestServer,
                                                                      keys: Keys) -> None:
    """A certificate is checked when a connection opens: once the seeder's has expired nobody
    can connect to it, and the renewal (what the origin's grant renewal gives) lets new
    connections in again, on the same torrent handle."""
    port = tracker.port
    assert port is not None
    meta, seed_dir = await _registered_blob(tmp_path, port, keys, 9)
    (tmp_path / "leech").mkdir()
    seeder = Swarm(SwarmSettings(listen_ip="127.0.0.2", listen_port=free_port("127.0.0.2"),
                                 fingerprint=SEEDER_FINGERPRINT))
    await seeder.start()
    expires = time.time() + 2
    seeder.set_default_grant(Grant(keys.token("origin"), peercerts.issue_node_certificate(
        keys.key, "origin", seeder.key.public_key, expires, signing.EVERY_BLOB)))
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys, "node-a")
    try:
        seeder.add(meta, seed_dir, seed=True)
        async with asyncio.timeout(10):
            while time.time() < expires + 0.5:
                await asyncio.sleep(0.1)
        job = leecher.add(meta, tmp_path / "leech", seed=False)
        refused_before = seeder.refused_handshakes
        async with asyncio.timeout(20):
            while seeder.refused_handshakes == refused_before:  # the leecher tries, and is refused
                job.handle.connect_peer(("127.0.0.2", seeder.listen_port))
                await job.wait_change(0.5)
        assert job.have_count == 0
        pki.admit(seeder, keys.key, "origin")  # renewed: a fresh certificate on every handle
        async with asyncio.timeout(30):
            while not job.finished.is_set():
                job.handle.connect_peer(("127.0.0.2", seeder.listen_port))
                await job.wait_change(1.0)
        await job.flush()
        assert sha256_file(tmp_path / "leech" / meta.digest.hex) == meta.digest
    finally:
        await leecher.stop()
        await seeder.stop()


async def test_a_grant_admits_to_its_own_blob_only(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    """A node admitted to blob A (its certificate names A, its token is for A) that joins blob B's
    swarm gets no peer from the tracker and is refused by the seeder at the handshake, even
    dialing it directly; given a grant for B, the same handle completes. And a seeder admitted to
    B only is no seeder of A: it serves nobody there."""
    port = tracker.port
    assert port is not None
    meta_a, dir_a = await _registered_blob(tmp_path, port, keys, 10)
    meta_b, dir_b = await _registered_blob(tmp_path, port, keys, 11)
    (tmp_path / "leech").mkdir()
    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys, "origin")
    leecher = Swarm(SwarmSettings(listen_ip="127.0.0.3", listen_port=free_port("127.0.0.3"),
                                  fingerprint=AGENT_FINGERPRINT))
    await leecher.start()
    try:
        seeder.add(meta_b, dir_b, seed=True)
        job = leecher.add(meta_b, tmp_path / "leech", seed=False,
                          grant=pki.grant(leecher, keys.key, "node-a", torrent=meta_a.digest.hex))
        refused_before = seeder.refused_handshakes
        async with asyncio.timeout(20):
            while seeder.refused_handshakes == refused_before:
                leecher.force_reannounce(job)  # refused by the tracker: a token for A
                job.handle.connect_peer(("127.0.0.2", seeder.listen_port))  # refused by the seeder
                await job.wait_change(0.5)
        assert job.have_count == 0 and leecher.tracker_errors >= 1
        leecher.set_grant(meta_b.digest.hex, pki.grant(leecher, keys.key, "node-a", torrent=meta_b.digest.hex))
        async with asyncio.timeout(30):
            while not job.finished.is_set():
                job.handle.connect_peer(("127.0.0.2", seeder.listen_port))
                await job.wait_change(1.0)
        await job.flush()
        assert sha256_file(tmp_path / "leech" / meta_b.digest.hex) == meta_b.digest
        # the other way round: a holder of A admitted to B only serves nobody in A's swarm
        holder = leecher.add(meta_a, dir_a, seed=True,
                             grant=pki.grant(leecher, keys.key, "node-a", torrent=meta_b.digest.hex))
        (tmp_path / "other").mkdir()
        other = await start_swarm("127.0.0.4", AGENT_FINGERPRINT, keys, "node-b")  # admitted to every blob
        try:
            fetch = other.add(meta_a, tmp_path / "other", seed=False)
            refused_before = other.refused_handshakes + leecher.refused_handshakes
            async with asyncio.timeout(20):
                while other.refused_handshakes + leecher.refused_handshakes == refused_before:
                    fetch.handle.connect_peer(("127.0.0.3", leecher.listen_port))
                    await fetch.wait_change(0.5)
            assert fetch.have_count == 0 and holder.finished.is_set()
        finally:
            await other.stop()
    finally:
        await leecher.stop()
        await seeder.stop()


async def test_seeders_announce_at_the_trackers_interval(tmp_path: Path, tracker: TestServer, keys: Keys) -> None:
    """The tracker (interval 2 s) hears from a seeder every interval, not every 300 s (libtorrent's
    own floor, which once let the tracker forget every seeder between its announces)."""
    port = tracker.port
    assert port is not None
    meta, seed_dir = await _registered_blob(tmp_path, port, keys, 7)
    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys, "origin")
    try:
        seeder.add(meta, seed_dir, seed=True)
        async with asyncio.timeout(30):
            while await _ok_announces(port) < 1:
                await asyncio.sleep(0.2)
            first = asyncio.get_running_loop().time()
            # three more announces, each at the interval: about 6 s (bounded by the timeout)
            while await _ok_announces(port) < 4:
                await asyncio.sleep(0.2)
        assert asyncio.get_running_loop().time() - first >= 3 * 2 - 1  # at the interval, not faster
        assert await _seeders(port, meta) == 1
    finally:
        await seeder.stop()


@pytest.mark.slow  # long by nature: run with --slow (CI does)
async def test_a_seeder_is_listed_again_soon_after_a_tracker_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 keys: Keys) -> None:
    """Failed announces are retried on shoal's bounded schedule: after two failures libtorrent
    alone would wait 55 s more (5 + 2^2 x 12.5), and a third, 117 s; shoal retries within 12 s."""
    monkeypatch.setenv("SHOAL_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("SHOAL_TEST_NODE_TOKEN", "node-secret-0123456789abcdef")
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"},
                               "node_token": {"env": "SHOAL_TEST_NODE_TOKEN"},
                               "origin_public_key": str(keys.public_path), "interval": "2s",
                               "min_interval": "1s", "data_dir": str(tmp_path / "tracker")})
    port = free_port()
    server = TestServer(tracker_app.build(cfg), host="127.0.0.1", port=port)
    await server.start_server()
    meta, seed_dir = await _registered_blob(tmp_path, port, keys, 8)
    seeder = await start_swarm("127.0.0.2", SEEDER_FINGERPRINT, keys, "origin")
    try:
        seeder.add(meta, seed_dir, seed=True)
        async with asyncio.timeout(20):
            while await _seeders(port, meta) < 1:
                await asyncio.sleep(0.2)
        await server.close()  # the tracker goes away; its registrations persist in data_dir
        async with asyncio.timeout(40):
            while seeder.tracker_errors < 2:
                await asyncio.sleep(0.2)
        server = TestServer(tracker_app.build(cfg), host="127.0.0.1", port=port)
        await server.start_server()  # back, knowing no peers
        back = asyncio.get_running_loop().time()
        async with asyncio.timeout(announcing.RETRY_MAX):
            while await _seeders(port, meta) < 1:
                await asyncio.sleep(0.2)
        assert asyncio.get_running_loop().time() - back < 10 * (1 + announcing.RETRY_JITTER) + 2
    finally:
        await seeder.stop()
        await server.close()


async def test_a_download_keeps_a_few_peers_and_a_seed_takes_any(tmp_path: Path, tracker: TestServer,
                                                                  keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download connects with `download_connections` peers at most (libtorrent's end game had
    every idle connection ask for blocks others were sending: the more peers, the more bytes
    received twice); the limit goes once the blob is complete, once the download stalls and
    asks for the origin's seeder (which must then find room), and after PEER_LIMIT_SECONDS
    whatever happens (slow peers in its slots would never make it stall)."""
    port = tracker.port
    assert port is not None
    meta, seed_dir = await _registered_blob(tmp_path, port, keys, 31)
    stuck, _ = await _registered_blob(tmp_path, port, keys, 32)  # nobody seeds it
    slow, _ = await _registered_blob(tmp_path, port, keys, 33)  # nor this one
    seeds = [await start_swarm(f"127.0.0.{i}", AGENT_FINGERPRINT, keys, f"node-{i}") for i in (4, 5, 6)]
    leecher = Swarm(SwarmSettings(listen_ip="127.0.0.3", listen_port=free_port("127.0.0.3"),
                                  fingerprint=AGENT_FINGERPRINT, download_connections=2))
    await leecher.start()
    pki.admit(leecher, keys.key, "node-3")
    try:
        for s in seeds:
            s.add(meta, seed_dir, seed=True)
        await _until_listed(port, meta, seeds)
        (tmp_path / "leech").mkdir()
        job = leecher.add(meta, tmp_path / "leech", seed=False)
        assert job.handle.status().connections_limit == 2
        # once complete it takes any peer that comes, and goes to none (RESULTS.md §28)
        assert leecher.session.get_settings()["seeding_outgoing_connections"] is False
        peak = 0
        async with asyncio.timeout(60):
            while not job.finished.is_set():
                peak = max(peak, job.handle.status().num_peers)
                if job.have_count == 0:
                    leecher.force_reannounce(job)
                await job.wait_change(0.2)
        await job.flush()
        assert await asyncio.to_thread(sha256_file, tmp_path / "leech" / meta.digest.hex, meta.digest) == meta.digest
        assert peak <= 2
        # the samples can miss a download that fits between two of them (CI's did): what the
        # seeds uploaded is the sure count of the peers it had
        uploaders = 0
        for s in seeds:
            seeding = s.job(meta.digest.hex)
            assert seeding is not None
            uploaders += seeding.handle.status().total_payload_upload > 0
        assert 1 <= uploaders <= 2
        assert job.handle.status().connections_limit == -1  # a seed now (libtorrent shows no limit as -1)
        waiting = leecher.add(stuck, tmp_path / "leech", seed=False)
        assert waiting.handle.status().connections_limit == 2
        leecher.ask_for_origin(waiting)
        assert waiting.handle.status().connections_limit == -1
        monkeypatch.setattr(swarm_module, "PEER_LIMIT_SECONDS", 1.0)
        timed = leecher.add(slow, tmp_path / "leech", seed=False)
        assert timed.handle.status().connections_limit == 2
        async with asyncio.timeout(15):  # (the limits are looked at every 2 s)
            while timed.handle.status().connections_limit != -1:
                await timed.wait_change(0.2)
    finally:
        await leecher.stop()
        for s in seeds:
            await s.stop()


async def test_a_torrent_connects_to_no_peer_before_its_certificate_is_in_place(
        tmp_path: Path, tracker: TestServer, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """libtorrent starts a torrent (announces, connects) as it is added, and the grant's
    certificate reaches its thread in a later call. Where that call came late (this thread
    waiting for the GIL), a LAN tracker's answer came first: the first connections went out
    with no certificate, every peer refused them, and the download waited for libtorrent's next
    tick (bench/RESULTS.md section 30). Here the call comes late on purpose, with a peer to
    connect to already known: no peer may see a handshake without a certificate."""
    port = tracker.port
    assert port is not None
    meta, seed_dir = await _registered_blob(tmp_path, port, keys, 34)
    seed = await start_swarm("127.0.0.5", AGENT_FINGERPRINT, keys, "node-5")
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys, "node-3")
    present = Swarm._present

    def late(self: Swarm, handle: lt.torrent_handle, grant: Grant) -> None:
        handle.connect_peer(("127.0.0.5", seed.settings.listen_port))
        tried = False
        deadline = time.monotonic() + 5  # until the attempt came and went (or the torrent waits)
        while time.monotonic() < deadline and not handle.status().paused:
            if handle.get_peer_info():
                tried = True
            elif tried:
                break
            time.sleep(0.01)
        present(self, handle, grant)

    try:
        seed.add(meta, seed_dir, seed=True)
        await _until_listed(port, meta, [seed])
        monkeypatch.setattr(Swarm, "_present", late)
        (tmp_path / "leech").mkdir()
        job = leecher.add(meta, tmp_path / "leech", seed=False)
        async with asyncio.timeout(30):
            while not job.finished.is_set():
                if job.have_count == 0:
                    leecher.force_reannounce(job)
                await job.wait_change(0.5)
        await job.flush()
        assert await asyncio.to_thread(sha256_file, tmp_path / "leech" / meta.digest.hex, meta.digest) == meta.digest
        assert seed.refused_handshakes == 0
    finally:
        await leecher.stop()
        await seed.stop()


async def test_a_piece_from_the_first_copy_is_checked_like_a_peers(tmp_path: Path, keys: Keys) -> None:
    """origin/firstcopy.py: the origin's pieces reach the torrent through `add_piece`, unverified
    (a hostile or broken origin, bytes flipped on the way). libtorrent checks them against the
    signed merkle tree as it checks a peer's: a wrong one never becomes a verified piece, and
    the right one does."""
    data = random.Random(8).randbytes(3 * (1 << 20) + 777)
    digest = Digest(hashlib.sha256(data).hexdigest())
    seed_dir, leech_dir = tmp_path / "seed", tmp_path / "leech"
    for d in (seed_dir, leech_dir):
        d.mkdir()
    (seed_dir / digest.hex).write_bytes(data)
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest,
                                  announce="http://127.0.0.1:9/announce", root_cert=keys.root_cert)
    meta = metainfo.parse(raw)
    assert meta.num_pieces >= 2
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys, "node-a")
    try:
        job = leecher.add(meta, leech_dir, seed=False, first_copy=True)
        # (added before libtorrent has checked the new torrent: a piece added then was lost once,
        # with no alert; it is kept until the check is over. Nothing ran on the loop since the add)
        assert not job.checked.is_set()
        piece = data[meta.piece_length:2 * meta.piece_length]
        wrong = bytearray(piece)
        wrong[1000] ^= 1
        job.add_piece(1, bytes(wrong))
        async with asyncio.timeout(30):
            while job.hash_failures == 0:
                await job.wait_change(1.0)
        assert not job.has_piece(1) and job.have_count == 0
        job.add_piece(1, piece)
        async with asyncio.timeout(30):
            while not job.has_piece(1):
                await job.wait_change(1.0)
        assert await job.read_piece(1) == piece
        assert job.have_count == 1 and job.hash_failures == 1
        # its announces ask not to be handed the origin's seeder
        urls = [t["url"] for t in job.handle.trackers()]
        assert urls and all(f"{protocol.ANNOUNCE_FIRST_COPY}=1" in u for u in urls)
    finally:
        await leecher.stop()


async def test_a_first_copy_the_origin_refuses_gives_the_node_back_the_seeder(tmp_path: Path, keys: Keys) -> None:
    """attack (helper-51 #9): a node whose first copy ended early (the origin refused it, 503
    past its bounds, or failed) kept asking the tracker not to be handed the origin's seeder,
    and had neither until it stalled. Now its announces stop asking that."""
    data = random.Random(9).randbytes(1 << 20)
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / digest.hex).write_bytes(data)
    raw = await asyncio.to_thread(metainfo.create, tmp_path / digest.hex, digest,
                                  announce="http://127.0.0.1:9/announce", root_cert=keys.root_cert)
    meta = metainfo.parse(raw)

    async def busy(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"errors": [{"code": "UNAVAILABLE", "message": "busy"}]}, status=503)

    app = aiohttp.web.Application()
    app.router.add_route("GET", protocol.FIRST_COPY.pattern, busy)
    origin = TestServer(app, host="127.0.0.1")
    await origin.start_server()
    leecher = await start_swarm("127.0.0.3", AGENT_FINGERPRINT, keys, "node-a")
    try:
        job = leecher.add(meta, tmp_path / "leech", seed=False, first_copy=True)

        def asking_not_to_get_the_seeder() -> bool:
            return any(f"{protocol.ANNOUNCE_FIRST_COPY}=1" in t["url"] for t in job.handle.trackers())

        assert asking_not_to_get_the_seeder()
        async with aiohttp.ClientSession() as http:
            client = OriginClient(http, str(origin.make_url("")).rstrip("/"), "t" * 32)
            assert await firstcopy.take(job, client, "ticket-1", AgentMetrics(CollectorRegistry())) == 0
        assert not job.first_copy and not asking_not_to_get_the_seeder()
    finally:
        await leecher.stop()
        await origin.close()
