"""The origin's seeder against peers that hold an upload slot and do not read.

The seeder uploads to a few peers per swarm at a time, in turn (shoal/swarm.py SEEDER_CHOKING).
libtorrent's round robin ends a peer's turn only once it has had `seeding_piece_quota` pieces
*and* a minute has passed, so a peer that reads a few bytes a round keeps its slot for hours,
ahead of every peer waiting; a node admitted to many blobs pins one slot in each of their swarms,
and past 52 of them (the session's 64 slots less the optimistic one and the waiting) legitimate
peers get only the optimistic unchoke, every 30 s, longer than an agent waits for a piece
(security review attack20 #3).

Reproduced (tests/integration/test_seeder_slots.py): two peers asking for a block every half
second (libtorrent counts the blocks its socket buffers take as sent) and reading a few bytes held
the seeder's two regular slots, and an honest peer got no piece for 22 s after its optimistic turn.

So every few seconds the seeder looks at the peers it uploads to. While a peer that wants an
upload is choked, one that held a slot for a whole `window` and took less than `floor` bytes a
second of it is dropped: its address is banned from the seeder's session (libtorrent's IP filter,
the one way to disconnect a given peer from Python) for `ban` seconds, doubled for each repeat up
to `ban_max`. The floor is lowered to a quarter of a slot's share of an upload rate limit the
operator set, so that a limit shared by many slots does not drop every peer in turn; not to the
holders' measured rates, which holders that do not read would lower. A slow peer that takes no
one's turn (no one waits) is left where it is.

What this leaves: a peer that reads at the floor holds its slot, as any slow peer does; pinning
the seeder's 63 regular slots that way costs a node about 0.5 MB/s of real reading.

A node behind the banned address loses the seeder for a while, not the blob: its agent gets the
pieces from other peers or, past its stall timeout, from the registry.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

# A peer holding a slot must take at least FLOOR bytes a second over WINDOW seconds. An agent's
# download falls back to the registry when a piece (256 KiB for most layers) takes longer than
# its stall timeout (10 s): a peer reading 8 KiB/s could not use the seeder anyway.
WINDOW = 30.0
FLOOR = 8 << 10
SHARE = 4  # with an upload rate limit: at most 1/SHARE of a slot's share of it
BAN = 60.0
BAN_MAX = 900.0
# Addresses remembered for their repeats (banned or not): the oldest are forgotten beyond this.
MAX_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class PeerSample:
    """One peer connection of one swarm, as the seeder sees it now."""

    swarm: Hashable
    address: tuple[str, int]
    holds_slot: bool  # unchoked by the seeder and interested in its pieces
    uploaded: int  # payload bytes sent to it so far


@dataclass(slots=True)
class _Watch:
    since: float
    uploaded: int


@dataclass(slots=True)
class _Offender:
    until: float
    strikes: int


class SlowPeerGuard:
    def __init__(self, *, window: float = WINDOW, floor: int = FLOOR, ban: float = BAN,
                 ban_max: float = BAN_MAX) -> None:
        self.window, self.floor, self.ban, self.ban_max = window, floor, ban, ban_max
        self._watched: dict[tuple[Hashable, tuple[str, int]], _Watch] = {}
        self._offenders: dict[str, _Offender] = {}
        self.dropped = 0  # peers dropped so far

    def observe(self, samples: Iterable[PeerSample], now: float, *, contended: bool,
                slot_share: float | None = None) -> list[str]:
        """The addresses to ban from now on (each once, while its ban lasts). `contended`: a
        peer that wants an upload is choked. `slot_share`: a slot's share of the seeder's upload
        rate limit, if it has one (bytes a second)."""
        seen: set[tuple[Hashable, tuple[str, int]]] = set()
        holders: list[tuple[tuple[Hashable, tuple[str, int]], PeerSample, _Watch]] = []
        for s in samples:
            key = (s.swarm, s.address)
            seen.add(key)
            watch = self._watched.get(key)
            if not s.holds_slot:
                self._watched.pop(key, None)
            elif watch is None or s.uploaded < watch.uploaded:
                self._watched[key] = _Watch(now, s.uploaded)
            else:
                holders.append((key, s, watch))
        for key in [k for k in self._watched if k not in seen]:
            del self._watched[key]
        floor = self.floor_for(slot_share)
        banned: list[str] = []
        for key, s, watch in holders:
            elapsed = now - watch.since
            if elapsed < self.window:
                continue
            if (s.uploaded - watch.uploaded) / elapsed >= floor or not contended:
                self._watched[key] = _Watch(now, s.uploaded)  # a new window from here
                continue
            del self._watched[key]
            ip = s.address[0]
            if not self.is_banned(ip, now):  # (its other swarms' connections go with it)
                banned.append(ip)
                self._strike(ip, now)
                self.dropped += 1
        return banned

    def floor_for(self, slot_share: float | None) -> float:
        """Bytes a second a holder must take (see observe)."""
        return self.floor if slot_share is None else min(self.floor, slot_share / SHARE)

    def _strike(self, ip: str, now: float) -> None:
        offender = self._offenders.pop(ip, None)  # (re-inserted last: the dict is oldest first)
        strikes = 1 if offender is None else offender.strikes + 1
        self._offenders[ip] = _Offender(now + min(self.ban * 2 ** (strikes - 1), self.ban_max), strikes)
        while len(self._offenders) > MAX_REMEMBERED:
            del self._offenders[next(iter(self._offenders))]

    def is_banned(self, ip: str, now: float) -> bool:
        offender = self._offenders.get(ip)
        return offender is not None and offender.until > now

    def banned(self, now: float) -> list[str]:
        """Addresses banned now. One whose ban ended long ago (ban_max after) starts afresh."""
        for ip in [ip for ip, o in self._offenders.items() if o.until + self.ban_max <= now]:
            del self._offenders[ip]
        return sorted(ip for ip, o in self._offenders.items() if o.until > now)
