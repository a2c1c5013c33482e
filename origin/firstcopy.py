"""A blob's first copy: the origin sends each piece once, to one node, and the nodes spread it
(issue 16, bench/RESULTS.md section 32).

When every node pulls a blob at once, the origin's seeder used to send 1.6-2.4 copies of it: a
download keeps four connections, every node dials at once, and whichever few connections to the
seeder survived that scramble asked it for the same pieces, while the swarm waited for pieces new
to it. Here the origin hands each node it admits a ticket instead; the node asks FIRST_COPY for a
piece at a time, and each answer is the next piece no node has had from the origin, in piece
order, one send at a time. So every piece leaves the origin once, as early as the origin's link
allows, and every node has pieces to trade from its first seconds. The node adds each piece to its
torrent, which checks it against the signed merkle tree like a peer's; the tracker hands such a
node the seeder only once it stalls (protocol.ANNOUNCE_FIRST_COPY).

A round ends when every piece has left the origin. It is remembered for ROUND_MEMORY after the
last admission or piece delivered: nodes admitted meanwhile take the blob from the swarm (a
rolling update's later waves), and a blob nobody asked for in that long gets a new round. A piece
whose send failed is handed out again first, up to MAX_HANDOUTS times. The sends keep to the seeder's upload limit
(`torrent.upload_rate_limit`), as a pace of their own: an operator's cap on the origin's uplink
holds for the first copies too.

The node the origin relayed the blob to while fetching it (origin/relay.py) has its first pieces
already (0.04-0.17 copies of the blob in a 32-node create, all sent again before). The round
starts after the whole pieces the relay sent and holds those back; the relay's node says in its
first request how many first pieces it has verified, those are sent to no one, and the rest of
the held-back ones go out next. The count is the node's, and the relay's only holds back: the
relay counts what it wrote to its socket, up to four times what its node read in a rollout, and
skipping pieces on that count alone once left the nodes stalled on pieces none of them had
(bench/RESULTS.md section 32). The relay's count bounds the node's, so a node can skip no piece
the origin did not send it, but a hostile one can withhold all of those (FAULTS.md). If the
relay's node never asks, the held-back pieces go out last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from shoal import errors
from shoal.metainfo import Metainfo
from shoal.oci import Digest
from shoal.store import read_exact

log = logging.getLogger(__name__)

# A round is forgotten this long after its last admission or delivered piece.
ROUND_MEMORY = 600.0
# Rounds open or remembered (one per blob), and tickets over all of them: a ticket is a few
# hundred bytes of the origin's memory, and a node holds one per blob it is pulling.
MAX_ROUNDS = 4096
MAX_TICKETS = 100_000
# A node that does not take its piece in this long loses it (the piece goes to the next node):
# the send holds up every node's next piece.
SEND_TIMEOUT = 10.0
# Requests waiting for their turn, over every round, and how long one waits: each holds one of
# the origin's connections (max_connections, 2,048 by default), which a request being served is
# never shed from. A node past either is answered 503 and takes the blob from the swarm. One
# request at a time per ticket: a node asks for its next piece once it has the last.
MAX_WAITING = 512
WAIT_TIMEOUT = 30.0
# A piece handed out this many times and never taken is left to the seeder (nodes that lack it
# stall and are handed it): a node that takes pieces and hangs up cannot keep a round open.
MAX_HANDOUTS = 3
# Relays remembered (blob -> its node and the bytes sent) until the node's first request: a few
# dozen bytes each, one relay per blob (origin/relay.py).
MAX_RELAYED = 4096
# A relay's count is for the round that begins when its fetch is seeded: the relay reports as it
# writes, up to the seeding. One not followed by a round this soon after its last report was of
# a fetch that failed (or of a node that never asked for the metainfo), not of the next one.
RELAY_RECORD_TTL = 60.0


@dataclass(eq=False)
class _Round:
    digest: str
    path: Path
    size: int
    piece_length: int
    pieces: int
    last: float
    cursor: int = 0  # the next piece from `deferred` on
    # Pieces 0 to deferred - 1 (a relay's) are held back until its node asks (else they go out
    # last, from `tail` on)
    deferred: int = 0
    tail: int = 0
    relay: tuple[str, int] | None = None  # the relay's node and the bytes it sent, until it says
    again: list[int] = field(default_factory=list)  # pieces whose send failed, handed out first
    failures: dict[int, int] = field(default_factory=dict)  # piece -> failed sends
    nodes: dict[str, str] = field(default_factory=dict)  # node -> its ticket
    busy: set[str] = field(default_factory=set)  # tickets with a request in progress
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def done(self) -> bool:
        return self.cursor >= self.pieces and self.tail >= self.deferred and not self.again

    def take(self) -> int | None:
        if self.again:
            return self.again.pop(0)
        if self.cursor < self.pieces:
            self.cursor += 1
            return self.cursor - 1
        if self.tail < self.deferred:
            self.tail += 1
            return self.tail - 1
        return None

    def length(self, index: int) -> int:
        return min(self.piece_length, self.size - index * self.piece_length)

    def span(self, start: int, end: int) -> int:
        """The bytes of pieces `start` to `end` - 1."""
        return max(0, min(end * self.piece_length, self.size) - start * self.piece_length) if end > start else 0

    def whole(self, nbytes: int) -> int:
        """How many of the first pieces `nbytes` from the start cover whole."""
        return self.pieces if nbytes >= self.size else nbytes // self.piece_length

    def defer(self, count: int) -> None:
        """A new round: pieces 0 to `count` - 1 are held back (`settle`, else they go out last)."""
        self.deferred = self.cursor = min(count, self.pieces)

    def failed(self, index: int) -> None:
        self.failures[index] = n = self.failures.get(index, 0) + 1
        if n < MAX_HANDOUTS:
            self.again.append(index)

    def end(self) -> None:
        self.cursor, self.tail, self.again = self.pieces, self.deferred, []

    def settle(self, count: int) -> int:
        """Pieces 0 to `count` - 1 are to be sent to no one (a node has them), and the rest of
        the deferred ones go out next: the bytes of those skipped."""
        skipped = self.span(self.tail, min(count, self.deferred)) + self.span(self.cursor, count)
        skipped += sum(self.length(i) for i in self.again if i < count)
        self.again = [i for i in self.again if i >= count] + list(range(max(self.tail, count), self.deferred))
        self.tail = self.deferred
        self.cursor = max(self.cursor, count)
        return skipped


class Lease:
    """One piece on its way to one node: handed out again unless `delivered` is called."""

    def __init__(self, index: int, data: bytes) -> None:
        self.index = index
        self.data = data
        self.ok = False

    def delivered(self) -> None:
        self.ok = True


class FirstCopies:
    def __init__(self, registry: CollectorRegistry, *, rate: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = rate  # bytes a second over every round's sends, 0 for no limit
        self._clock, self._sleep = clock, sleep
        self._waiting = 0  # requests waiting for their round's turn
        self._free_at = 0.0  # (monotonic) when the pace lets the next send start
        self._rounds: OrderedDict[str, _Round] = OrderedDict()  # by last use, oldest first
        self._tickets: dict[str, tuple[_Round, str]] = {}  # ticket -> its round and node
        # blob -> (node, bytes relayed, when last told)
        self._relayed: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self.tickets = Counter("shoal_origin_first_copy_tickets_total",
                               "Admissions answered with a first-copy ticket (issued), or without one because "
                               "the blob's first copy has left the origin or the origin holds too many "
                               "(declined)", ["result"], registry=registry)
        for result in ("issued", "declined"):
            self.tickets.labels(result)
        self.sent = Counter("shoal_origin_first_copy_bytes_total",
                            "Bytes of blobs' first copies sent to nodes, a piece per node", registry=registry)
        self.failed = Counter("shoal_origin_first_copy_failed_sends_total",
                              "First-copy pieces a node did not take (handed out again, three times at most)",
                              registry=registry)
        self.skipped = Counter("shoal_origin_first_copy_skipped_bytes_total",
                               "Bytes of first copies not sent: the node the origin relayed the blob to had "
                               "verified them", registry=registry)

    def _prune(self, now: float) -> None:
        while self._rounds:
            oldest = next(iter(self._rounds.values()))
            if now - oldest.last <= ROUND_MEMORY:
                break
            self._forget(oldest)

    def _forget(self, r: _Round) -> None:
        del self._rounds[r.digest]
        for ticket in r.nodes.values():
            self._tickets.pop(ticket, None)

    def issue(self, node: str, meta: Metainfo, path: Path) -> str | None:
        """A ticket for `node` to take pieces of the blob of `meta` (the origin's file at `path`),
        or None when its first copy has left the origin already (or the origin holds too many)."""
        now = self._clock()
        self._prune(now)
        key = meta.digest.hex
        r = self._rounds.get(key)
        if r is None:
            if len(self._rounds) >= MAX_ROUNDS:
                self._forget(next(iter(self._rounds.values())))
            r = self._rounds[key] = _Round(key, path, meta.size, meta.piece_length, meta.num_pieces, now)
            relay = self._relayed.pop(key, None)
            if relay is not None and now - relay[2] <= RELAY_RECORD_TTL:
                r.relay = relay[:2]  # (the relay stops sending when the blob is seeded: before this)
                r.defer(r.whole(relay[1]))
        r.last = now
        self._rounds.move_to_end(key)
        ticket = r.nodes.get(node)
        if ticket is None and not r.done and len(self._tickets) < MAX_TICKETS:
            ticket = r.nodes[node] = secrets.token_urlsafe(32)
            self._tickets[ticket] = (r, node)
        if ticket is None or r.done:
            self.tickets.labels("declined").inc()
            return None
        self.tickets.labels("issued").inc()
        return ticket

    def relayed(self, node: str, digest: Digest, sent: int) -> None:
        """The origin's relay has sent `node` the first `sent` bytes of the blob (origin/relay.py)."""
        r = self._rounds.get(digest.hex)
        if r is not None:
            # a last write the relay finished after its round began; or a round remembered from
            # an earlier fetch of the blob, whose pieces have left already
            if r.relay is not None and r.relay[0] == node:
                r.relay = (node, sent)
            return
        self._relayed[digest.hex] = (node, sent, self._clock())
        self._relayed.move_to_end(digest.hex)
        while len(self._relayed) > MAX_RELAYED:
            self._relayed.popitem(last=False)

    @contextlib.asynccontextmanager
    async def piece(self, ticket: str, digest: Digest, alive: Callable[[], bool] = lambda: True,
                    have: int = 0) -> AsyncIterator[Lease | None]:
        """The next piece of the blob's first copy for the holder of `ticket`, None once every
        piece has left the origin. Held until the block ends: the next node's piece is sent
        after this one (in order, each at the origin's whole link, not all at once at a share).
        Unavailable (503) while the ticket has a request in progress, too many wait, or the turn
        does not come in time; ConnectionError if the node hung up (`alive`) before its turn.
        `have`: the node has verified pieces 0 to `have` - 1 (a relay's; see the module's doc)."""
        held = self._tickets.get(ticket)
        if held is None or held[0].digest != digest.hex:
            raise errors.Denied("no first-copy ticket for this blob")
        r, node = held
        if ticket in r.busy:
            raise errors.Unavailable("this ticket has a first-copy request in progress")
        if r.relay is not None and r.relay[0] == node:
            self._settle_relay(r, have)
        if self._waiting >= MAX_WAITING:
            raise errors.Unavailable("too many first-copy requests are waiting")
        r.busy.add(ticket)
        try:
            self._waiting += 1
            try:
                async with asyncio.timeout(WAIT_TIMEOUT):
                    await r.lock.acquire()
            except TimeoutError:
                raise errors.Unavailable("the first copy's turn did not come in time") from None
            finally:
                self._waiting -= 1
            try:
                if not alive():  # (it hung up while it waited: no piece, and no pace, for it)
                    raise ConnectionError("the node hung up")
                async with self._send(r) as lease:
                    yield lease
            finally:
                r.lock.release()
        finally:
            r.busy.discard(ticket)

    def _settle_relay(self, r: _Round, have: int) -> None:
        # at the relay's node's first request: no further than the relay went (whole pieces of
        # what it wrote to its socket, which the node may not have read)
        assert r.relay is not None
        skipped = r.settle(min(have, r.whole(r.relay[1])))
        r.relay = None
        log.debug("first copy of sha256:%s: %d bytes its relay's node has are sent to no one", r.digest, skipped)
        if skipped:
            self.skipped.inc(skipped)

    @contextlib.asynccontextmanager
    async def _send(self, r: _Round) -> AsyncIterator[Lease | None]:
        if self.rate > 0:  # (before the piece is read: the wait holds no piece in memory)
            now = self._clock()
            if self._free_at > now:
                await self._sleep(self._free_at - now)
        index = r.take()
        if index is None:
            yield None
            return
        lease = Lease(index, b"")
        try:
            lease.data = await asyncio.to_thread(read_exact, r.path, index * r.piece_length, r.length(index))
        except (FileNotFoundError, errors.IntegrityError):
            # the blob left the origin's store (evicted), or is short of its metainfo: its round
            # is over, and nodes that stall ask the tracker for the seeders
            r.end()
            yield None
            return
        except OSError:
            r.failed(index)  # (a passing error, EMFILE or EIO: the piece is handed out again)
            raise errors.Unavailable("cannot read the blob's piece now") from None
        except BaseException:
            r.failed(index)
            raise
        charge = len(lease.data) / self.rate if self.rate > 0 else 0.0
        self._free_at = max(self._clock(), self._free_at) + charge
        try:
            yield lease
        finally:
            if lease.ok:
                r.last = self._clock()
                if r.digest in self._rounds:  # (kept in the order _prune reads: by last use)
                    self._rounds.move_to_end(r.digest)
                self.sent.inc(len(lease.data))
            else:  # (not taken, or the node's request ended first: the next node gets it)
                self._free_at -= charge  # (nothing was sent: the pace is not spent on it)
                self.failed.inc()
                r.failed(index)
