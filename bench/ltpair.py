"""libtorrent's own ceiling here: one seeder and one downloader, two sessions configured exactly
as shoal's (shoal.swarm, pread storage, the seeder added as shoal adds a verified blob), joined
directly on loopback with no agent, tracker or HTTP around them. What the uncapped swarm is
compared against to tell libtorrent's cost per byte from the agent's."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import metainfo, peercerts
from shoal.oci import Digest
from shoal.swarm import AGENT_FINGERPRINT, SEEDER_FINGERPRINT, Swarm, SwarmSettings
from tests.support import pki
from tests.support.clients import sha256_path
from tests.support.procs import free_port

TIMEOUT = 300.0


@dataclass
class PairResult:
    blob_bytes: int
    seconds: float
    bytes_per_second: float
    cpu_seconds_per_gib: float  # both sessions: sending, receiving, hashing, writing


async def _transfer(blob: Path, digest: Digest, work: Path) -> tuple[float, float]:
    ca = Ed25519PrivateKey.generate()
    meta = metainfo.parse(metainfo.create(blob, digest, announce="http://127.0.0.1:9/announce",
                                          root_cert=peercerts.ca_certificate(ca)))
    seeder = Swarm(SwarmSettings("127.0.0.20", free_port("127.0.0.20"), SEEDER_FINGERPRINT))
    leecher = Swarm(SwarmSettings("127.0.0.21", free_port("127.0.0.21"), AGENT_FINGERPRINT))
    await seeder.start()
    await leecher.start()
    pki.admit(seeder, ca, "seeder")
    pki.admit(leecher, ca, "leecher")
    try:
        seeder.add(meta, blob.parent, seed=True)
        job = leecher.add(meta, work, seed=False)
        cpu, started = os.times(), time.monotonic()
        job.handle.connect_peer(("127.0.0.20", seeder.listen_port))
        await asyncio.wait_for(job.finished.wait(), TIMEOUT)
        seconds = time.monotonic() - started
        after = os.times()
        await job.flush()
        return seconds, (after.user - cpu.user) + (after.system - cpu.system)
    finally:
        await leecher.stop()
        await seeder.stop()


def run(work: Path, *, blob: Path, digest: str) -> PairResult:
    """`blob` is a verified blob file named by its digest hex."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    d = Digest.parse(digest)
    seconds, cpu = asyncio.run(_transfer(blob, d, work))
    size = blob.stat().st_size
    received = work / d.hex
    if "sha256:" + sha256_path(received) != digest:
        raise RuntimeError(f"{received} does not hash to {digest}")
    shutil.rmtree(work, ignore_errors=True)
    return PairResult(size, round(seconds, 3), size / seconds, round(cpu / (size / (1 << 30)), 3))
