"""In-memory peer store with expiry: who is in which swarm, seeders first, the requester's zone
first (tracker/zones.py states the policy; tracker/redisstore.py keeps the same one in Redis)."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal_tracker import zones


@dataclass(slots=True)
class Peer:
    ip: str
    port: int
    peer_id: bytes
    left: int
    last_seen: float
    zone: str = ""  # the zone the peer announced ("" for none: the origin's seeders)
    node: str = ""  # the node its swarm token names (a zone's gateway slots are per node)
    origin: bool = False  # an origin's seeder (its swarm token admits it to every blob)
    stalled: bool = False  # this announce asks for the origins' seeders (protocol.ANNOUNCE_STALLED)
    # this announce asks not to be handed them (protocol.ANNOUNCE_FIRST_COPY; `stalled` wins)
    first_copy: bool = False

    @property
    def is_seeder(self) -> bool:
        return self.left == 0


Key = tuple[str, int]

# A leecher is not handed the origins' seeders once its swarm has this many seeders of its own
# that announced within the last third of the default peer expiry (about one interval: a node
# that missed an announce does not count; TrackerConfig.spare_window). In a rolling update every
# wave got about a quarter of its bytes from the origin's seeder (it is one more peer with a
# full link): 4.25 copies of the blob over four waves of four hosts, where the first wave's
# hosts could serve the rest alone (bench/RESULTS.md section 19). Two nodes (by their swarm
# tokens), so that one node gone without a word (it stays listed until it expires), or one
# lying about having the blob, does not leave a joiner without a source. The origin keeps
# seeding: the peers that already have it keep it, a swarm whose own seeders leave is handed it
# again; while the swarm can spare it, it is handed no leechers either (it would connect to them).
ORIGIN_SPARE = 2
SPARE_SCAN = 64


@dataclass(slots=True)
class SwarmPeers:
    """One swarm's seeders and leechers, kept apart so an answer samples each group without
    scanning it (a scan and shuffle of 5,000 peers took milliseconds per announce)."""

    seeders: dict[Key, Peer] = field(default_factory=dict)
    leechers: dict[Key, Peer] = field(default_factory=dict)
    downloaded: int = 0
    by_address: dict[str, dict[Key, None]] = field(default_factory=dict)  # each address's keys, oldest first
    # each zone's gateways (tracker/zones.py): node name -> the key it last announced from
    gateways: dict[str, dict[str, Key]] = field(default_factory=dict)
    zoned: int = 0  # peers with a zone (none: every answer takes the sampling shortcut)
    origins: dict[Key, None] = field(default_factory=dict)  # the origins' seeders among them
    # the seeders on the boundary as of their last announce, latest last (Redis's :bs, by score):
    # ORIGIN_SPARE looks at the latest of these in both stores
    boundary: dict[Key, None] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seeders) + len(self.leechers)

    def get(self, key: Key) -> Peer | None:
        return self.seeders.get(key) or self.leechers.get(key)

    def put(self, key: Key, peer: Peer) -> None:
        previous = self.get(key)
        if previous is not None and previous.zone != peer.zone:
            self.remove(key)  # a node that moved zones is no gateway of its old one
            previous = None
        mine, other = (self.seeders, self.leechers) if peer.is_seeder else (self.leechers, self.seeders)
        other.pop(key, None)
        mine[key] = peer
        self.by_address.setdefault(key[0], {})[key] = None
        if peer.origin and peer.is_seeder:
            self.origins[key] = None
        else:
            self.origins.pop(key, None)
        if previous is None and peer.zone:
            self.zoned += 1

    def is_gateway(self, peer: Peer) -> bool:
        return peer.node in self.gateways.get(peer.zone, {})

    def on_boundary(self, key: Key, peer: Peer) -> bool:
        """A peer other zones may reach: one without a zone, or a gateway of its zone."""
        return not peer.zone or self.is_gateway(peer)

    def remove(self, key: Key) -> None:
        gone = self.get(key)
        if gone is not None and gone.zone:
            self.zoned -= 1
            gateways = self.gateways.get(gone.zone)
            if gateways is not None and gateways.get(gone.node) == key:
                del gateways[gone.node]
                if not gateways:
                    del self.gateways[gone.zone]
        self.seeders.pop(key, None)
        self.leechers.pop(key, None)
        self.origins.pop(key, None)
        self.boundary.pop(key, None)
        keys = self.by_address.get(key[0])
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self.by_address[key[0]]

    def counts(self) -> tuple[int, int]:
        return len(self.seeders), len(self.leechers)

    def spared(self, since: float, spare: int, requester: Key, node: str) -> bool:
        """Whether the origins' seeders can be left out of a leecher's answer: the swarm has
        seeders of its own on `spare` (ORIGIN_SPARE) nodes, on the boundary (every seeder where no node
        states a zone; else those a gateway may be handed: a zone whose gateways left has seeders
        no other zone can reach), heard from since `since`. Nodes, not entries: one node
        announcing "seeder" from several ports must not hide the origin from a swarm. At most
        the SPARE_SCAN latest to announce of the boundary's fresh seeders are looked at, as in
        Redis (an announce stays O(1) in a swarm of thousands); not finding enough hands the
        origin out, the safe side. Only seeders the requester can use count: not its own node's
        (an agent restarted with an empty cache leaves its old entry listed), and only those of
        its address family (it announced over IPv4: IPv6 seeders may be out of its reach)."""
        if not self.origins or spare <= 0:
            return False
        v6 = ":" in requester[0]
        nodes: set[str] = set()
        for key in itertools.islice(reversed(self.boundary), SPARE_SCAN):
            peer = self.seeders.get(key)
            if peer is None:
                continue
            if peer.last_seen < since:
                break  # latest first: the rest are older still
            if key not in self.origins and peer.node != node and (":" in key[0]) == v6:
                nodes.add(peer.node)
                if len(nodes) >= spare:
                    return True
        return False


class PeerStore:
    """Peers are keyed by the source address of their announce (never by a claimed `ip=`),
    so one host cannot remove or impersonate another's entry; and one address holds at most
    `max_per_address` entries of a swarm (5,000 announces from one host with as many ports filled
    a swarm with fake peers, and a fresh agent fell back to the registry)."""

    def __init__(self, *, ttl: float, max_peers: int, max_per_address: int = 8,
                 zone_gateways: int = zones.ZONE_GATEWAYS, origin_spare: int = ORIGIN_SPARE,
                 spare_window: float | None = None) -> None:
        self.ttl = ttl
        # how recently a seeder announced to count toward origin_spare (TrackerConfig.spare_window)
        self.spare_window = ttl / 3 if spare_window is None else spare_window
        self.max_peers = max_peers
        self.max_per_address = max_per_address
        self.zone_gateways = zone_gateways
        self.origin_spare = origin_spare
        self._swarms: dict[bytes, SwarmPeers] = {}

    def announce(self, info_hash: bytes, peer: Peer, event: str) -> SwarmPeers:
        swarm = self._swarms.setdefault(info_hash, SwarmPeers())
        key = (peer.ip, peer.port)
        if event == "stopped":
            swarm.remove(key)
            return swarm
        previous = swarm.get(key)
        if event == "completed" and (previous is None or not previous.is_seeder):
            swarm.downloaded += 1
        same_address = swarm.by_address.get(peer.ip, {})
        if previous is None and len(same_address) >= self.max_per_address:
            swarm.remove(next(iter(same_address)))  # the address's oldest entry makes room (a restart's new port)
        if previous is None and len(swarm) >= self.max_peers:
            self._expire_swarm(swarm, time.monotonic())
            if len(swarm) >= self.max_peers:
                return swarm  # full: the announcer still gets peers, but is not listed
        swarm.put(key, peer)
        if peer.zone:
            self._elect(swarm, key, peer, time.monotonic())
        swarm.boundary.pop(key, None)  # to the end: latest last
        if peer.is_seeder and swarm.on_boundary(key, peer):
            swarm.boundary[key] = None
        return swarm

    def _elect(self, swarm: SwarmPeers, key: Key, peer: Peer, now: float) -> None:
        """A gateway stays one while it announces; a leecher becomes one while its zone has
        fewer live ones than `zone_gateways`, one slot per node (tracker/zones.py)."""
        gateways = swarm.gateways.setdefault(peer.zone, {})
        if peer.node in gateways:
            gateways[peer.node] = key
            return
        if peer.is_seeder:
            return
        live = 0
        for k in gateways.values():
            p = swarm.get(k)
            live += p is not None and now - p.last_seen <= self.ttl
        if live < self.zone_gateways:
            gateways[peer.node] = key

    def select(self, info_hash: bytes, requester: tuple[str, int], *, want: int, seeder: bool,
               zone: str = "", node: str = "", origin: bool = False, stalled: bool = False,
               first_copy: bool = False) -> list[Peer]:
        """Up to `want` peers other than the requester: seeders first (a seeder gets only
        leechers, it needs nothing from other seeders); random order within each group; zones
        as tracker/zones.py says; in a swarm that can spare the origins' seeders (ORIGIN_SPARE),
        not those to a leecher, and no leecher to them (a seeder connects to the leechers it is
        handed: in a rolling update the origin's periodic announce had it serve the second wave,
        a half copy of the blob, though the tracker handed it to none of them). A `stalled`
        leecher gets them first, whatever the swarm and its zone have (protocol.ANNOUNCE_STALLED:
        they may be many, or all in its zone, and lying); a `first_copy` leecher that has not
        stalled gets them in no swarm (protocol.ANNOUNCE_FIRST_COPY)."""
        swarm = self._swarms.get(info_hash)
        if swarm is None:
            return []
        now = time.monotonic()
        if stalled and not seeder:
            origins = {k: p for k in swarm.origins if (p := swarm.seeders.get(k)) is not None}
            first = self._fill([origins], requester, want, now, None, None)
            return first + self._select(swarm, requester, want - len(first), now, seeder=False, zone=zone,
                                        node=node, skip=swarm.origins,
                                        reserved=min(zones.reserved(want), want - len(first)))
        spared = (first_copy and not seeder) or \
            ((not seeder or origin) and swarm.spared(now - self.spare_window, self.origin_spare, requester, node))
        if spared and origin:
            return []
        return self._select(swarm, requester, want, now, seeder=seeder, zone=zone, node=node,
                            skip=swarm.origins if spared else None)

    def _select(self, swarm: SwarmPeers, requester: Key, want: int, now: float, *, seeder: bool, zone: str,
                node: str, skip: dict[Key, None] | None, reserved: int | None = None) -> list[Peer]:
        groups = [swarm.leechers] if seeder else [swarm.seeders, swarm.leechers]
        if not zone:
            if not swarm.zoned:
                return self._fill(groups, requester, want, now, None, skip)
            return self._fill(groups, requester, want, now, lambda k, p: swarm.on_boundary(k, p), skip)
        chosen: set[Key] = set()

        def across(k: Key, p: Peer) -> bool:
            return p.zone != zone and swarm.on_boundary(k, p) and k not in chosen

        gateway = node in swarm.gateways.get(zone, {})
        # a gateway's first places go to the boundary's seeders: its zone's own peers could fill
        # the answer and leave it no way across
        places = zones.reserved(want) if reserved is None else reserved
        first = self._fill([swarm.seeders], requester, places, now, across, skip) \
            if gateway and not seeder else []
        chosen.update((p.ip, p.port) for p in first)
        local = self._fill(groups, requester, want - len(first), now, lambda k, p: p.zone == zone, skip)
        if local and not gateway:
            return local
        return first + local + self._fill(groups, requester, want - len(first) - len(local), now, across, skip)

    def _fill(self, groups: list[dict[Key, Peer]], requester: Key, want: int, now: float,
              keep: Callable[[Key, Peer], bool] | None, skip: dict[Key, None] | None) -> list[Peer]:
        chosen: list[Peer] = []
        for group in groups:
            chosen += self._sample(group, requester, want - len(chosen), now, keep, skip)
        return chosen

    def _sample(self, group: dict[Key, Peer], requester: Key, want: int, now: float,
                keep: Callable[[Key, Peer], bool] | None = None, skip: dict[Key, None] | None = None) -> list[Peer]:
        if want <= 0 or not group:
            return []
        skip = skip or {}

        def usable(p: Peer) -> bool:
            key = (p.ip, p.port)
            return key != requester and key not in skip and now - p.last_seen <= self.ttl

        if keep is not None:
            # a zone's share: filtered by a scan (the sampling shortcut below cannot filter)
            live = [p for k, p in group.items() if keep(k, p) and usable(p)]
            return random.sample(live, min(len(live), want))
        values = list(group.values())
        # +1: the requester may be in it; and the skipped (a few origins' seeders)
        sample = random.sample(values, min(len(values), want + 1 + len(skip)))
        live = [p for p in sample if usable(p)]
        if len(live) < min(want, len(sample) - len(skip)) and len(values) > len(sample):
            # stale peers in the sample (the expiry loop has not run yet): scan this once
            live = [p for p in values if usable(p)]
            random.shuffle(live)
        return live[:want]

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
            if not len(swarm) and not swarm.downloaded:
                del self._swarms[info_hash]
        return removed

    def _expire_swarm(self, swarm: SwarmPeers, now: float) -> int:
        stale = [k for group in (swarm.seeders, swarm.leechers) for k, p in group.items()
                 if now - p.last_seen > self.ttl]
        for k in stale:
            swarm.remove(k)
        return len(stale)

    def forget(self, info_hash: bytes) -> None:
        self._swarms.pop(info_hash, None)

    @property
    def peer_count(self) -> int:
        return sum(len(s) for s in self._swarms.values())

    @property
    def swarm_count(self) -> int:
        return len(self._swarms)
