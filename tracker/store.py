"""Where the tracker keeps its state: the seams, and the embedded (one process) implementation.

`Swarms` holds who is in which swarm; `Torrents` the metainfo the origin registered. In one
process they live in memory (tracker/peers.py, tracker/torrents.py: the `shoal up` default);
with `redis` configured they live in Redis (tracker/redisstore.py), so any number of tracker
replicas answer for any swarm and a replica lost loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shoal.metainfo import Metainfo
from shoal.oci import Digest
from shoal_tracker.peers import Peer, PeerStore
from shoal_tracker.torrents import TorrentRegistry


class StoreUnavailable(Exception):
    """The shared store did not answer (in time); the message names no secret."""


@dataclass(frozen=True, slots=True)
class Answer:
    peers: list[tuple[str, int, bytes]]  # (ip, port, peer id)
    complete: int
    incomplete: int


@dataclass(frozen=True, slots=True)
class Totals:
    swarms: int  # swarms with at least one live peer
    peers: int
    unseeded: int  # registered torrents no live seeder announces
    expired: int  # peers removed by this sweep


class Swarms(Protocol):
    async def announce(self, info_hash: bytes, peer: Peer, event: str, *, want: int) -> Answer | None:
        """Record the announce and answer it; None when the torrent is not registered (any
        more: an unregistration may race the announce)."""

    async def stats(self, hashes: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        """(complete, incomplete, downloaded) of each swarm."""

    async def forget(self, info_hash: bytes) -> None: ...

    async def sweep(self, registered: list[bytes]) -> Totals:
        """Drop expired peers and count what is left."""

    async def close(self) -> None: ...


class Torrents(Protocol):
    async def load(self, verify: Callable[[bytes, str], None]) -> None: ...

    async def register(self, meta: Metainfo, signature: str) -> None: ...

    async def unregister(self, digest: Digest) -> bytes | None:
        """The unregistered torrent's tracker hash, or None if it was not registered."""

    async def digest_hex(self, info_hash: bytes) -> str | None:
        """The digest (hex) of the registered torrent with this tracker hash."""

    async def hashes(self) -> list[bytes]: ...

    async def count(self) -> int: ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""


class MemorySwarms:
    def __init__(self, store: PeerStore) -> None:
        self.store = store

    async def announce(self, info_hash: bytes, peer: Peer, event: str, *, want: int) -> Answer:
        self.store.announce(info_hash, peer, event)
        chosen = [] if event == "stopped" else self.store.select(
            info_hash, (peer.ip, peer.port), want=want, seeder=peer.is_seeder, zone=peer.zone,
            node=peer.node, origin=peer.origin and peer.is_seeder, stalled=peer.stalled,
            first_copy=peer.first_copy)
        complete, incomplete, _ = self.store.stats(info_hash)
        return Answer([(p.ip, p.port, p.peer_id) for p in chosen], complete, incomplete)

    async def stats(self, hashes: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
        return {h: self.store.stats(h) for h in hashes}

    async def forget(self, info_hash: bytes) -> None:
        self.store.forget(info_hash)

    async def sweep(self, registered: list[bytes]) -> Totals:
        expired = self.store.expire()
        unseeded = sum(1 for h in registered if not self.store.stats(h)[0])
        return Totals(self.store.swarm_count, self.store.peer_count, unseeded, expired)

    async def close(self) -> None:
        return None


class MemoryTorrents:
    def __init__(self, registry: TorrentRegistry) -> None:
        self.registry = registry

    async def load(self, verify: Callable[[bytes, str], None]) -> None:
        await asyncio.to_thread(self.registry.load, verify)

    async def register(self, meta: Metainfo, signature: str) -> None:
        await asyncio.to_thread(self.registry.register, meta, signature)

    async def unregister(self, digest: Digest) -> bytes | None:
        meta = await asyncio.to_thread(self.registry.unregister, digest)
        return None if meta is None else meta.tracker_hash

    async def digest_hex(self, info_hash: bytes) -> str | None:
        meta = self.registry.by_hash(info_hash)
        return None if meta is None else meta.digest.hex

    async def hashes(self) -> list[bytes]:
        return self.registry.hashes()

    async def count(self) -> int:
        return len(self.registry)

    async def ping(self) -> None:
        return None

