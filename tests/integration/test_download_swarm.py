"""A Download on the swarm path in process, with two real libtorrent sessions (a seeder and this
node's) joined directly: the blob is hashed once per node, however many clients read it, and
neither a blob whose bytes are not its digest (every piece verifies, the whole does not) nor a
piece corrupted on disk after it was verified ever reaches a whole-blob reader as a complete
body or the cache. The steps `_from_swarm` takes are run one by one here, so that a test can
act between them (corrupt the flushed file) and count hashing without the cache in the way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from shoal import errors, metainfo, peercerts
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Swarm, SwarmSettings, TorrentJob
from shoal_agent.config import SwarmPolicy
from shoal_agent.download import Collaborators, Download, WholeHash
from shoal_agent.metrics import AgentMetrics, HashedBy
from shoal_agent.upstreams import Upstream
from tests.support import pki
from tests.support.procs import free_port

DATA = random.Random(16).randbytes(3 * (1 << 20) + 4321)  # 13 pieces of 256 KiB, the last short
DIGEST = Digest(hashlib.sha256(DATA).hexdigest())


@dataclass
class Node:
    download: Download
    job: TorrentJob
    deps: Collaborators
    seeder_port: int = 0  # the seeder's session (start's; 0: none of its own)

    def hashed(self, by: HashedBy) -> float:
        return float(self.deps.metrics.blob_hash_bytes.labels(by)._value.get())

    @property
    def partial(self) -> Path:
        return self.deps.store.downloads_dir / self.download.digest.hex


async def start(tmp_path: Path, digest: Digest) -> AsyncIterator[Node]:
    """DATA seeded under `digest` (its own, or a wrong one), and a Download of it attached to a
    torrent of this node's session that is connected to the seeder."""
    ca = Ed25519PrivateKey.generate()
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / digest.hex).write_bytes(DATA)
    raw = await asyncio.to_thread(metainfo.create, seed_dir / digest.hex, digest,
                                  announce="http://127.0.0.1:9/announce", root_cert=peercerts.ca_certificate(ca))
    meta = metainfo.parse(raw)
    seeder = Swarm(SwarmSettings("127.0.0.20", free_port("127.0.0.20"), SEEDER_FINGERPRINT))
    leecher = Swarm(SwarmSettings("127.0.0.21", free_port("127.0.0.21"), AGENT_FINGERPRINT))
    http = aiohttp.ClientSession()
    store = BlobStore(tmp_path / "cache", max_bytes=64 << 20)
    await store.open()
    try:
        # each of these blocks the loop for a while (a libtorrent session, TLS keys); the yields
        # between them keep any one step short on a busy machine (the loop guard counts steps)
        await seeder.start()
        await asyncio.sleep(0)
        await leecher.start()
        await asyncio.sleep(0)
        pki.admit(seeder, ca, "origin")
        await asyncio.sleep(0)
        pki.admit(leecher, ca, "node-a")
        await asyncio.sleep(0)
        seeder.add(meta, seed_dir, seed=True)
        deps = Collaborators(store=store, metrics=AgentMetrics(CollectorRegistry()), policy=SwarmPolicy(),
                             swarm=leecher)
        up = Upstream("reg", RegistryClient(http, "http://127.0.0.1:9", credentials=None, user_agent="t"))
        download = Download(deps, up, "app", digest, len(DATA), None)
        job = leecher.add(meta, store.downloads_dir, seed=False)
        download.attach(job)
        job.handle.connect_peer(("127.0.0.20", seeder.listen_port))
        yield Node(download, job, deps, seeder.listen_port)
    finally:
        await leecher.stop()
        await seeder.stop()
        await store.close()
        await http.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async for n in start(tmp_path, DIGEST):
        yield n


@pytest.fixture
async def mislabelled(tmp_path: Path) -> AsyncIterator[Node]:
    """Every piece verifies against the torrent, but the blob is not the digest it is named by."""
    async for n in start(tmp_path, Digest(hashlib.sha256(b"something else").hexdigest())):
        yield n


async def read_all(download: Download, into: bytearray | None = None) -> bytes:
    out = bytearray() if into is None else into
    async with asyncio.timeout(60):
        async for chunk in download.stream(0, len(DATA), whole=True):
            out += chunk
    return bytes(out)


async def finish(node: Node) -> None:
    async with asyncio.timeout(60):
        await node.job.finished.wait()
    await node.job.flush()


def window(node: Node, size: int) -> None:
    """How many bytes of pieces the node's one hash keeps for readers behind the first."""
    assert node.download.whole is not None
    node.download.whole = WholeHash(len(DATA), node.download.whole._on_hashed, window=size)


async def test_two_clients_share_one_hash(node: Node) -> None:
    # (readers here are not held back by sockets, so one may run ahead of the other by more
    # than the default window: keep every piece, and count)
    window(node, len(DATA))
    bodies = await asyncio.gather(read_all(node.download), read_all(node.download))
    assert list(bodies) == [DATA, DATA]
    await finish(node)
    await node.download.confirm(node.job, node.partial)
    # one pass over the blob for the node, none of the readers' own, none more for the cache
    assert node.hashed("download") == len(DATA)
    assert node.hashed("reader") == 0


async def test_without_clients_the_file_is_hashed_once(node: Node) -> None:
    await finish(node)
    await node.download.confirm(node.job, node.partial)
    assert node.hashed("download") == len(DATA) and node.hashed("reader") == 0


async def test_a_client_behind_the_others_hashes_on_its_own(node: Node) -> None:
    window(node, 0)
    assert await read_all(node.download) == DATA
    assert await read_all(node.download) == DATA  # the first pieces are long gone from the window
    await finish(node)
    await node.download.confirm(node.job, node.partial)
    assert node.hashed("download") == len(DATA)
    assert node.hashed("reader") == len(DATA)


async def test_a_blob_that_is_not_its_digest_never_goes_out_whole(mislabelled: Node) -> None:
    node = mislabelled
    got = [bytearray(), bytearray()]
    results = await asyncio.gather(*(read_all(node.download, g) for g in got), return_exceptions=True)
    assert all(isinstance(r, errors.IntegrityError) for r in results)
    for g in got:
        assert 0 < len(g) < len(DATA) and bytes(g) == DATA[: len(g)]
    await finish(node)
    with pytest.raises(errors.IntegrityError):
        await node.download.confirm(node.job, node.partial)
    assert node.hashed("download") == len(DATA)


@pytest.mark.parametrize("clients", [0, 1])
async def test_a_piece_corrupted_on_disk_is_caught(node: Node, clients: int) -> None:
    """Flipped after libtorrent verified and flushed it, before anyone read it: the pieces are
    then read from the file, and the one hash over them is what catches it."""
    await finish(node)
    bad = 2 * node.job.meta.piece_length + 7
    with open(node.partial, "r+b") as f:
        f.seek(bad)
        f.write(bytes([DATA[bad] ^ 0xFF]))
    if clients:
        got = bytearray()
        with pytest.raises(errors.IntegrityError):
            await read_all(node.download, got)
        assert len(got) < len(DATA)
    with pytest.raises(errors.IntegrityError):
        await node.download.confirm(node.job, node.partial)


async def test_the_cache_waits_for_a_client_in_step_rather_than_hash_ahead_of_it(node: Node) -> None:
    """A client part-way through when the last piece lands: the download lets it go on feeding
    the one hash instead of hashing the rest from the file (which would leave the client to
    hash it again on its own)."""
    got = bytearray()
    async with contextlib.aclosing(node.download.stream(0, len(DATA), whole=True)) as chunks:
        for _ in range(3):
            got += await anext(chunks)
        await finish(node)
        confirm = asyncio.create_task(node.download.confirm(node.job, node.partial))
        async for chunk in chunks:
            got += chunk
        await confirm
    assert bytes(got) == DATA
    assert node.hashed("download") == len(DATA) and node.hashed("reader") == 0


async def test_a_client_that_stops_reading_is_left_behind(node: Node) -> None:
    """Waiting for a client in step is bounded: one that reads nothing for stall_timeout no
    longer holds the blob out of the cache; when it reads again it hashes the rest itself."""
    node.download.deps = dataclasses.replace(node.deps, policy=SwarmPolicy(stall_timeout=0.5))
    got = bytearray()
    async with contextlib.aclosing(node.download.stream(0, len(DATA), whole=True)) as chunks:
        for _ in range(2):
            got += await anext(chunks)
        await finish(node)
        async with asyncio.timeout(30):
            await node.download.confirm(node.job, node.partial)
        async for chunk in chunks:
            got += chunk
    assert bytes(got) == DATA
    assert node.hashed("download") == len(DATA)
    assert node.hashed("reader") == len(DATA) - 2 * node.job.meta.piece_length
