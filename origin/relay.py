"""A cold blob's bytes relayed to admitted nodes while the origin fetches it (issue 16 part 4).

Without it a node's first byte of a cold blob waits for the origin to fetch the whole blob from
the registry, hash it into a torrent and seed it: seconds for a big layer, while the origin's
uplink idles. With it an admission for a blob the origin is still to seed answers at once with
a ticket (protocol.RelayTicket); the node streams the bytes from the origin's fetch as they land
in its file (RELAY), and switches to the swarm when its blocking admission returns the metainfo.
The relay ends when the blob is seeded, wherever it stands: after that the swarm carries the
blob, so the origin's uplink carries a relayed prefix per node only for as long as the fetch and
the hashing take. The registry still sends the blob once, to the origin. Relayed bytes are not
verified here: the node gives them only to whole-blob readers (their last chunk waits for the
digest) and libtorrent takes them only piece by piece against the signed merkle tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from shoal.oci import Digest

# Bytes read and written per step: a relay holds about two (this, and the transport's unsent rest).
READ_CHUNK = 256 << 10
# A ticket is good for this long (a node uses it at once; the relay ends with the fetch anyway).
TICKET_TTL = 60.0
# Relays of one blob (tickets unused, or relaying now). One: the node that asked first gets the
# head start, and joins the swarm with it, a peer that has what the others need first; the others
# wait for the torrent as before. A relay per node made the origin send the whole blob to every
# node whose link outran its fetch and hashing (on loopback, four nodes pulling a 64 MiB layer at
# once each got all of it from the origin and nothing moved between them): the seeder's upload,
# which a rollout waits on, grew with the number of nodes.
MAX_TICKETS_PER_BLOB = 1
# Relays in all (blobs fetched at once): each holds a socket, a file and about 2 x READ_CHUNK.
MAX_TICKETS = 512
# How long a relay waits for the fetch to begin (the seeder first asks the registry its size).
START_TIMEOUT = 30.0
# A node that stops reading is dropped after this long: the relay holds nothing for it.
WRITE_TIMEOUT = 30.0


class FetchProgress:
    """The seeder's fetch of one blob, as a relay follows it: the file the bytes land in (`path`;
    it becomes `final`, in the store, when complete) and how many are there."""

    def __init__(self, ns: str, final: Path, size: int) -> None:
        self.ns = ns  # the registry the bytes come from
        self.path = self.final = final
        self.size = size
        self.written = 0
        self.ended = False
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def advance(self, n: int) -> None:
        self.written += n
        self._notify()

    def moved(self, path: Path) -> None:
        self.path = path
        self._notify()

    def end(self) -> None:
        self.ended = True
        self._notify()

    async def wait(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)


@dataclass(frozen=True, slots=True)
class _Ticket:
    node: str
    ns: str
    digest: Digest
    expires: float


class Relays:
    """Tickets (one use each, for one node and blob) and the streams they open."""

    def __init__(self, fetching: Callable[[Digest], FetchProgress | None],
                 running: Callable[[Digest], bool], registry: CollectorRegistry,
                 on_sent: Callable[[str, Digest, int], None] | None = None) -> None:
        self._fetching = fetching  # the seeder's fetch of a blob now, if any
        self._running = running  # whether the seeder's flight for a blob still runs
        # told (node, blob, bytes sent so far) as a relay sends: the first copy starts after them
        self._on_sent = on_sent
        self._tickets: dict[str, _Ticket] = {}
        # Redeemed tickets whose relay has not ended yet: they count against the bounds as
        # unused ones do (else a node redeeming each ticket at once had as many streams as it
        # asked for, each holding a socket, a file and up to READ_CHUNK of the origin's memory).
        self._live: dict[str, _Ticket] = {}
        self.tickets = Counter("shoal_origin_relay_tickets_total",
                               "Admissions answered with a relay ticket (issued), or without one because the "
                               "blob had enough relays (declined)", ["result"], registry=registry)
        for result in ("issued", "declined"):
            self.tickets.labels(result)
        self.streams = Gauge("shoal_origin_relay_streams", "Relays sending a blob's bytes now", registry=registry)
        self.sent = Counter("shoal_origin_relay_bytes_total",
                            "Bytes of blobs relayed to nodes while the origin fetched them", registry=registry)

    def issue(self, node: str, ns: str, digest: Digest) -> str | None:
        """A ticket for `node` to relay `digest` as registry `ns` sends it, or None when the blob
        has enough already."""
        now = time.monotonic()
        for t, held in list(self._tickets.items()):
            if held.expires < now:
                del self._tickets[t]
        taken = [*self._tickets.values(), *self._live.values()]
        same = sum(1 for t in taken if t.digest == digest)
        # one relay per node and blob: a node needs no second head start on the same bytes
        mine = any(t.digest == digest and t.node == node for t in taken)
        if mine or same >= MAX_TICKETS_PER_BLOB or len(taken) >= MAX_TICKETS:
            self.tickets.labels("declined").inc()
            return None
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = _Ticket(node, ns, digest, now + TICKET_TTL)
        self.tickets.labels("issued").inc()
        return ticket

    def redeem(self, ticket: str, digest: Digest) -> str | None:
        """The registry of a live `ticket` for `digest`, else None (it is used up either way).
        A ticket redeemed counts as live until `release`."""
        held = self._tickets.pop(ticket, None)
        if held is None or held.digest != digest or held.expires < time.monotonic():
            return None
        self._live[ticket] = held
        return held.ns

    def release(self, ticket: str) -> None:
        """The relay of a redeemed `ticket` ended."""
        self._live.pop(ticket, None)

    async def progress(self, ns: str, digest: Digest) -> FetchProgress | None:
        """The blob's fetch from registry `ns` once it has begun; None if it ended (seeded, or
        failed) first, or fetches from another registry: the node was admitted for `ns`, and
        must get the bytes of no other (agent/provenance.py) before the blob is vouched for."""
        started = time.monotonic()
        while (waited := time.monotonic() - started) < START_TIMEOUT:
            progress = self._fetching(digest)
            if progress is not None:
                return progress if progress.ns == ns else None
            # (the admission started the seeding in a task of its own: give it a moment to begin)
            if waited > 1.0 and not self._running(digest):
                return None
            await asyncio.sleep(0.02)  # the fetch begins after one registry round trip
        return None

    async def stream(self, progress: FetchProgress, write: Callable[[bytes], Awaitable[None]],
                     ticket: str = "") -> int:
        """Send what the fetch has written, and what it writes, until it ends: the bytes sent
        (told to `on_sent` for the redeemed `ticket`'s node as they go)."""
        pos, f = 0, None
        self.streams.inc()
        try:
            while not progress.ended and pos < progress.size:
                if pos >= progress.written:
                    await progress.wait(1.0)
                    continue
                if f is None:
                    f = await asyncio.to_thread(_open, progress)
                    if f is None:
                        break  # the fetch failed and dropped its file
                chunk = await asyncio.to_thread(os.pread, f, min(READ_CHUNK, progress.written - pos), pos)
                if not chunk:
                    break
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await write(chunk)
                pos += len(chunk)
                self.sent.inc(len(chunk))
                held = self._live.get(ticket)
                if held is not None and self._on_sent is not None:
                    self._on_sent(held.node, held.digest, pos)
        finally:
            self.streams.dec()
            if f is not None:
                os.close(f)
        return pos


def _open(progress: FetchProgress) -> int | None:
    """The fetch's file, wherever it is now (it moves into the store when complete)."""
    for path in (progress.path, progress.final):
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, os.O_RDONLY)
    return None  # the fetch failed and dropped its file
