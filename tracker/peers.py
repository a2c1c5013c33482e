"""In-memory peer store with expiry: who is in which swarm, seeders first."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Peer:
    ip: str
    port: int
    peer_id: bytes
    left: int
    last_seen: float

    @property
    def is_seeder(self) -> bool:
        return self.left == 0


@dataclass(slots=True)
class SwarmPeers:
    peers: dict[tuple[str, int], Peer] = field(default_factory=dict)
    downloaded: int = 0

    def counts(self) -> tuple[int, int]:
        seeders = sum(1 for p in self.peers.values() if p.is_seeder)
        return seeders, len(self.peers) - seeders


class PeerStore:
    """Peers are keyed by the source address of their announce (never by a claimed `ip=`),
    so one host cannot remove or impersonate another's entry."""

    def __init__(self, *, ttl: float, max_peers: int) -> None:
        self.ttl = ttl
        self.max_peers = max_peers
        self._swarms: dict[bytes, SwarmPeers] = {}

    def announce(self, info_hash: bytes, peer: Peer, event: str) -> SwarmPeers:
        swarm = self._swarms.setdefault(info_hash, SwarmPeers())
        key = (peer.ip, peer.port)
        if event == "stopped":
            swarm.peers.pop(key, None)
            return swarm
        previous = swarm.peers.get(key)
        if event == "completed" and (previous is None or not previous.is_seeder):
            swarm.downloaded += 1
        if previous is None and len(swarm.peers) >= self.max_peers:
            self._expire_swarm(swarm, time.monotonic())
            if len(swarm.peers) >= self.max_peers:
                return swarm  # full: the announcer still gets peers, but is not listed
        swarm.peers[key] = peer
        return swarm

    def select(self, info_hash: bytes, requester: tuple[str, int], *, want: int, seeder: bool) -> list[Peer]:
        """Up to `want` peers other than the requester: seeders first (a seeder gets only
        leechers, it needs nothing from other seeders); random order within each group."""
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            return []
        now = time.monotonic()
        seeders: list[Peer] = []
        leechers: list[Peer] = []
        for key, p in swarm.peers.items():
            if key == requester or now - p.last_seen > self.ttl:
                continue
            (seeders if p.is_seeder else leechers).append(p)
        random.shuffle(seeders)
        random.shuffle(leechers)
        ordered = leechers if seeder else seeders + leechers
        return ordered[:want]

    def stats(self, info_hash: bytes) -> tuple[int, int, int]:
        """(complete, incomplete, downloaded) for scrape and announce answers."""
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            return 0, 0, 0
        seeders, leechers = swarm.counts()
        return seeders, leechers, swarm.downloaded

    def expire(self) -> int:
        now = time.monotonic()
        removed = 0
        for info_hash in list(self._swarms):
            swarm = self._swarms[info_hash]
            removed += self._expire_swarm(swarm, now)
            if not swarm.peers and not swarm.downloaded:
                del self._swarms[info_hash]
        return removed

    def _expire_swarm(self, swarm: SwarmPeers, now: float) -> int:
        stale = [k for k, p in swarm.peers.items() if now - p.last_seen > self.ttl]
        for k in stale:
            del swarm.peers[k]
        return len(stale)

    def forget(self, info_hash: bytes) -> None:
        self._swarms.pop(info_hash, None)

    @property
    def peer_count(self) -> int:
        return sum(len(s.peers) for s in self._swarms.values())

    @property
    def swarm_count(self) -> int:
        return len(self._swarms)
