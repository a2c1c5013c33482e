"""A relayed prefix (agent/download.py 1a) starts the node's one whole-blob hash: the relay's
bytes are hashed once, as they are written, whole-blob readers share that hash as they share
pieces, and the commit hashes from the file only what the relay did not bring. The relay is
unverified, so a wrong relayed byte must never reach a complete body, a range reader or the
cache. The origin's relay and admission are stand-ins here (tests/e2e/test_relay.py runs the
real origin); the two libtorrent sessions are real, as in test_download_swarm."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from shoal import errors, metainfo, protocol
from shoal.swarm import Grant, TorrentJob
from shoal_agent import download as download_module
from shoal_agent import firstcopy
from shoal_agent.download import Collaborators, WholeHash
from shoal_agent.membership import Admitted, Relayed
from tests.integration.test_download_swarm import DATA, DIGEST, Node, finish, start

CHUNK = 64 << 10


class Origin:
    """The origin's side of a relay: `body` in `chunk`-sized chunks, then the admission."""

    def __init__(self, body: bytes, meta: metainfo.Metainfo, chunk: int = CHUNK,
                 taken: Callable[[], bool] | None = None) -> None:
        self.body, self.meta, self.chunk = body, meta, chunk
        self.relayed = asyncio.Event()
        self.taken = taken  # (the admission waits for the node to have written the relay)

    async def relay(self, *_: Any, **__: Any) -> AsyncGenerator[bytes, None]:
        for at in range(0, len(self.body), self.chunk):
            yield self.body[at: at + self.chunk]
            if at % CHUNK == 0:
                await asyncio.sleep(0)  # (a reader gets its turn, as between network reads)
        self.relayed.set()

    async def admit(self, *_: Any, **__: Any) -> Admitted:
        async with asyncio.timeout(60):
            await self.relayed.wait()
            while self.taken is not None and not self.taken():
                await asyncio.sleep(0.01)
        return Admitted(metainfo.Published(self.meta, "signature"), Grant("token", "certificate"), "receipt")


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """test_download_swarm's node, before it joins the swarm: the Download has no torrent yet and
    the partial file does not exist (the fixture's torrent is removed, its handles kept)."""
    async for n in start(tmp_path, DIGEST):
        assert n.deps.swarm is not None
        await n.deps.swarm.remove(DIGEST.hex, delete_files=True)
        n.download.job = n.download.whole = None
        yield n


async def relay_then_join(node: Node, body: bytes, *, window: int = len(DATA)) -> None:
    """The relay of `body` (1a), then the swarm: the torrent checks the relayed file, takes the
    rest from the seeder, and the commit's hash runs (confirm)."""
    job = await relay_then_add(node, body, window=window)
    job.handle.connect_peer(("127.0.0.20", node.seeder_port))
    await finish(node)
    async with asyncio.timeout(60):
        await node.download.confirm(job, node.partial)


async def relay_then_add(node: Node, body: bytes, *, window: int = len(DATA)) -> TorrentJob:
    """The relay of `body` (1a), then the torrent added (it checks the relayed file)."""
    d = node.download
    origin = Origin(body, node.job.meta, taken=lambda: d.written == len(body))
    d.deps = Collaborators(store=d.deps.store, metrics=d.deps.metrics, policy=d.deps.policy,
                           swarm=d.deps.swarm, membership=origin)  # type: ignore[arg-type]
    # readers here are not held back by sockets: keep every chunk, as test_download_swarm does
    d._new_hash = lambda: WholeHash(len(DATA), d.deps.metrics.blob_hash_bytes.labels("download").inc,  # type: ignore[method-assign]
                                    window=window)
    async with asyncio.timeout(60):
        await d._relayed(Relayed(origin, protocol.RelayTicket("ticket")))  # type: ignore[arg-type]
    assert d.written == len(body)
    swarm = node.deps.swarm
    assert swarm is not None
    job = swarm.add(node.job.meta, node.deps.store.downloads_dir, seed=False)
    node.job = job
    d.attach(job)
    return job


async def whole_body(node: Node) -> bytes | errors.IntegrityError:
    out = bytearray()
    try:
        async with asyncio.timeout(60), contextlib.aclosing(node.download.stream(0, len(DATA), whole=True)) as it:
            async for chunk in it:
                out += chunk
    except errors.IntegrityError as exc:
        assert len(out) < len(DATA)  # never the complete body
        return exc
    return bytes(out)


async def test_relayed_bytes_are_hashed_once_for_the_node_and_its_readers(node: Node) -> None:
    """Two clients read the whole blob while it is relayed: neither hashes a byte of its own (they
    borrow the relay's hash), and the commit hashes nothing more (before: each client hashed
    what it read back from the file, and the commit hashed the whole file again)."""
    readers = asyncio.gather(whole_body(node), whole_body(node))
    await relay_then_join(node, DATA)
    assert list(await readers) == [DATA, DATA]
    assert node.hashed("reader") == 0
    assert node.hashed("download") == len(DATA)
    assert node.partial.read_bytes() == DATA


async def test_a_relay_cut_within_a_piece_goes_on_from_the_swarm(node: Node) -> None:
    """The admission ends the relay in the middle of a piece: the hash and a client reading in
    step go on from there with the torrent's pieces (the rest of that piece first), still one
    pass in all."""
    piece = node.job.meta.piece_length
    cut = 2 * piece + piece // 2 + 100
    reader = asyncio.create_task(whole_body(node))
    await relay_then_join(node, DATA[:cut])
    assert await reader == DATA
    assert node.hashed("reader") == 0
    assert node.hashed("download") == len(DATA)


async def test_a_wrong_relayed_byte_reaches_no_complete_body_no_range_reader_and_not_the_cache(
        node: Node) -> None:
    """The relay (unverified) has a byte of piece 2 wrong: libtorrent's check of the file finds
    the piece bad and the seeder sends it again. A client that read the relay gets no complete
    body; a range reader of that piece gets the torrent's bytes, not the relay's kept chunk; the
    hash the relay started does not match, so the file is hashed again whole, and it is the
    blob."""
    piece = node.job.meta.piece_length
    wrong = bytearray(DATA)
    wrong[2 * piece + 5] ^= 0xFF
    reader = asyncio.create_task(whole_body(node))
    await relay_then_join(node, bytes(wrong))
    assert isinstance(await reader, errors.IntegrityError)
    assert node.download.whole is not None and node.download.whole.get(2 * piece, verified=False) is not None
    async with asyncio.timeout(60), contextlib.aclosing(node.download.stream(2 * piece, piece, whole=False)) as it:
        got = b"".join([chunk async for chunk in it])
    assert got == DATA[2 * piece: 3 * piece]
    assert node.hashed("download") == 2 * len(DATA)  # the relay's pass, and the file's
    assert node.partial.read_bytes() == DATA
    # attack21: a whole-blob reader that starts once the torrent has every piece gets the
    # torrent's, not the relay's chunk still kept for that offset
    assert node.job.finished.is_set() and await whole_body(node) == DATA


async def test_the_node_tells_the_origin_which_relayed_pieces_it_verified(node: Node) -> None:
    """Its first first-copy request says how many of the blob's first pieces the torrent's check
    of the relayed file found whole (agent/firstcopy.py): piece 0 only here, as piece 1 has a
    wrong byte (piece 2 is whole, but after the hole) and piece 3 came in part. The origin sends
    those to no one again."""
    piece = node.job.meta.piece_length
    body = bytearray(DATA[:3 * piece + piece // 2])
    body[piece + 5] ^= 0xFF
    job = await relay_then_add(node, bytes(body))
    asked: list[int] = []

    class FirstCopyOrigin:  # (the origin's side: tests/e2e/test_relay.py)
        base = "http://origin.invalid"

        async def first_copy_piece(self, *_: Any, have: int = 0, **__: Any) -> None:
            asked.append(have)  # and every piece has left the origin: 204

    async with asyncio.timeout(60):
        taken = await firstcopy.take(job, FirstCopyOrigin(), "ticket", node.deps.metrics)  # type: ignore[arg-type]
    assert (taken, asked) == (0, [1])
    assert [job.has_piece(i) for i in range(4)] == [True, False, True, False]


async def test_a_cancelled_relay_closes_its_file_only_after_its_last_write(node: Node,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The admission ends the relay (cancels it) while a write runs in its thread: asyncio cannot
    stop the thread, and the relay closed the file descriptor at once, so the write went to a
    closed descriptor, or to whatever file took its number meanwhile."""
    entered, release = threading.Event(), threading.Event()
    outcome: list[object] = []
    real = download_module._pwrite_all

    def held_write(fd: int, data: bytes, offset: int) -> None:
        entered.set()
        release.wait(60)
        try:
            real(fd, data, offset)
            outcome.append("written")
        except OSError as exc:
            outcome.append(exc.errno)

    monkeypatch.setattr(download_module, "_pwrite_all", held_write)
    relay = Relayed(Origin(DATA, node.job.meta), protocol.RelayTicket("ticket"))  # type: ignore[arg-type]
    task = asyncio.create_task(node.download._take_relay(relay, node.partial, WholeHash(len(DATA), lambda _: None)))
    assert await asyncio.to_thread(entered.wait, 60)
    task.cancel()
    for _ in range(20):  # loop turns, not time: the cancellation reaches the relay's `finally`
        await asyncio.sleep(0)
    # attack21: a second cancellation (the download's own, at shutdown) while the first waits
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    closed_before_write = task.done()
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(60):
            await task
    assert not closed_before_write and outcome == ["written"]


async def test_a_relay_that_comes_a_byte_at_a_time_is_kept_in_runs(node: Node) -> None:
    """attack21: the one hash keeps what it took for readers, bounded in bytes (SHARED_WINDOW);
    a relay fed to it a byte at a time (a hostile origin, a trickling registry) kept a million
    entries (bytes and a sha256 state each: 436 MB) per download, and each took a scan to evict.
    The relay is written and hashed in runs of RELAY_RUN bytes, and the entries are bounded too."""
    size = 256 << 10
    whole = WholeHash(len(DATA), lambda _: None)
    relay = Relayed(Origin(DATA[:size], node.job.meta, chunk=1), protocol.RelayTicket("ticket"))  # type: ignore[arg-type]
    async with asyncio.timeout(120):
        await node.download._take_relay(relay, node.partial, whole)
    assert node.download.written == whole.next == size
    assert len(whole._kept) <= size // download_module.RELAY_RUN
    assert node.partial.read_bytes() == DATA[:size]
    # and the bound in entries holds whatever is fed
    tiny = WholeHash(len(DATA), lambda _: None)
    for at in range(4096):
        tiny.feed(at, DATA[at:at + 1], verified=False)
    assert len(tiny._kept) <= download_module.SHARED_CHUNKS
