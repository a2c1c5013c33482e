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

So every few seconds the seeder looks at the peers it uploads to:

- A peer that sent it piece data is banned at once, for `ban_max`. The seeder never asks for a
  piece, so no honest agent sends one; and libtorrent's choker ranks first the peers that sent the
  most in the last round, so one unasked 16 KiB block every round kept an attacker's slot ahead of
  everyone else's, whatever it read (security review attack23 #1). libtorrent counts such a block
  as waste (`ses.waste_piece_seed`): the seeder then looks at once, at every swarm.
- Where its slot is wanted, a peer that took less than `floor` bytes a second of it over the last
  `window` seconds (a sliding window) is dropped. Its slot is wanted when peers that want an
  upload are choked and either the session's regular slots are full, or they wait in the same
  swarm and that swarm has all the slots one swarm may have (SEEDER_SLOTS). No more holders are
  dropped than peers wait, the slowest first, and none for `settle` seconds after a drop, while
  the freed slots go to the waiters. The first time, the drop is a kick: the address is refused
  for `kick` seconds, long enough to close its connections, and the node comes back at the end of
  the queue (an honest node under a tight download cap, split over many peers, can read a seeder
  slot this slowly). A repeat within `ban_max` of the last ban's end bans it for `ban`, doubled
  for each further repeat up to `ban_max`.

The floor is far below what a slot is worth to anyone who reads it (the seeder's link shared by
a few peers): a slot read this slowly is wasted while others wait. Under an upload rate limit the
operator set, it is lowered to a quarter of a slot's share of that limit, so that a limit shared by
many slots does not drop every peer in turn; never to the holders' measured rates, which holders
that do not read would lower. Bans go through libtorrent's IP filter, the one way to disconnect a
given peer from Python; the seeder's own address is never banned (`shoal up` runs an agent there).

What this leaves: a peer that reads at the floor holds its slot until libtorrent's round robin
ends its turn (4 pieces and a minute: about 1 min for a blob under 16 MiB, whose 64 pieces are
small, about 2 min with 256 KiB pieces, 34 min with 4 MiB ones);
pinning the seeder's 63 regular slots that way costs a node about 0.5 MB/s of real reading. A
node with many addresses gets, per new address, one choker round ahead of the waiters (an unasked
block) before its ban, or a window of slow reading before its kick. Nodes behind one address (NAT)
share its bans. A seeder listening on 0.0.0.0 or :: spares no address of its own.

A node behind a banned address loses the seeder for a while, not the blob: its agent gets the
pieces from other peers or, past its stall timeout, from the registry.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass

# A peer holding a slot must take at least FLOOR bytes a second over WINDOW seconds, where its
# slot is wanted (see above).
WINDOW = 30.0
FLOOR = 8 << 10
SHARE = 4  # with an upload rate limit: at most 1/SHARE of a slot's share of it
KICK = 10.0  # a first drop: long enough for the next look (every 5 s) to find it gone
# After dropping slow holders, time for libtorrent's choker (every 3 s) to hand their slots to
# the waiters and for the session counters (read every 2 s) to show it, before judging again.
SETTLE = 10.0
BAN = 60.0
BAN_MAX = 900.0
# A connection's slot history: a sample kept at most every WINDOW / HISTORY seconds.
HISTORY = 10
# Addresses remembered for their repeats (banned or not): the oldest are forgotten beyond this.
MAX_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class PeerSample:
    """One peer connection of one swarm, as the seeder sees it now."""

    swarm: Hashable
    address: tuple[str, int]
    unchoked: bool  # by the seeder
    interested: bool  # in the seeder's pieces
    uploaded: int  # payload bytes sent to it so far
    received: int = 0  # payload bytes it sent (the seeder never asks for any)

    @property
    def holds_slot(self) -> bool:
        return self.unchoked and self.interested

    @property
    def waits(self) -> bool:
        return self.interested and not self.unchoked


@dataclass(slots=True)
class _Offender:
    until: float
    strikes: int


class SlowPeerGuard:
    def __init__(self, *, window: float = WINDOW, floor: int = FLOOR, kick: float = KICK, ban: float = BAN,
                 ban_max: float = BAN_MAX, settle: float = SETTLE, spare: Collection[str] = ()) -> None:
        self.window, self.floor, self.kick, self.ban, self.ban_max = window, floor, kick, ban, ban_max
        self.settle = settle
        self._settled = float("-inf")  # no slow holder is dropped before then
        self.spare = frozenset(_canonical(a) for a in spare)  # addresses never banned (the seeder's own)
        # per connection holding a slot: (time, bytes sent) since it got it, one before the window
        self._watched: dict[tuple[Hashable, tuple[str, int]], deque[tuple[float, int]]] = {}
        self._offenders: dict[str, _Offender] = {}
        self.dropped = 0  # peers dropped so far, for either reason

    def observe(self, samples: Iterable[PeerSample], now: float, *, waiting: int,
                swarm_slots: int | None = None, slot_share: float | None = None) -> list[tuple[str, str]]:
        """The addresses to ban from now on, each with why ("slow" or "sent pieces"), each once
        while its ban lasts. `waiting`: peers that want an upload and are choked while the
        session's regular slots are full (0 when they are not). `swarm_slots`: the most slots one
        swarm may have, if there is such a cap. `slot_share`: a slot's share of the seeder's
        upload rate limit, if it has one (bytes a second).

        No more slow holders are dropped than there are peers waiting for their slots, the
        slowest first, and none for `settle` seconds after some were (`waiting` is then stale)."""
        seen: set[tuple[Hashable, tuple[str, int]]] = set()
        unchoked: dict[Hashable, int] = {}
        waiters: dict[Hashable, int] = {}
        held: dict[str, list[Hashable]] = {}  # address -> the swarms where it holds a slot
        slow: list[tuple[float, PeerSample]] = []
        banned: list[tuple[str, str]] = []
        floor = self.floor_for(slot_share)
        for s in samples:
            key = (s.swarm, s.address)
            seen.add(key)
            if s.received > 0:
                self._ban(s.address[0], now, banned, "sent pieces")
                continue
            unchoked[s.swarm] = unchoked.get(s.swarm, 0) + s.unchoked
            if s.waits:
                waiters[s.swarm] = waiters.get(s.swarm, 0) + 1
            if not s.holds_slot:
                self._watched.pop(key, None)
                continue
            held.setdefault(s.address[0], []).append(s.swarm)
            rate = self._rate(key, s.uploaded, now)
            if rate is not None and rate < floor:
                slow.append((rate, s))
        for key in [k for k in self._watched if k not in seen]:
            del self._watched[key]
        # slots wanted in a swarm: its waiters, where it has all the slots one swarm may have
        room = {swarm: n for swarm, n in waiters.items()
                if swarm_slots is not None and unchoked.get(swarm, 0) >= swarm_slots}
        for _rate, s in sorted(slow, key=lambda c: c[0]) if now >= self._settled else []:
            ip = s.address[0]
            if room.get(s.swarm, 0) <= 0 and waiting <= 0:
                continue
            if not self._ban(ip, now, banned, "slow"):
                continue
            self._settled = now + self.settle
            for key in [k for k in self._watched if k[1][0] == ip]:  # its connections close
                del self._watched[key]
            for swarm in held[ip]:  # every slot of the address is freed
                if room.get(swarm, 0) > 0:
                    room[swarm] -= 1
                else:
                    waiting -= 1
        return banned

    def _rate(self, key: tuple[Hashable, tuple[str, int]], uploaded: int, now: float) -> float | None:
        """Bytes a second the connection took over the last window of its slot, once it has held
        one that long."""
        history = self._watched.get(key)
        if history is None or uploaded < history[-1][1]:  # a new slot, or a new connection
            self._watched[key] = deque([(now, uploaded)])
            return None
        if now - history[-1][0] >= self.window / HISTORY:
            history.append((now, uploaded))
        while len(history) > 1 and history[1][0] <= now - self.window:
            history.popleft()
        since, base = history[0]
        if now - since < self.window:
            return None
        return (uploaded - base) / (now - since)

    def floor_for(self, slot_share: float | None) -> float:
        """Bytes a second a holder must take (see observe)."""
        return self.floor if slot_share is None else min(self.floor, slot_share / SHARE)

    def _ban(self, ip: str, now: float, banned: list[tuple[str, str]], why: str) -> bool:
        """Ban the address unless it is spared or banned already (its other swarms' connections
        go with it); whether it was."""
        if self.is_banned(ip, now) or any(ip == b for b, _ in banned) or _canonical(ip) in self.spare:
            return False
        offender = self._offenders.pop(ip, None)  # (re-inserted last: the dict is oldest first)
        strikes = 1 if offender is None else offender.strikes + 1
        if why != "slow":
            length = self.ban_max
        elif strikes == 1:
            length = self.kick
        else:
            length = min(self.ban * 2 ** (strikes - 2), self.ban_max)
        self._offenders[ip] = _Offender(now + length, strikes)
        while len(self._offenders) > MAX_REMEMBERED:
            # the oldest whose ban has ended, else the oldest: an address is unbanned early only
            # once MAX_REMEMBERED others are banned at once
            oldest = next((a for a, o in self._offenders.items() if o.until <= now), next(iter(self._offenders)))
            del self._offenders[oldest]
        banned.append((ip, why))
        self.dropped += 1
        return True

    def ban_length(self, ip: str, now: float) -> float:
        """Seconds left of the address's ban (0 if none)."""
        offender = self._offenders.get(ip)
        return max(0.0, offender.until - now) if offender is not None else 0.0

    def is_banned(self, ip: str, now: float) -> bool:
        offender = self._offenders.get(ip)
        return offender is not None and offender.until > now

    def banned(self, now: float) -> list[str]:
        """Addresses banned now. One whose ban ended long ago (ban_max after) starts afresh."""
        for ip in [ip for ip, o in self._offenders.items() if o.until + self.ban_max <= now]:
            del self._offenders[ip]
        return sorted(ip for ip, o in self._offenders.items() if o.until > now)


def _canonical(address: str) -> str:
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return address
