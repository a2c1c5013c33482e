"""The libtorrent session, pumped into asyncio.

Rules this module keeps (facts of libtorrent 2.1.1's Python bindings, checked here):
- every libtorrent call happens on the event-loop thread;
- alerts arrive through `set_alert_fd` on a non-blocking socketpair (never `set_alert_notify`,
  which deadlocks from Python); their data is copied out before the next `pop_alerts`;
- torrents are added without `auto_managed`, so no queueing limit ever parks one;
- the session is tuned for a datacenter swarm: TCP only (uTP crawls on fast links), no DHT,
  LSD, UPnP or NAT-PMP (peers come only from our tracker; torrents are private anyway), and
  rate limits apply to local peers too (libtorrent exempts them by default);
- every torrent is an SSL torrent (shoal.peercerts): the session listens for TLS only, and each
  torrent presents the certificate of its `Grant` (a node is admitted blob by blob; the origin
  holds one grant for every torrent), set on its handle (libtorrent has no session-wide one)
  when the torrent is added and again at every renewal; it announces with the grant's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import libtorrent as lt

from shoal import announcing, errors, netaddr, peercerts, protocol
from shoal.config import TorrentSettings, split_hostport
from shoal.metainfo import Metainfo
from shoal.slowpeers import PeerSample, SlowPeerGuard

log = logging.getLogger(__name__)

# Peer-id prefixes (Azureus style). The origin seeder's prefix lets agents tell bytes that came
# from the seeder from bytes that came from other nodes.
AGENT_FINGERPRINT = "-SA0100-"
SEEDER_FINGERPRINT = "-SO0100-"

# libtorrent's errors::announce_skipped ("skipping tracker announce (unreachable)"): with a
# listen address per interface (torrent.listen [::] or 0.0.0.0) libtorrent announces only from
# those that can reach the tracker (its family, not loopback or link-local to a global address)
# and reports each of the others with this error. Not a tracker that cannot be reached.
ANNOUNCE_SKIPPED = 180

_ALERT_MASK = (
    lt.alert_category.error
    | lt.alert_category.status
    | lt.alert_category.storage
    | lt.alert_category.piece_progress
    | lt.alert_category.tracker
    | lt.alert_category.peer
    | lt.alert_category.connect
)
# Per-peer byte accounting is refreshed at most this often while pieces arrive.
PEER_POLL_INTERVAL = 0.5
# The origin seeder uploads to a few peers at a time, in turn (round robin: a turn ends once the
# peer has had 4 pieces and a minute has passed), instead of to every interested peer at once.
# Each piece it sends should leave it about once: every peer asks it for the rarest pieces, and
# the rarest are the ones only the seeder has
# (including those on their way to another peer), so 16 peers served at once got 2.2-2.9 copies
# of every piece through its link, and its link is what a cold rollout waits on. Four in turn:
# 1.5-1.7 copies and 27 s instead of 43 s for 16 nodes at 5 MB/s (bench/RESULTS.md §17).
# Four at least, and one per swarm being downloaded: libtorrent's slots are the session's, and an
# origin serving many swarms at once (a soak's two nodes pulling a dozen blobs each) had every
# peer wait for turns behind peers of other swarms, with which it shares no piece (3 MB blobs took
# up to 11 s on loopback, p99 7 s, and a download that got no piece for 10 s fell back to the
# registry). So the session's slots are recounted every second from the swarms that have
# leechers connected (Swarm._balance_slots), and no swarm takes more than four. Not four per
# swarm: a 4-layer rollout's four swarms then shared 16 slots and the seeder sent 2.65 copies
# instead of 2.45 (bench/RESULTS.md §20); one slot is enough to put each piece into a swarm
# once, whose peers then trade it.
# Operators can still override these with torrent.libtorrent (a fixed unchoke_slots_limit too).
SEEDER_SLOTS = 4  # at least, and at most per swarm
# At most this many in all: an unchoked peer that does not read holds up to send_buffer_watermark
# (1 MiB) of the origin's memory, and a node can join as many swarms as it is admitted to.
SEEDER_MAX_SLOTS = 64
SEEDER_CHOKING: dict[str, int] = {
    "unchoke_slots_limit": SEEDER_SLOTS,
    "seed_choking_algorithm": 0,  # round_robin
    "unchoke_interval": 3,
    "seeding_piece_quota": 4,
    # one, however many slots: libtorrent's default (a fifth of the slots) would let a rollout's
    # swarm have 12 more peers on the seeder at 64 slots (optimistic unchokes skip max_uploads)
    "num_optimistic_unchoke_slots": 1,
}

SLOTS_RECOUNT = 1.0  # seconds; the choker runs every unchoke_interval (3 s)
SLOTS_RECHECK = 10  # every tenth recount asks the swarms counted directly
GUARD_EVERY = 5  # recounts between two looks at the seeder's unchoked peers (shoal/slowpeers.py)
# libtorrent's top piece priority, for the one piece a local client is blocked on (TorrentJob.want).
HEAD_PIECE_PRIORITY = 7
# libtorrent's own "no limit" for a torrent's connections (its Python binding refuses 0 and -1)
NO_CONNECTION_LIMIT = (1 << 24) - 1
# A download connects with SwarmSettings.download_connections peers for this long at most: peers
# that send a piece every few seconds hold its slots without ever stalling it (a 1 MiB blob from
# two peers at 24 KiB/s took 23 s instead of 2 with another peer there, outside the slots), and
# libtorrent turns no peer over below 6 connections. Longer than the rollouts of section 27.
PEER_LIMIT_SECONDS = 30.0
# Time given at shutdown for "stopped" announces to reach the tracker.
STOP_GRACE = 0.3
# How long libtorrent may take to open its listen sockets at start (it takes milliseconds).
LISTEN_WAIT = 10.0
# A TLS connection closed in the last seconds may still be closing (libtorrent waits about 2.7 s
# for a peer's close_notify); the session's destructor would wait for it holding the GIL, so
# the event loop stood still at shutdown. Stop waits for those instead, with the loop running.
TLS_CLOSE_GRACE = 3.0


def seeder_slots(leechers: Iterable[int]) -> int:
    """The origin's upload slots for swarms with these numbers of leechers connected."""
    return min(max(SEEDER_SLOTS, sum(1 for n in leechers if n > 0)), SEEDER_MAX_SLOTS)


@dataclass(frozen=True, slots=True)
class SwarmSettings:
    listen_ip: str
    listen_port: int
    fingerprint: str
    upload_rate_limit: int = 0
    download_rate_limit: int = 0
    allow_multiple_connections_per_ip: bool = False
    # Peers per torrent while it downloads (0: no limit; see Swarm.add)
    download_connections: int = 0
    # Any libtorrent settings_pack names; libtorrent rejects unknown names (KeyError).
    extra: dict[str, Any] = field(default_factory=dict)
    # The zone this node states in its announces (tracker/zones.py); "" for none.
    zone: str = ""
    # Spreads nodes over a torrent's tracker replicas: each node starts at its own place in the
    # list (a hash of this, e.g. its name) and moves on from there when one fails.
    tracker_order: str = ""

    @classmethod
    def from_config(cls, torrent: TorrentSettings, fingerprint: str, *, zone: str = "",
                    tracker_order: str = "") -> SwarmSettings:
        host, port = split_hostport(torrent.listen)
        return cls(listen_ip=host, listen_port=port, fingerprint=fingerprint,
                   upload_rate_limit=torrent.upload_rate_limit, download_rate_limit=torrent.download_rate_limit,
                   allow_multiple_connections_per_ip=torrent.allow_multiple_connections_per_ip,
                   download_connections=torrent.download_connections, extra=torrent.libtorrent,
                   zone=zone, tracker_order=tracker_order)

    def trackers(self, meta: Metainfo, token: str | None, *, stalled: bool = False,
                 first_copy: bool = False) -> list[str]:
        """The torrent's tracker URLs as this node announces to them: with its swarm token and
        zone (and, for a stalled download, asking for the origins' seeders; for one taking its
        share of the first copy from the origin, not), starting at this node's place in the list."""
        extra = ([f"token={quote(token, safe='')}"] if token is not None else []) + \
            ([f"zone={quote(self.zone, safe='')}"] if self.zone else []) + \
            ([f"{protocol.ANNOUNCE_STALLED}=1"] if stalled else []) + \
            ([f"{protocol.ANNOUNCE_FIRST_COPY}=1"] if first_copy and not stalled else [])
        urls = list(meta.trackers or (meta.announce,))
        start = int.from_bytes(hashlib.sha256(self.tracker_order.encode()).digest()[:4], "big") % len(urls)
        urls = urls[start:] + urls[:start]
        if not extra:
            return urls
        return [f"{u}{'&' if '?' in u else '?'}{'&'.join(extra)}" for u in urls]

    def _unspecified(self) -> bool:
        return ipaddress.ip_address(self.listen_ip).is_unspecified

    def listen_interfaces(self) -> str:
        """libtorrent's listen_interfaces: the one address; for [::] both families (dual stack, as
        the HTTP listeners: libtorrent itself would take [::] as every IPv6 address only)."""
        port = self.listen_port
        if self._unspecified() and ":" in self.listen_ip:
            return f"0.0.0.0:{port}s,[::]:{port}s"
        host = f"[{self.listen_ip}]" if ":" in self.listen_ip else self.listen_ip
        return f"{host}:{port}s"

    def pack(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            # "s": a TLS socket. Only SSL torrents exist, so there is no plain one: a BitTorrent
            # handshake in clear gets a TLS alert, never a piece.
            "listen_interfaces": self.listen_interfaces(),
            # libtorrent tries the next 10 ports when the configured one is taken, then one the
            # system picks: the node would run on a port its configuration does not name (and
            # firewalls would not open). Fail instead (Swarm.start).
            "max_retry_port_bind": 0,
            "listen_system_port_fallback": False,
            # a specific address: peers see the node there; unspecified: the route decides
            "outgoing_interfaces": "" if self._unspecified() else self.listen_ip,
            "peer_fingerprint": self.fingerprint,
            "user_agent": "shoal/0.1",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,
            "alert_mask": int(_ALERT_MASK),
            "alert_queue_size": 20000,
            # A torrent's trackers are replicas sharing one store, each in a tier of its own (in
            # this node's order): announce to the first tier that answers, and to the next only
            # when it fails. (With them in one tier and announce_to_all_trackers off, every
            # announce still reached every replica: no replica took load off another.)
            "announce_to_all_trackers": False,
            "announce_to_all_tiers": False,
            "allow_multiple_connections_per_ip": self.allow_multiple_connections_per_ip,
            "connections_limit": 1000,
            # Every node uploads to every interested peer: there is no one to free-ride on.
            "unchoke_slots_limit": -1,
            "seed_choking_algorithm": 1,  # fastest_upload
            "upload_rate_limit": self.upload_rate_limit,
            "download_rate_limit": self.download_rate_limit,
            # Announce timing is the tracker's (shoal.announcing): its interval, not
            # libtorrent's 300 s floor; bounded announce time. Operators cannot override these.
            **announcing.libtorrent_settings(),
            # Shutdown waits this long for "stopped" announces; keep restarts quick.
            "stop_tracker_timeout": 1,
            "peer_connect_timeout": 3,
            "request_timeout": 10,
            "piece_timeout": 5,
            "inactivity_timeout": 60,
            "min_reconnect_time": 1,
            "max_failcount": 5,
            # Per peer: 8 MiB buffers made no faster swarm on loopback than 1 MiB but took a
            # seeding agent's peak RSS from about 140 to 119 MiB (bench/RESULTS.md).
            "send_buffer_watermark": 1 << 20,
            "send_buffer_low_watermark": 256 << 10,
            "send_buffer_watermark_factor": 50,
            "max_queued_disk_bytes": 16 << 20,
            "file_pool_size": 500,
        }
        # A node that completes a blob waits for peers to come to it. Connecting out, every node
        # finishing a rollout opened TLS connections to every other: to seeds that dropped them
        # at once (both complete), and to downloaders that refused them after the handshake
        # (full at download_connections). At N = 32 that was 950 outgoing and 1,450 incoming
        # handshakes on two cores, just as the last nodes were hashing their blobs: 3.7-4.2x
        # S/B, against 3.15x without them (bench/RESULTS.md §28). Nodes reach each other
        # directly (no NAT between them), and downloaders connect out. The origin's seeder too:
        # the tracker hands it to the leechers that should use it (a stalled one, one that does
        # not take its share of the first copy over HTTP), and it must not dial the others it is
        # handed (origin/firstcopy.py).
        settings["seeding_outgoing_connections"] = False
        if self.fingerprint == SEEDER_FINGERPRINT:
            settings.update(SEEDER_CHOKING)
            # Its IP filter holds the peers it bans (shoal/slowpeers.py), which must not cut it
            # off from a tracker at the same address (`shoal up` runs everything on one).
            settings["apply_ip_filter_to_trackers"] = False
        settings.update({k: v for k, v in self.extra.items()
                         if k not in announcing.RESERVED_SETTINGS and k not in peercerts.RESERVED_SETTINGS})
        return settings


@dataclass(frozen=True, slots=True)
class Grant:
    """What a node needs in a blob's swarm (the origin: in every swarm): an origin-signed token to
    announce with, and a certificate for the session's key to present to peers. Both name the
    blob (or `*`) and expire together."""

    token: str = field(repr=False)
    certificate: str


@dataclass(slots=True)
class PeerBytes:
    """Payload bytes received per kind of peer (origin seeder vs other nodes)."""

    from_seeders: int = 0
    from_agents: int = 0


class TorrentJob:
    """One torrent in the session and what the event loop knows about it."""

    def __init__(self, swarm: Swarm, handle: lt.torrent_handle, meta: Metainfo, *, complete: bool) -> None:
        self.swarm = swarm
        self.handle = handle
        self.meta = meta
        self.grant: Grant | None = None  # its own, else the session's default (Swarm.set_default_grant)
        self.stalled = False  # its announces ask for the origins' seeders (Swarm.ask_for_origin)
        # it takes its share of the first copy from the origin (origin/firstcopy.py): until it
        # stalls, its announces ask not to be handed the origins' seeders
        self.first_copy = False
        # A piece added before libtorrent has checked a new torrent (its resume data, its file)
        # was lost once in a test, with no alert: neither verified nor failed (the check sets up
        # the torrent's piece picker after the add had used one). Such a piece waits here.
        self.checked = asyncio.Event()
        self._unchecked: dict[int, bytes] = {}
        # While it connects with few peers (SwarmSettings.download_connections): until when
        self.limited_until: float | None = None
        # Trackers (their URLs without the query: the token changes at renewals) whose last
        # announce got no answer at all (a refusal is not this)
        self.unreachable_trackers: set[str] = set()
        self.tracker_count = 1
        # Listen addresses libtorrent would not announce from (ANNOUNCE_SKIPPED)
        self.skipped_endpoints: set[tuple[str, int]] = set()
        self.have = bytearray([1 if complete else 0]) * meta.num_pieces
        self.have_count = meta.num_pieces if complete else 0
        self.finished = asyncio.Event()
        if complete:
            self.finished.set()
        self.failed: str | None = None
        self.hash_failures = 0
        self.last_progress = time.monotonic()
        self.peer_bytes = PeerBytes()
        self._peer_totals: dict[tuple[str, int], tuple[bool, int]] = {}
        self._last_poll = 0.0
        self._wanted: set[int] = set()
        self._changed = asyncio.Event()
        # Called on every change (piece, finish, failure), e.g. to wake readers elsewhere.
        self.listeners: list[Callable[[], None]] = []
        self._reads: dict[int, asyncio.Future[bytes]] = {}
        self._flush_waiter: asyncio.Future[None] | None = None
        self._move_waiter: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.meta.digest.hex

    def has_piece(self, index: int) -> bool:
        return bool(self.have[index])

    async def wait_change(self, within: float) -> None:
        """Wait until a piece lands, the torrent finishes or fails, or `within` seconds pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self.listeners:
            listener()

    def want(self, index: int) -> None:
        """A local client is blocked on this piece: ask libtorrent for it first.

        Only the head piece, and by priority, not deadline. A window of in-order deadlines put
        every node on the same pieces, leaving peers nothing to trade (a 4-node rollout took
        1.6x longer than rarest-first); even one deadline switches libtorrent to its
        time-critical requests, which cut one seeder-to-node transfer on loopback from 137 to
        55 MB/s. Top priority keeps normal request pipelining, and without any hint a client
        could wait for most of the blob before its first byte (bench/RESULTS.md)."""
        if not self.have[index] and index not in self._wanted:
            self._wanted.add(index)
            self.handle.piece_priority(index, HEAD_PIECE_PRIORITY)

    def add_piece(self, index: int, data: bytes) -> None:
        """Piece `index` from elsewhere than a peer (the origin's first copy): libtorrent checks
        it against the signed merkle tree as it does a peer's, and drops it if it does not match
        (a hash_failed_alert; it never becomes a verified piece)."""
        if not 0 <= index < len(self.have) or self.have[index]:
            return
        if self.checked.is_set():
            self.handle.add_piece(index, data, 0)
        else:
            self._unchecked[index] = data

    def _on_checked(self) -> None:
        self.checked.set()
        pending, self._unchecked = self._unchecked, {}
        for index, data in pending.items():
            self.add_piece(index, data)

    async def read_piece(self, index: int) -> bytes:
        """The verified bytes of a piece this torrent has."""
        if not self.have[index]:
            raise ValueError(f"piece {index} is not verified yet")
        fut = self._reads.get(index)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._reads[index] = fut
            self.handle.read_piece(index)
        return await asyncio.shield(fut)

    async def flush(self) -> None:
        """Wait until libtorrent has written every downloaded byte to the file.

        With the pread backend, `save_resume_data(flush_disk_cache)` does not wait for the
        store buffer (right after it the file was sometimes not even created); `flush_cache`
        and its `cache_flushed_alert` do (0 bad files in 100 runs here)."""
        self._flush_waiter = asyncio.get_running_loop().create_future()
        self.handle.flush_cache()
        await self._flush_waiter

    async def move_to(self, directory: Path) -> None:
        """Have libtorrent rename the file into `directory` (seeding continues)."""
        self._move_waiter = asyncio.get_running_loop().create_future()
        self.handle.move_storage(str(directory), lt.move_flags_t.always_replace_files)
        await self._move_waiter

    def poll_peers(self) -> int:
        """Account payload bytes per peer kind from libtorrent's per-peer counters: the bytes
        sampled (from peers connected now, or before).

        Called as pieces arrive (at most every PEER_POLL_INTERVAL) and at the end; the total
        is libtorrent's payload count, the split between seeder and nodes an estimate."""
        for peer in self.handle.get_peer_info():
            pid = peer.pid.to_bytes()[:8].decode("latin-1")
            is_seeder = pid == SEEDER_FINGERPRINT
            ip, port = peer.ip
            self._peer_totals[(ip, port)] = (is_seeder, int(peer.total_download))
        seeders = agents = 0
        for is_seeder, total in self._peer_totals.values():
            if is_seeder:
                seeders += total
            else:
                agents += total
        # Bytes from peers that disconnected since the last sample (finished nodes drop each
        # other, and the seeder drops a node that completes) are split like the sampled ones.
        sampled = seeders + agents
        missed = int(self.handle.status().total_payload_download) - sampled
        if missed > 0 and sampled > 0:
            extra = missed * seeders // sampled
            seeders, agents = seeders + extra, agents + missed - extra
        self.peer_bytes = PeerBytes(seeders, agents)
        return sampled

    # ----- alert handlers (called by Swarm on the loop thread) ---------------------------------

    def _on_piece(self, index: int) -> None:
        if 0 <= index < len(self.have) and not self.have[index]:
            self._wanted.discard(index)
            self.have[index] = 1
            self.have_count += 1
            self.last_progress = time.monotonic()
            # get_peer_info is a blocking round trip to libtorrent's network thread: not for
            # every one of a thousand pieces (the last poll comes with "finished")
            # A poll that saw no byte from a peer does not count: a first-copy piece from the
            # origin can come before any peer sent one, and a download that then finished within
            # the interval (both ends seeds, disconnected) had no sample to split its bytes by.
            if self.last_progress - self._last_poll >= PEER_POLL_INTERVAL and self.poll_peers():
                self._last_poll = self.last_progress
            self._notify()

    def _on_hash_failed(self, index: int) -> None:
        self.hash_failures += 1
        self._wanted.discard(index)  # a client still waiting asks for it again

    def _on_read(self, index: int, data: bytes, error: str | None) -> None:
        fut = self._reads.pop(index, None)
        if fut is None or fut.done():
            return
        if error:
            fut.set_exception(errors.SwarmUnavailable(f"reading piece {index}: {error}"))
        else:
            fut.set_result(data)

    def _on_finished(self) -> None:
        if not self.finished.is_set():
            self.poll_peers()
            self.finished.set()
            self._notify()

    def _on_error(self, message: str) -> None:
        self.failed = message
        for waiter in (self._flush_waiter, self._move_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(errors.SwarmUnavailable(message))
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(errors.SwarmUnavailable(message))
        self._reads.clear()
        self._notify()

    @property
    def tracker_unreachable(self) -> bool:
        """No tracker of the torrent could be reached at its last try: no peers can be found."""
        return len(self.unreachable_trackers) >= self.tracker_count

    def _on_flushed(self) -> None:
        waiter = self._flush_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_moved(self, error: str | None) -> None:
        waiter = self._move_waiter
        if waiter is not None and not waiter.done():
            if error:
                waiter.set_exception(errors.SwarmUnavailable(f"move failed: {error}"))
            else:
                waiter.set_result(None)


class Swarm:
    """A libtorrent session owned by one component."""

    def __init__(self, settings: SwarmSettings, key: peercerts.NodeKey | None = None) -> None:
        self.settings = settings
        # this node's key for the swarm's TLS; its certificates come with its grants
        self.key = key or peercerts.NodeKey.generate()
        self._default: Grant | None = None
        self._session: lt.session | None = None
        self._jobs: dict[str, TorrentJob] = {}
        self._removals: dict[str, asyncio.Future[None]] = {}
        self._rsock: socket.socket | None = None
        self._wsock: socket.socket | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {}
        self.banned_peers = 0
        self.refused_handshakes = 0
        self.hash_failures = 0
        self.tracker_errors = 0
        self.on_tracker_error: Callable[[str, str], None] | None = None
        self._tcp_listeners: set[tuple[str, int]] = set()  # libtorrent's TLS listen sockets
        self._listen_failures: list[str] = []  # why a configured listen socket could not be opened
        self._had_torrents = False
        self._last_disconnect = -TLS_CLOSE_GRACE
        self._stats_waiters: list[asyncio.Future[None]] = []
        # the origin's seeder: leechers connected per swarm, and the upload slots they add up to
        self._leechers: dict[lt.torrent_handle, int] = {}
        # and of those swarms, the ones with peers unchoked (where a peer can hold a slot)
        self._unchoking: set[lt.torrent_handle] = set()
        self._slots_task: asyncio.Task[None] | None = None
        self._seeder = settings.fingerprint == SEEDER_FINGERPRINT
        self._balanced = self._seeder and "unchoke_slots_limit" not in settings.extra
        # peers that hold a slot of the seeder and do not read are dropped (a fixed limit too)
        self.slow_peers = SlowPeerGuard(spare=[settings.listen_ip]) if self._seeder else None
        self._banned: list[str] = []
        self._waste_seen = 0  # the session's ses.waste_piece_seed at the last look
        self._upload_limit = 0  # bytes a second, 0 for none (set at start)
        # None where they are not balanced (an agent's session, or a limit an operator fixed)
        self.unchoke_slots: int | None = SEEDER_SLOTS if self._balanced else None

    @property
    def upload_limit(self) -> int:
        """The session's upload limit, bytes a second (0: none), torrent.libtorrent's included."""
        return self._upload_limit

    @property
    def banned_addresses(self) -> list[str]:
        """Addresses the seeder's session refuses now (shoal/slowpeers.py)."""
        return self._banned

    @property
    def session(self) -> lt.session:
        if self._session is None:
            raise RuntimeError("swarm not started")
        return self._session

    async def start(self) -> None:
        pack = self.settings.pack()
        # the seeder's upload limit, torrent.libtorrent's included (nothing changes it later)
        self._upload_limit = int(pack.get("upload_rate_limit", 0))
        params = lt.session_params(cast("lt.settings_pack", pack))
        # pread/pwrite storage: page cache is not charged to the process as with mmap, and
        # reads of a flushed file see exactly what was verified.
        params.disk_io_constructor = "pread_disk_io_constructor"
        ses = lt.session(params)
        # Make the global rate limits apply to every peer, including those on the local network.
        everyone = lt.ip_filter()
        global_class = 1 << lt.session.global_peer_class_id
        everyone.add_rule("0.0.0.0", "255.255.255.255", global_class)  # noqa: S104 (a filter, not a bind)
        everyone.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", global_class)
        ses.set_peer_class_filter(everyone)
        self._session = ses
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._rsock, self._wsock = r, w
        asyncio.get_running_loop().add_reader(r.fileno(), self._drain)
        ses.set_alert_fd(w.fileno())
        await self._listening()
        self._stats_task = asyncio.create_task(self._poll_stats())
        if self._seeder:
            self._slots_task = asyncio.create_task(self._balance_slots())
        log.info("swarm listening on %s:%d", self.settings.listen_ip, self.settings.listen_port)

    async def _listening(self) -> None:
        """Wait until libtorrent opened (or failed to open) each configured TCP listen socket;
        ConfigError naming torrent.listen when one failed, so a node never runs on a port other
        than its configuration's, or on none."""
        expected = self.settings.listen_interfaces().count(",") + 1
        deadline = time.monotonic() + LISTEN_WAIT
        while len(self._tcp_listeners) + len(self._listen_failures) < expected and time.monotonic() < deadline:
            self._drain()  # (alerts posted before set_alert_fd would not wake the reader)
            await asyncio.sleep(0.02)
        if self._listen_failures:
            await self.stop()
            raise errors.ConfigError(f"torrent.listen: {self._listen_failures[0]}: choose a free port")
        if not self._tcp_listeners:
            await self.stop()
            raise errors.ConfigError(f"torrent.listen: libtorrent did not listen on {self.settings.listen_ip}:"
                                     f"{self.settings.listen_port} within {LISTEN_WAIT:g}s")

    def _skipped_only(self, alert: lt.tracker_error_alert) -> bool:
        """An announce libtorrent skipped from one listen address while others remain that may
        reach the tracker: nothing failed. Once every listen address was skipped, the tracker
        is out of reach (another address family only, say) and this is an error like any other."""
        if alert.error.value() != ANNOUNCE_SKIPPED or alert.error.category().name() != "libtorrent":
            return False
        job = self._jobs.get(alert.torrent_name)
        if job is None:
            return len(self._tcp_listeners) > 1
        endpoint = alert.local_endpoint
        job.skipped_endpoints.add((str(endpoint[0]), int(endpoint[1])))
        log.debug("announce skipped: %s", alert.message())
        return len(job.skipped_endpoints) < len(self._tcp_listeners)

    async def stop(self) -> None:
        for task in (self._stats_task, self._slots_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is None:
            return
        ses = self._session
        ses.pause()  # every connection starts closing now, while the loop runs
        # Remove every torrent first: libtorrent sends the "stopped" announces while the loop
        # still runs. The destructor would otherwise send them itself and wait for the tracker
        # holding the GIL, which stalls the event loop.
        loop = asyncio.get_running_loop()
        waits = []
        for name, job in list(self._jobs.items()):
            fut: asyncio.Future[None] = loop.create_future()
            self._removals[name] = fut
            waits.append(fut)
            job._on_error("swarm stopping")
            ses.remove_torrent(job.handle)
        self._jobs.clear()
        if waits:
            await asyncio.wait(waits, timeout=2)
        if self._had_torrents:
            # Let the "stopped" announces complete; the destructor would wait for any still in
            # flight (up to stop_tracker_timeout) without releasing the GIL.
            await asyncio.sleep(STOP_GRACE)
        self._removals.clear()
        closing = self._last_disconnect + TLS_CLOSE_GRACE - time.monotonic()
        if closing > 0:
            await asyncio.sleep(closing)
        ses.apply_settings({"stop_tracker_timeout": 0})
        if self._rsock is not None:
            loop.remove_reader(self._rsock.fileno())
        ses.set_alert_fd(-1)
        self._session = None
        del ses
        for s in (self._rsock, self._wsock):
            if s is not None:
                s.close()

    @property
    def listen_port(self) -> int:
        return int(self.session.ssl_listen_port())

    def job(self, name: str) -> TorrentJob | None:
        return self._jobs.get(name)

    def jobs(self) -> list[TorrentJob]:
        return list(self._jobs.values())

    def add(self, meta: Metainfo, save_path: Path, *, seed: bool, grant: Grant | None = None,
            first_copy: bool = False) -> TorrentJob:
        """Add a torrent: `seed` for a file at save_path/<hex> whose sha256 the caller verified.
        It takes part with `grant` (else the default grant), and talks to no one without one.

        A seed is added with every piece marked had and verified, not in seed mode: seed mode
        hashes each piece again the first time a peer asks for it, which on loopback cost 40 %
        of a transfer's CPU and 30 % of its speed (180 -> 250 MB/s, bench/RESULTS.md). Bytes
        that rot on disk later are still caught: every receiver checks each piece against the
        signed merkle tree (and bans the sender), and the cache's stat stamps and scrubber evict
        the file."""
        name = meta.digest.hex
        existing = self._jobs.get(name)
        if existing is not None:
            return existing
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(meta.raw)
        atp.save_path = str(save_path)
        used = grant or self._default
        atp.trackers = self.settings.trackers(meta, used.token if used is not None else None,
                                              first_copy=first_copy and not seed)
        atp.tracker_tiers = list(range(len(atp.trackers)))
        # Assigning flags replaces the defaults, dropping auto_managed. Paused until the grant's
        # certificate is in place (below): libtorrent announces as soon as a torrent starts, and
        # the certificate is set by a later call on its network thread. A tracker on the LAN
        # answered first often enough: up to 3 of 16 hosts a run of a rolling update made their
        # first connections with no certificate, the peers refused them ("certificate
        # required"), and libtorrent tried again only at its next tick: 0.3-0.5 s before the
        # first piece instead of 0.03-0.05 (bench/RESULTS.md section 30).
        atp.flags = lt.torrent_flags.override_trackers
        if used is not None:
            atp.flags |= lt.torrent_flags.paused
        if self._seeder:
            # its state updates (_balance_slots), and the bans of peers that hold a slot and do
            # not read (shoal/slowpeers.py)
            atp.flags |= lt.torrent_flags.update_subscribe | lt.torrent_flags.apply_ip_filter
        if self._balanced:
            atp.max_uploads = SEEDER_SLOTS  # and no swarm takes more than four
        if seed:
            atp.have_pieces = [True] * meta.num_pieces
            atp.verified_pieces = [True] * meta.num_pieces
        limited = not seed and not self._seeder and self.settings.download_connections > 0
        if limited:
            # A few peers per download, not every node in the swarm. libtorrent's end game (no
            # piece left unrequested: each idle connection asks for a block another peer is
            # already sending) made every node of a 16-node create receive 1.23-1.36x the image,
            # with as many connections as nodes; with 4, 1.02-1.05x, and the last node done
            # about 25 % sooner (bench/RESULTS.md section 27). Lifted once the blob is complete
            # (a seed takes whoever asks) or the download stalls (ask_for_origin), and after
            # PEER_LIMIT_SECONDS whatever it does.
            atp.max_connections = self.settings.download_connections
        handle = self.session.add_torrent(atp)
        if used is not None:
            self._present(handle, used)
            handle.resume()  # after the certificate: both are queued, in order, on libtorrent's thread
        job = TorrentJob(self, handle, meta, complete=seed)
        job.first_copy = first_copy and not seed
        if limited:
            job.limited_until = time.monotonic() + PEER_LIMIT_SECONDS
        job.grant = grant
        self._jobs[name] = job
        self._had_torrents = True
        return job

    async def remove(self, name: str, *, delete_files: bool = False) -> None:
        job = self._jobs.pop(name, None)
        if job is None or self._session is None:
            return
        self._leechers.pop(job.handle, None)
        self._unchoking.discard(job.handle)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._removals[name] = fut
        job._on_error("torrent removed")
        self._session.remove_torrent(job.handle, lt.session.delete_files if delete_files else 0)
        try:
            await asyncio.wait_for(asyncio.shield(fut), 10)
        except TimeoutError:
            log.warning("libtorrent did not confirm removal of %s", name)
        finally:
            self._removals.pop(name, None)

    def set_grant(self, name: str, grant: Grant) -> None:
        """Take part in torrent `name` with `grant` from now on (a renewal, or the first grant of a
        torrent added without one). Live connections stay up: libtorrent checks a certificate
        only at the handshake."""
        job = self._jobs.get(name)
        if job is not None:
            first = job.grant is None and self._default is None
            job.grant = grant
            self._use(job, grant, announce=first)

    def set_default_grant(self, grant: Grant) -> None:
        """The grant of every torrent that has none of its own (the origin's, for every blob)."""
        first = self._default is None
        self._default = grant
        for job in self._jobs.values():
            if job.grant is None:
                self._use(job, grant, announce=first)

    def ask_for_origin(self, job: TorrentJob) -> None:
        """A download that got no piece for a while: its announces ask for the origins' seeders
        from now on (protocol.ANNOUNCE_STALLED; the seeders its swarm has may be unreachable, or
        lying), and one goes out at once."""
        if job.stalled:
            return
        job.stalled = True
        self._lift_peer_limit(job)  # the origin's seeder must find room
        grant = job.grant or self._default
        if grant is not None:  # (without one it talks to no one; the grant's trackers will ask)
            self._trackers(job, grant)
            self.force_reannounce(job)

    def stop_first_copy(self, job: TorrentJob) -> None:
        """A download whose first copy ended early (the origin refused or failed it): its
        announces no longer ask not to be handed the origins' seeders, and one goes out now."""
        if not job.first_copy or job.finished.is_set() or not job.handle.is_valid():
            return
        job.first_copy = False
        grant = job.grant or self._default
        if grant is not None:
            self._trackers(job, grant)
            self.force_reannounce(job)

    @staticmethod
    def _lift_peer_limit(job: TorrentJob) -> None:
        if job.limited_until is not None:
            job.limited_until = None
            job.handle.set_max_connections(NO_CONNECTION_LIMIT)

    def _use(self, job: TorrentJob, grant: Grant, *, announce: bool) -> None:
        self._present(job.handle, grant)
        self._trackers(job, grant)
        if announce:
            self.force_reannounce(job)

    def _trackers(self, job: TorrentJob, grant: Grant) -> None:
        entries = []
        for tier, url in enumerate(self.settings.trackers(job.meta, grant.token, stalled=job.stalled,
                                                          first_copy=job.first_copy)):
            entry = lt.announce_entry(url)
            entry.tier = tier
            entries.append(entry)
        job.handle.replace_trackers(entries)

    def _present(self, handle: lt.torrent_handle, grant: Grant) -> None:
        handle.set_ssl_certificate_buffer(grant.certificate, self.key.private_pem, peercerts.DH_PARAMS)

    @staticmethod
    def _tracker_index(trackers: list[Any], url: str) -> int:
        for i, entry in enumerate(trackers):
            if entry["url"] == url:
                return i
        return -1

    def force_reannounce(self, job: TorrentJob) -> None:
        job.handle.force_reannounce(0, -1, lt.reannounce_flags_t.ignore_min_interval)

    # ----- alerts ---------------------------------------------------------------------------------

    def _drain(self) -> None:
        assert self._rsock is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._rsock.recv(4096):
                pass
        if self._session is None:
            return
        for alert in self._session.pop_alerts():
            try:
                self._dispatch(alert)
            except Exception:
                log.exception("error handling libtorrent alert %s", type(alert).__name__)

    def _dispatch(self, alert: lt.alert) -> None:
        if isinstance(alert, lt.session_stats_alert):
            self.stats = {k: int(v) for k, v in alert.values.items()}
            waiters, self._stats_waiters = self._stats_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return
        if isinstance(alert, lt.state_update_alert) and self._seeder:
            # torrents whose status changed since the last post_torrent_updates (every second
            # while they upload, and once more when they stop)
            self._count_leechers(alert.status)
            return
        if isinstance(alert, lt.torrent_removed_alert):
            fut = self._removals.get(alert.torrent_name)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if isinstance(alert, lt.peer_disconnected_alert):
            self._last_disconnect = time.monotonic()
        if isinstance(alert, lt.peer_error_alert) and alert.op == lt.operation_t.ssl_handshake:
            # someone without a valid certificate (or a node whose certificate expired)
            self.refused_handshakes += 1
            log.debug("refused a peer's TLS handshake: %s", alert.message())
            return
        if isinstance(alert, lt.peer_ban_alert):
            self.banned_peers += 1
            log.warning("banned peer: %s", alert.message())
            return
        if isinstance(alert, lt.listen_succeeded_alert):
            if alert.socket_type in (lt.socket_type_t.tcp, lt.socket_type_t.tcp_ssl):
                self._tcp_listeners.add((str(alert.address), int(alert.port)))
            return
        if isinstance(alert, lt.tracker_error_alert) and self._skipped_only(alert):
            return
        if isinstance(alert, lt.tracker_error_alert):
            self.tracker_errors += 1
            log.debug("tracker error: %s", alert.message())
            job = self._jobs.get(alert.torrent_name)
            if job is not None:
                url = alert.tracker_url()
                trackers = job.handle.trackers()
                job.tracker_count = max(len(trackers), 1)
                reason = alert.failure_reason()
                # no answer at all, or a tracker whose store is away: neither can name a peer
                if reason and reason != protocol.TRACKER_STORE_UNAVAILABLE:
                    job.unreachable_trackers.discard(url.split("?", 1)[0])
                else:
                    job.unreachable_trackers.add(url.split("?", 1)[0])
                job._notify()
                # libtorrent's own backoff grows to an hour (5 s + 12.5 s x failures squared):
                # a seeder would stay unlisted long after the tracker is back. Retry on
                # shoal's schedule instead (at most announcing.RETRY_MAX apart) - that tracker
                # only: libtorrent goes on to the torrent's next one now.
                job.handle.force_reannounce(announcing.retry_delay(alert.times_in_row),
                                            self._tracker_index(trackers, url),
                                            lt.reannounce_flags_t.ignore_min_interval)
            if self.on_tracker_error is not None:
                self.on_tracker_error(alert.torrent_name, alert.failure_reason())
            return
        if isinstance(alert, lt.tracker_reply_alert):
            job = self._jobs.get(alert.torrent_name)
            if job is not None:
                job.unreachable_trackers.discard(alert.tracker_url().split("?", 1)[0])
            return
        if not isinstance(alert, lt.torrent_alert):
            if isinstance(alert, lt.listen_failed_alert):
                if self._stats_task is None and alert.socket_type in (lt.socket_type_t.tcp, lt.socket_type_t.tcp_ssl):
                    where = netaddr.hostport(str(alert.address), int(alert.port))
                    self._listen_failures.append(f"cannot listen on {where} ({alert.error.message().lower()})")
                    return  # start() fails with it, in one line
                log.error("libtorrent: %s", alert.message())
            return
        job = self._jobs.get(alert.torrent_name)
        if job is None:
            return
        if isinstance(alert, lt.piece_finished_alert):
            job._on_piece(alert.piece_index)
        elif isinstance(alert, lt.read_piece_alert):
            err = alert.error.message() if alert.error.value() else None
            job._on_read(alert.piece, bytes(alert.buffer) if err is None else b"", err)
        elif isinstance(alert, lt.torrent_finished_alert):
            self._lift_peer_limit(job)  # a seed now (see add)
            job._on_finished()
        elif isinstance(alert, lt.torrent_checked_alert):
            job._on_checked()
        elif isinstance(alert, lt.hash_failed_alert):
            job._on_hash_failed(alert.piece_index)
            self.hash_failures += 1
            log.warning("piece %d of %s failed its hash check", alert.piece_index, job.name)
        elif isinstance(alert, lt.cache_flushed_alert):
            job._on_flushed()
        elif isinstance(alert, lt.storage_moved_alert):
            job._on_moved(None)
        elif isinstance(alert, lt.storage_moved_failed_alert):
            job._on_moved(alert.message())
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            log.error("torrent %s failed: %s", job.name, alert.message())
            job._on_error(alert.message())

    async def fresh_stats(self, within: float = 1.0) -> None:
        """Refresh `stats` now (a /metrics scrape right after a transfer must show it, not the
        numbers of the last 2 s poll); gives up after `within` seconds, keeping the old ones."""
        if self._session is None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self._session.post_session_stats()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, within)

    def _count_leechers(self, statuses: Iterable[lt.torrent_status]) -> None:
        """Swarms' leechers from their torrents' status. Only torrents still seeded count: a
        status taken just before a removal can arrive after it, and libtorrent never reports
        that torrent again. Swarms without leechers are dropped, not kept at 0."""
        live = {job.handle for job in self._jobs.values()}
        for status in statuses:
            leechers = int(status.num_peers) - int(status.num_seeds)
            if leechers > 0 and status.handle in live:
                self._leechers[status.handle] = leechers
            else:
                self._leechers.pop(status.handle, None)
            if leechers > 0 and status.handle in live and int(status.num_uploads) > 0:
                self._unchoking.add(status.handle)
            else:
                self._unchoking.discard(status.handle)
        for gone in [h for h in self._leechers if h not in live]:
            del self._leechers[gone]
        self._unchoking &= self._leechers.keys()
        self._set_unchoke_slots()

    def _set_unchoke_slots(self) -> None:
        if not self._balanced:
            return
        wanted = seeder_slots(self._leechers.values())
        if wanted != self.unchoke_slots and self._session is not None:
            self.unchoke_slots = wanted
            self._session.apply_settings({"unchoke_slots_limit": wanted})

    async def _balance_slots(self) -> None:
        """The origin's seeder: an upload slot for each swarm being downloaded, SEEDER_SLOTS at
        least (from the state updates this asks for: _dispatch)."""
        ticks = 0
        while True:
            await asyncio.sleep(SLOTS_RECOUNT)
            if self._session is None:
                continue
            ticks += 1
            try:
                self._session.post_torrent_updates(0)  # the basic fields: handle, peers, seeds
                if ticks % SLOTS_RECHECK == 0:
                    # libtorrent reports a torrent while it moves bytes: a peer that fell silent
                    # before it left would stay counted (at most connections_limit handles to ask)
                    self._count_leechers([h.status(0) for h in list(self._leechers) if h.is_valid()])
                # a seed takes an unasked piece without a word (libtorrent counts it as waste):
                # look at once, and at every swarm, for the peer that sent it
                waste = self.stats.get("ses.waste_piece_seed", 0)
                if waste > self._waste_seen:
                    self._waste_seen = waste
                    self._drop_slow_peers(everywhere=True)
                elif ticks % GUARD_EVERY == 0:
                    self._drop_slow_peers()
            except Exception:  # one bad tick must not end the balancing, nor keep bans for good
                log.exception("seeder slot balancing failed; trying again")

    def _drop_slow_peers(self, everywhere: bool = False) -> None:
        """Ban, for a while, the addresses of peers that hold a slot and do not read, or that
        send the seeder pieces (see shoal/slowpeers.py). Asks only swarms with peers unchoked
        (at most the session's slots and the optimistic one, however many swarms a node holds
        idle connections in), or `everywhere` a peer is, once a piece came in."""
        guard = self.slow_peers
        if guard is None or self._session is None:
            return
        samples = []
        for handle in list(self._leechers if everywhere else self._unchoking):
            try:
                peers = handle.get_peer_info() if handle.is_valid() else []
            except RuntimeError:  # removed since it was counted
                continue
            for p in peers:
                ip, port = p.ip
                samples.append(PeerSample(
                    handle, (str(ip), int(port)), unchoked=not p.flags & lt.peer_info.choked,
                    interested=bool(p.flags & lt.peer_info.remote_interested),
                    uploaded=int(p.total_upload), received=int(p.total_download)))
        now = time.monotonic()
        stats = self.stats
        # peers that want an upload are choked while the regular slots (libtorrent's
        # recalculate_unchoke_slots: all but the optimistic ones) are full
        slots = stats.get("ses.num_unchoke_slots", 0)
        optimistic = stats.get("peer.num_peers_up_unchoked_optimistic", 0)
        regular = stats.get("peer.num_peers_up_unchoked", 0) - optimistic
        full = regular >= slots - (optimistic or max(1, slots // 5))
        waiting = stats.get("peer.num_peers_up_interested", 0) - stats.get("peer.num_peers_up_unchoked_all", 0)
        limit = self._upload_limit
        share = limit / slots if limit > 0 and slots > 0 else None
        for ip, why in guard.observe(samples, now, waiting=waiting if full else 0,
                                     swarm_slots=SEEDER_SLOTS if self._balanced else None, slot_share=share):
            if why == "slow":
                log.warning("peer %s held an upload slot of the seeder for %gs, reading under %d bytes/s while "
                            "others waited: refused for %gs", ip, guard.window, guard.floor_for(share),
                            guard.ban_length(ip, now))
            else:
                log.warning("peer %s sent the seeder piece data it never asked for: refused for %gs",
                            ip, guard.ban_length(ip, now))
        banned = guard.banned(now)
        if banned != self._banned:
            rules = lt.ip_filter()
            for ip in banned:
                rules.add_rule(ip, ip, 1)  # blocked: libtorrent disconnects it from every swarm
            self._session.set_ip_filter(rules)
            self._banned = banned  # (once in force: a failure is tried again at the next look)

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(2)
            now = time.monotonic()
            for job in self._jobs.values():
                if job.limited_until is not None and now >= job.limited_until:
                    self._lift_peer_limit(job)
            if self._session is not None:
                self._session.post_session_stats()
