"""The origin's first copies (origin/firstcopy.py): every piece once, in order, one send at a
time; a failed send handed out again; tickets per node and blob, bounded, gone with the round."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shoal import errors
from shoal.metainfo import Metainfo
from shoal.oci import Digest
from shoal.store import read_exact
from shoal_origin import firstcopy
from shoal_origin.firstcopy import FirstCopies

PIECE = 16 << 10


def blob(tmp_path: Path, size: int, seed: int = 0) -> tuple[Metainfo, Path, bytes]:
    data = os.urandom(size) if seed == 0 else hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    digest = Digest(hashlib.sha256(data).hexdigest())
    path = tmp_path / digest.hex
    path.write_bytes(data)
    return Metainfo(b"", digest, size, PIECE, b"\0" * 32, "http://tracker/announce", ""), path, data


async def take(copies: FirstCopies, ticket: str, digest: Digest, *, deliver: bool = True) -> tuple[int, bytes] | None:
    async with copies.piece(ticket, digest) as lease:
        if lease is None:
            return None
        if deliver:
            lease.delivered()
        return lease.index, lease.data


async def test_every_piece_leaves_once_in_order_to_whoever_asks(tmp_path: Path) -> None:
    meta, path, data = blob(tmp_path, 5 * PIECE + 123)
    copies = FirstCopies(CollectorRegistry())
    a, b = copies.issue("node-a", meta, path), copies.issue("node-b", meta, path)
    assert a is not None and b is not None and a != b
    assert copies.issue("node-a", meta, path) == a  # one ticket per node and round
    got = [await take(copies, t, meta.digest) for t in (a, b, b, a, b, a)]
    assert [g[0] for g in got if g is not None] == [0, 1, 2, 3, 4, 5]
    assert b"".join(g[1] for g in got if g is not None) == data
    assert got[-1] is not None and len(got[-1][1]) == 123  # the last piece is short
    assert await take(copies, a, meta.digest) is None  # every piece left: 204
    assert copies.sent._value.get() == len(data)
    # the round is over: a node admitted now takes the blob from the swarm
    assert copies.issue("node-c", meta, path) is None


async def test_a_piece_a_node_did_not_take_goes_to_the_next(tmp_path: Path) -> None:
    meta, path, _ = blob(tmp_path, 3 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    a = copies.issue("node-a", meta, path)
    assert a is not None
    assert (await take(copies, a, meta.digest, deliver=False) or (-1,))[0] == 0

    async def hang_up() -> None:
        async with copies.piece(a, meta.digest) as lease:
            assert lease is not None and lease.index == 0  # handed out again, first
            raise ConnectionError("node hung up")

    with pytest.raises(ConnectionError):
        await hang_up()
    assert [(await take(copies, a, meta.digest) or (-1,))[0] for _ in range(3)] == [0, 1, 2]
    assert copies.failed._value.get() == 2


async def test_sends_wait_for_each_other(tmp_path: Path) -> None:
    """One piece on its way at a time: a second node's piece waits for the first's send."""
    meta, path, _ = blob(tmp_path, 3 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    a, b = copies.issue("node-a", meta, path), copies.issue("node-b", meta, path)
    assert a is not None and b is not None
    holding, release = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        async with copies.piece(a, meta.digest) as lease:
            assert lease is not None
            holding.set()
            await release.wait()
            lease.delivered()

    first = asyncio.create_task(slow())
    await holding.wait()
    second = asyncio.create_task(take(copies, b, meta.digest))
    for _ in range(5):  # (the steps it could take without waiting: it must take no piece)
        await asyncio.sleep(0)
    assert not second.done() and copies._rounds[meta.digest.hex].cursor == 1
    release.set()
    await first
    assert (await second or (-1,))[0] == 1


async def test_a_ticket_is_for_its_blob_and_holder_only(tmp_path: Path) -> None:
    meta, path, _ = blob(tmp_path, 2 * PIECE)
    other, other_path, _ = blob(tmp_path, 2 * PIECE, seed=7)
    copies = FirstCopies(CollectorRegistry())
    a = copies.issue("node-a", meta, path)
    assert a is not None
    for ticket, digest in (("", meta.digest), ("made-up", meta.digest), (a, other.digest)):
        with pytest.raises(errors.Denied):
            await take(copies, ticket, digest)
    assert copies.issue("node-a", other, other_path) not in (None, a)


async def test_rounds_are_forgotten_after_a_while_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, path, _ = blob(tmp_path, PIECE)
    copies = FirstCopies(CollectorRegistry())
    a = copies.issue("node-a", meta, path)
    assert a is not None and await take(copies, a, meta.digest) is not None
    assert copies.issue("node-b", meta, path) is None  # done, remembered
    monkeypatch.setattr(firstcopy, "ROUND_MEMORY", -1.0)
    fresh = copies.issue("node-b", meta, path)  # forgotten: a new round, and the old ticket with it
    assert fresh is not None
    with pytest.raises(errors.Denied):
        await take(copies, a, meta.digest)
    monkeypatch.setattr(firstcopy, "ROUND_MEMORY", 600.0)
    monkeypatch.setattr(firstcopy, "MAX_TICKETS", 2)
    assert copies.issue("node-c", meta, path) is not None
    assert copies.issue("node-d", meta, path) is None  # no room: the node takes the swarm's way
    monkeypatch.setattr(firstcopy, "MAX_ROUNDS", 1)
    other, other_path, _ = blob(tmp_path, PIECE, seed=9)
    assert copies.issue("node-e", other, other_path) is not None  # the oldest round made room
    with pytest.raises(errors.Denied):
        await take(copies, fresh, meta.digest)


async def test_a_blob_gone_from_the_store_ends_its_round(tmp_path: Path) -> None:
    meta, path, _ = blob(tmp_path, 2 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    a = copies.issue("node-a", meta, path)
    assert a is not None
    path.unlink()
    assert await take(copies, a, meta.digest) is None
    assert copies.issue("node-b", meta, path) is None


def paced() -> tuple[FirstCopies, list[float], list[float]]:
    """First copies paced at a piece a second on a clock of the test's (so nothing is timed):
    the clock, and the waits asked for."""
    clock = [1000.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    return FirstCopies(CollectorRegistry(), rate=PIECE, clock=lambda: clock[0], sleep=sleep), clock, waits


async def test_sends_keep_to_the_seeders_upload_limit(tmp_path: Path) -> None:
    """An operator's torrent.upload_rate_limit holds for the first copies too: each send starts
    when the bytes before it are due at that rate (a clock of the test's, so nothing is timed)."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    copies, clock, waits = paced()
    a = copies.issue("node-a", meta, path)
    assert a is not None
    for _ in range(4):
        assert await take(copies, a, meta.digest) is not None
    assert waits == [1.0, 1.0, 1.0]  # the first at once, then a piece a second
    clock[0] += 10.0  # idle for a while: no burst is saved up beyond the next piece
    other, other_path, _ = blob(tmp_path, 2 * PIECE, seed=3)
    b = copies.issue("node-b", other, other_path)
    assert b is not None
    for _ in range(2):
        assert await take(copies, b, other.digest) is not None
    assert waits == [1.0, 1.0, 1.0, 1.0]


async def hold(copies: FirstCopies, ticket: str, digest: Digest, entered: asyncio.Event,
               release: asyncio.Event) -> None:
    async with copies.piece(ticket, digest) as lease:
        assert lease is not None
        entered.set()
        await release.wait()
        lease.delivered()


async def held(meta: Metainfo, path: Path) -> tuple[FirstCopies, str, asyncio.Task[None], asyncio.Event]:
    """First copies whose lock node-a holds until the event is set: and node-b's ticket."""
    copies = FirstCopies(CollectorRegistry())
    a, b = copies.issue("node-a", meta, path), copies.issue("node-b", meta, path)
    assert a is not None and b is not None
    entered, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(copies, a, meta.digest, entered, release))
    await entered.wait()
    return copies, b, holder, release


async def test_a_ticket_has_one_request_at_a_time_and_waiters_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """attack (helper-51 #1, #2): a node's requests that wait for their turn held a connection and
    their request each, unbounded: 7,072 hung-up requests of one ticket raised the origin's RSS by
    388 MiB, and max_connections of them left no connection for any other node. Now a ticket
    has one request in progress, and MAX_WAITING wait over every round (503 past either)."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    a, b, c = (copies.issue(n, meta, path) for n in ("node-a", "node-b", "node-c"))
    assert a is not None and b is not None and c is not None
    monkeypatch.setattr(firstcopy, "MAX_WAITING", 1)
    entered, release = asyncio.Event(), asyncio.Event()
    holder = asyncio.create_task(hold(copies, a, meta.digest, entered, release))
    await entered.wait()
    with pytest.raises(errors.Unavailable, match="in progress"):
        await take(copies, a, meta.digest)  # the same ticket, again
    waiter = asyncio.create_task(take(copies, b, meta.digest))
    for _ in range(5):
        await asyncio.sleep(0)  # (its steps up to the wait for its turn)
    assert copies._waiting == 1 and not waiter.done()
    with pytest.raises(errors.Unavailable, match="too many"):
        await take(copies, c, meta.digest)
    release.set()
    await holder
    assert (await waiter or (-1,))[0] == 1
    assert copies._waiting == 0 and not copies._rounds[meta.digest.hex].busy


async def test_a_node_that_hung_up_while_it_waited_takes_no_piece(tmp_path: Path) -> None:
    """attack (helper-51 #1): aiohttp goes on with a handler whose client hung up; such a request
    still read a piece (up to 4 MiB) when its turn came, failed to send it and handed it out
    again. Now it takes none."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    copies, b, holder, release = await held(meta, path)

    async def gone() -> None:
        async with copies.piece(b, meta.digest, alive=lambda: False):
            raise AssertionError("a piece for a node that hung up")

    waiter = asyncio.create_task(gone())
    for _ in range(5):
        await asyncio.sleep(0)
    release.set()
    await holder
    with pytest.raises(ConnectionError):
        await waiter
    r = copies._rounds[meta.digest.hex]
    assert r.cursor == 1 and not r.again and copies.failed._value.get() == 0


async def test_a_turn_that_does_not_come_in_time_is_a_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, path, _ = blob(tmp_path, 2 * PIECE)
    copies, b, holder, release = await held(meta, path)
    monkeypatch.setattr(firstcopy, "WAIT_TIMEOUT", 0.01)  # (the holder never lets go before it)
    with pytest.raises(errors.Unavailable, match="in time"):
        await take(copies, b, meta.digest)
    release.set()
    await holder
    assert copies._waiting == 0 and (await take(copies, b, meta.digest) or (-1,))[0] == 1


async def test_a_piece_nobody_takes_cannot_keep_a_round_open(tmp_path: Path) -> None:
    """attack (helper-51 #4): every failed send handed its piece out again and renewed the round,
    so a node that took pieces and hung up kept it open and remembered for ever: every node
    admitted later got a ticket and was kept from the seeder until it stalled. Now a piece is
    handed out MAX_HANDOUTS times at most, and only admissions and delivered pieces renew."""
    meta, path, _ = blob(tmp_path, 2 * PIECE)
    clock = [1000.0]
    copies = FirstCopies(CollectorRegistry(), clock=lambda: clock[0])
    a = copies.issue("node-a", meta, path)
    assert a is not None
    for _ in range(firstcopy.MAX_HANDOUTS):
        assert (await take(copies, a, meta.digest, deliver=False) or (-1,))[0] == 0
    assert (await take(copies, a, meta.digest) or (-1,))[0] == 1  # piece 0 is left to the seeder
    assert await take(copies, a, meta.digest) is None
    # failed sends renew nothing: a round whose last delivered piece is older than ROUND_MEMORY
    # is forgotten, however many failed since
    other, other_path, _ = blob(tmp_path, 2 * PIECE, seed=5)
    b = copies.issue("node-b", other, other_path)
    assert b is not None and await take(copies, b, other.digest) is not None
    for _ in range(firstcopy.MAX_HANDOUTS - 1):
        clock[0] += firstcopy.ROUND_MEMORY / firstcopy.MAX_HANDOUTS
        assert await take(copies, b, other.digest, deliver=False) is not None
    clock[0] += firstcopy.ROUND_MEMORY / firstcopy.MAX_HANDOUTS + 1
    assert copies.issue("node-c", meta, path) is not None  # (a new round of the first blob)
    with pytest.raises(errors.Denied):
        await take(copies, b, other.digest)


async def test_a_passing_read_error_hands_the_piece_out_again(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """attack (helper-51 #5): any read error (EMFILE, EIO) ended the round as if the blob were
    gone, for ten minutes. Now only a missing or short file does; another error is a 503 and
    the piece goes out again."""
    meta, path, data = blob(tmp_path, 2 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    a = copies.issue("node-a", meta, path)
    assert a is not None
    def once(p: Path, offset: int, length: int) -> bytes:
        monkeypatch.setattr(firstcopy, "read_exact", read_exact)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(firstcopy, "read_exact", once)
    with pytest.raises(errors.Unavailable):
        await take(copies, a, meta.digest)
    assert await take(copies, a, meta.digest) == (0, data[:PIECE])


async def test_a_send_that_failed_does_not_spend_the_pace(tmp_path: Path) -> None:
    """attack (helper-51 #3): the pace was charged before the send and kept when it failed (50
    failed sends spent 49 s of every blob's budget); and it was waited for with the piece read."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    copies, _, waits = paced()
    a = copies.issue("node-a", meta, path)
    assert a is not None
    for _ in range(firstcopy.MAX_HANDOUTS - 1):
        assert await take(copies, a, meta.digest, deliver=False) is not None
    assert waits == []  # nothing was sent: nothing to wait for
    assert await take(copies, a, meta.digest) is not None
    assert await take(copies, a, meta.digest) is not None
    assert waits == [1.0]


async def have(copies: FirstCopies, ticket: str, digest: Digest, count: int) -> int | None:
    """The first request of a node that says it has pieces 0 to `count` - 1: the index sent."""
    async with copies.piece(ticket, digest, have=count) as lease:
        if lease is None:
            return None
        lease.delivered()
        return lease.index


async def test_a_relays_pieces_go_last_and_to_no_one_once_its_node_has_them(tmp_path: Path) -> None:
    meta, path, data = blob(tmp_path, 8 * PIECE + 5)
    copies = FirstCopies(CollectorRegistry())
    # the relay sent 4.5 pieces while the origin fetched the blob: the round starts after them
    copies.relayed("relayed", meta.digest, 4 * PIECE + PIECE // 2)
    relayed, other = copies.issue("relayed", meta, path), copies.issue("other", meta, path)
    assert relayed is not None and other is not None
    assert (await take(copies, other, meta.digest) or (-1,))[0] == 4
    # its node says it verified 6: the 4 the relay sent whole are sent to no one (its bound)
    assert await have(copies, relayed, meta.digest, 6) == 5
    assert copies.skipped._value.get() == 4 * PIECE
    # told once: a second claim skips nothing more
    assert await have(copies, relayed, meta.digest, 8) == 6
    got = [(await take(copies, t, meta.digest) or (-1,))[0] for t in (other, relayed)]
    assert got == [7, 8]
    assert await take(copies, other, meta.digest) is None
    assert copies.sent._value.get() + copies.skipped._value.get() == len(data)


async def test_a_relays_pieces_still_go_out_last_if_its_node_never_says(tmp_path: Path) -> None:
    """The relay's count is of bytes written to its socket, which its node may never have read:
    they are deferred, not skipped, on that count alone. A node the relay did not serve skips
    nothing with its claim."""
    meta, path, data = blob(tmp_path, 4 * PIECE + 9)
    copies = FirstCopies(CollectorRegistry())
    copies.relayed("relayed", meta.digest, 2 * PIECE + 1)
    liar = copies.issue("liar", meta, path)
    assert liar is not None
    assert await have(copies, liar, meta.digest, 5) == 2
    got = [(await take(copies, liar, meta.digest) or (-1,))[0] for _ in range(5)]
    assert got == [3, 4, 0, 1, -1]
    assert copies.sent._value.get() == len(data) and copies.skipped._value.get() == 0


async def test_a_relay_of_the_whole_blob_leaves_nothing_to_send_once_its_node_says(tmp_path: Path) -> None:
    meta, path, _ = blob(tmp_path, 3 * PIECE + 7)
    copies = FirstCopies(CollectorRegistry())
    copies.relayed("relayed", meta.digest, 3 * PIECE)
    relayed = copies.issue("relayed", meta, path)
    assert relayed is not None
    copies.relayed("relayed", meta.digest, 3 * PIECE + 7)  # (a last write, after the round began)
    assert await have(copies, relayed, meta.digest, 4) is None
    assert copies.skipped._value.get() == 3 * PIECE + 7 and copies.sent._value.get() == 0


async def test_a_relayed_piece_whose_send_failed_is_not_handed_out_again(tmp_path: Path) -> None:
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    copies.relayed("relayed", meta.digest, 2 * PIECE)
    other, relayed = copies.issue("other", meta, path), copies.issue("relayed", meta, path)
    assert other is not None and relayed is not None
    assert [(await take(copies, other, meta.digest) or (-1,))[0] for _ in range(2)] == [2, 3]
    assert (await take(copies, other, meta.digest, deliver=False) or (-1,))[0] == 0  # (to go again)
    assert await have(copies, relayed, meta.digest, 2) is None
    assert copies.skipped._value.get() == 2 * PIECE  # piece 0 (failed, waiting) and piece 1


async def test_held_back_pieces_the_relays_node_lacks_go_out_next(tmp_path: Path) -> None:
    """The relay wrote 4 pieces to its socket; its node read (and verified) 1: piece 0 is sent to
    no one, pieces 1-3 go out before the rest. Asking with no count, all 4 go out next."""
    meta, path, _ = blob(tmp_path, 8 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    copies.relayed("relayed", meta.digest, 4 * PIECE)
    relayed, other = copies.issue("relayed", meta, path), copies.issue("other", meta, path)
    assert relayed is not None and other is not None
    assert (await take(copies, other, meta.digest) or (-1,))[0] == 4
    assert await have(copies, relayed, meta.digest, 1) == 1
    got = [(await take(copies, t, meta.digest) or (-1,))[0] for t in (other, relayed) * 4]
    assert got == [2, 3, 5, 6, 7, -1, -1, -1]
    assert copies.skipped._value.get() == PIECE

    meta, path, _ = blob(tmp_path, 6 * PIECE, seed=7)
    copies.relayed("relayed", meta.digest, 4 * PIECE)
    relayed = copies.issue("relayed", meta, path)
    assert relayed is not None
    got = [(await take(copies, relayed, meta.digest) or (-1,))[0] for _ in range(7)]
    assert got == [0, 1, 2, 3, 4, 5, -1]


async def test_a_relay_while_an_earlier_round_is_remembered_holds_nothing_back_later(tmp_path: Path) -> None:
    """The blob was evicted and fetched again (relayed) while its last round was remembered: that
    relay is not kept for the round after it, whose nodes may be others."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    clock = [0.0]
    copies = FirstCopies(CollectorRegistry(), clock=lambda: clock[0])
    a = copies.issue("a", meta, path)
    assert a is not None
    copies.relayed("b", meta.digest, 3 * PIECE)
    clock[0] += firstcopy.ROUND_MEMORY + 1  # the round is forgotten
    c = copies.issue("c", meta, path)
    assert c is not None
    assert (await take(copies, c, meta.digest) or (-1,))[0] == 0


async def test_a_relay_of_a_fetch_that_failed_holds_nothing_back_in_a_later_round(tmp_path: Path) -> None:
    """A relay whose fetch failed (no round followed it) is not the relay of the next fetch."""
    meta, path, _ = blob(tmp_path, 4 * PIECE)
    clock = [0.0]
    copies = FirstCopies(CollectorRegistry(), clock=lambda: clock[0])
    copies.relayed("relayed", meta.digest, 3 * PIECE)
    clock[0] += firstcopy.RELAY_RECORD_TTL + 1
    relayed, other = copies.issue("relayed", meta, path), copies.issue("other", meta, path)
    assert relayed is not None and other is not None
    assert (await take(copies, other, meta.digest) or (-1,))[0] == 0
    assert await have(copies, relayed, meta.digest, 4) == 1
    assert copies.skipped._value.get() == 0


async def test_the_relays_node_is_heard_once(tmp_path: Path) -> None:
    """A relay write the origin finished after its node's first request (it read slowly) raises
    the relay's count: neither a second claim nor the next round skips more."""
    meta, path, _ = blob(tmp_path, 8 * PIECE)
    copies = FirstCopies(CollectorRegistry())
    copies.relayed("relayed", meta.digest, 2 * PIECE)
    relayed = copies.issue("relayed", meta, path)
    assert relayed is not None
    assert await have(copies, relayed, meta.digest, 8) == 2
    copies.relayed("relayed", meta.digest, 6 * PIECE)
    assert await have(copies, relayed, meta.digest, 8) == 3
    assert copies.skipped._value.get() == 2 * PIECE
