"""Load: 64 concurrent clients on cold and then cached content (zero errors, every body hashed,
agent memory bounded), and a tracker under sustained announce load that stays correct."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

import aiohttp
import pytest

from shoal import bencode, metainfo, peercerts, protocol, signing
from shoal.oci import Digest
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.images import Blob, build_image
from tests.support.procs import Component, proc_stats
from tests.support.stack import Stack

CLIENTS = 64
LOAD_SECONDS = 12.0
# RSS the agent must stay under while serving 64 clients. It holds a chunk or two per streamed
# client; cached blobs go out with sendfile. The benchmark's target was 150 MB (measured 113-127
# MiB, bench/RESULTS.md); since the origin relays a cold blob's head start (origin/relay.py) the
# clients of such a blob read its file each on their own, and this test's cold peak measured
# 135 MB without relays and 141-147 MB with them (64 KiB reads), its spread about 8 MB: 160 MB.
RSS_LIMIT = 160_000_000


def rss(component: Component) -> int:
    assert component.proc is not None
    return proc_stats(component.proc.pid)[0]


async def hammer(agent: Component, targets: list[tuple[str, str]], seconds: float) -> tuple[int, list[str], int]:
    """CLIENTS tasks requesting (path, digest) pairs at random for `seconds`; returns (requests,
    errors, peak agent RSS)."""
    errors: list[str] = []
    done = 0
    peak = 0
    deadline = time.monotonic() + seconds
    rng = random.Random(3)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            path, digest = rng.choice(targets)
            headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"} if "/manifests/" in path else {}
            try:
                async with session.get(f"{agent.url}{path}", headers=headers) as resp:
                    h = hashlib.sha256()
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        h.update(chunk)
                    if resp.status != 200:
                        errors.append(f"{path}: {resp.status}")
                    elif "sha256:" + h.hexdigest() != digest:
                        errors.append(f"{path}: wrong bytes")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{path}: {type(exc).__name__}")
            done += 1

    async def watch() -> None:
        nonlocal peak
        while time.monotonic() < deadline:
            peak = max(peak, rss(agent))
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(watch(), *(client(session) for _ in range(CLIENTS)))
    return done, errors, peak


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_64_clients_cold_then_cached(stack: Stack, images: Images) -> None:
    apps = [images.app(), images.multi(),
            images.get("private/evict-a", layers=[30 << 20, 5 << 20, 100_000], seed=21)]
    targets: list[tuple[str, str]] = []
    for image, repo in zip(apps, ("private/app", "private/multi", "private/evict-a"), strict=True):
        targets += [(f"/v2/{repo}/blobs/{b.digest}", b.digest) for b in image.blobs.values()]
        if not image.platforms:
            targets.append((f"/v2/{repo}/manifests/{image.digest}", image.digest))
    stack.start(agents=1)
    agent = stack.agents[0]
    before = rss(agent)
    # cold: every blob is uncached when the 64 clients start (shared downloads, streaming)
    cold_requests, cold_errors, cold_peak = asyncio.run(hammer(agent, targets, LOAD_SECONDS / 2))
    # cached: everything is on disk now
    warm_requests, warm_errors, warm_peak = asyncio.run(hammer(agent, targets, LOAD_SECONDS / 2))
    assert cold_errors == []
    assert warm_errors == []
    assert cold_requests >= CLIENTS
    assert warm_requests >= CLIENTS
    assert agent.running()
    blobs = {d for _, d in targets if "/blobs/" in _}
    assert agent.metric("shoal_agent_downloads_total", result="ok") == len(blobs)  # each fetched once
    assert max(cold_peak, warm_peak) < RSS_LIMIT, (before, cold_peak, warm_peak)
    print(f"\nload: {cold_requests} cold + {warm_requests} cached requests by {CLIENTS} clients; "
          f"agent RSS {before >> 20} MiB at start, peak {max(cold_peak, warm_peak) >> 20} MiB")


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_tracker_under_sustained_announce_load(stack: Stack, tmp_path: Path) -> None:
    # 500 emulated peers announce from one address: lift the per-address cap for them
    tracker = stack.start_tracker(log={"level": "info"}, max_peers_per_address=1000)
    origin = stack.start_origin()
    # a real registered torrent (signed by the origin), made from a small test blob
    image = build_image(tmp_path / "img", tag="v1", layer_sizes=[300_000], seed=51)
    blob: Blob = next(b for b in image.blobs.values() if b.size > 100_000)
    (tmp_path / "seedblob").mkdir()
    data = blob.path.read_bytes()
    (tmp_path / "seedblob" / blob.hex).write_bytes(data)

    key = signing.load_private_key(str(stack.keys["signing_key"]), "signing_key")
    raw = metainfo.create(tmp_path / "seedblob" / blob.hex, Digest(blob.hex),
                          announce=protocol.ANNOUNCE.url(tracker.url), root_cert=peercerts.ca_certificate(key))
    signature = signing.sign_metainfo(key, raw)
    token_value = stack.token_file.read_text()
    meta = metainfo.parse(raw)
    swarm_token = signing.issue_token(key, "loadgen", 600, signing.EVERY_BLOB)
    seeders, leechers = 100, 400

    async def run() -> tuple[int, float, list[str]]:
        problems: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
            r = await http.put(protocol.REGISTER_METAINFO.url(tracker.url, digest=blob.digest), data=raw,
                               headers={"Authorization": f"Bearer {token_value}", protocol.SIGNATURE_HEADER: signature})
            assert r.status == 201
            ih = quote_from_bytes(meta.tracker_hash)
            count = 0
            started = time.monotonic()
            deadline = started + 8

            async def peer_loop(n: int) -> None:
                nonlocal count
                port = 20000 + n
                left = 0 if n < seeders else 1000
                pid = quote_from_bytes(b"-LD0001-" + n.to_bytes(12, "big"))
                while time.monotonic() < deadline:
                    query = (f"info_hash={ih}&peer_id={pid}&port={port}&uploaded=0&downloaded=0&left={left}"
                             f"&compact=1&numwant=50&token={swarm_token}")
                    async with http.get(protocol.ANNOUNCE.url(tracker.url) + f"?{query}") as resp:
                        doc = bencode.decode(await resp.read())
                    count += 1
                    if not isinstance(doc, dict) or b"failure reason" in doc:
                        problems.append(repr(doc)[:200])
                        return
                    peers = doc[b"peers"]
                    assert isinstance(peers, bytes)
                    if len(peers) % 6 or len(peers) // 6 > 50:
                        problems.append(f"bad peer list of {len(peers)} bytes")
                    if left and peers:  # a leecher sees seeders first
                        first_port = int.from_bytes(peers[4:6], "big")
                        if first_port - 20000 >= seeders:
                            problems.append("a leecher was not given a seeder first")

            await asyncio.gather(*(peer_loop(n) for n in range(seeders + leechers)))
            elapsed = time.monotonic() - started
            r = await http.get(protocol.SCRAPE.url(tracker.url) + f"?info_hash={ih}",
                               headers={"Authorization": f"Bearer {stack.node_token}"})
            scrape = bencode.decode(await r.read())
        assert isinstance(scrape, dict)
        files = scrape[b"files"]
        assert isinstance(files, dict)
        stats = files[meta.tracker_hash]
        assert stats == {b"complete": seeders, b"downloaded": 0, b"incomplete": leechers}
        return count, elapsed, problems

    count, elapsed, problems = asyncio.run(run())
    assert problems == []
    assert count > seeders + leechers
    assert tracker.running()
    assert rss(tracker) < 200 << 20
    assert api.status(tracker.url)["peers"] == seeders + leechers
    assert origin.running()
    print(f"\ntracker: {count} announces in {elapsed:.1f}s ({count / elapsed:.0f}/s) from {seeders + leechers} peers")
