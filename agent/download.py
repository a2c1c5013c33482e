"""Blob downloads: one flight per digest, swarm first, the registry when the swarm cannot deliver.

A `Download` runs in the background (a client hanging up does not stop it) and every local
client reading the blob attaches to it:

1. admission at the origin, for the credential the registry accepted for the client
   (agent/membership.py), which answers with the metainfo and this node's grant for the blob's
   swarm (seeding the blob first if needed); a blob smaller than `threshold` is not worth that:
   it comes from the swarm only if the origin seeds it already, else from the registry;
   1a. a blob the origin is still to fetch: it answers at once with a relay ticket, and the
   bytes of its fetch stream into the file libtorrent will use (whole-blob readers take them
   as they come, unverified, as from the registry) until the next admission brings the
   metainfo; libtorrent then checks the file and keeps every whole piece that matches. The
   relayed bytes start the node's one hash (below) as they are written;
2. join the swarm, with deadlines: a first verified piece within `first_piece_timeout`, then
   no gap longer than `stall_timeout`;
3. once complete: flush, sha256 the file from disk, let libtorrent rename it into `blobs/`
   (it keeps seeding from there), fsync, index;
4. on any swarm failure (origin away, not admitted, no peers, stall, bad metainfo, digest
   mismatch) the agent fetches the blob from the registry itself, verifies and caches it, and
   seeds it if it was admitted.

Readers get verified pieces in order as they land (and the cached file once it exists); a
reader of the whole blob holds back the last chunk until the sha256 of what it sent matches the
digest, so no client ever receives a complete body that is wrong.

On the swarm path that sha256 is computed once per node (`WholeHash`), not once per reader and
again before the cache: the download hashes each verified piece, in order, the first time it is
read for a client; a whole-blob reader that sends exactly those pieces (the same bytes objects)
borrows the hash's state instead of hashing them again, and the cache takes the file on the
strength of that one hash. What no client read is hashed from the flushed file before the blob
is committed (as the whole file was before). A reader that falls behind the few pieces kept
for it hashes the rest on its own, from the state it had. A relayed prefix (1a) is hashed as it
is written, and whole-blob readers share it the same way; if libtorrent's check of the file
replaced a relayed piece, the hash does not match and the file is hashed again whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from shoal import errors
from shoal.clients import ApiError
from shoal.oci import Digest
from shoal.registry import Authorization
from shoal.store import BlobStore, fsync_file, read_exact, sha256_file, stamp_of
from shoal.swarm import PeerBytes, Swarm, TorrentJob
from shoal_agent import firstcopy
from shoal_agent.config import SwarmPolicy
from shoal_agent.files import read_file
from shoal_agent.membership import Admitted, Membership, Relayed, SwarmFailure
from shoal_agent.metrics import AgentMetrics, DownloadSource, FallbackReason
from shoal_agent.upstreams import Upstream

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger(__name__)
T = TypeVar("T")

EMPTY_DIGEST = Digest(hashlib.sha256(b"").hexdigest())
# A reader gives up when nothing at all happens for this long; the download's own deadlines
# normally end a dead path much sooner.
READER_SAFETY_TIMEOUT = 600.0
# Bytes per read of a partial download from the registry or the origin's relay (not hashed piece
# by piece, so every whole-blob reader reads and hashes its own): 64 clients of relayed blobs held
# 15-20 MB more at 256 KiB (FILE_CHUNK) than the same clients of swarm pieces, which they share.
READ_CHUNK = 64 << 10
# An origin that does not take the relay's connection in this long is not worth a head start.
RELAY_CONNECT_TIMEOUT = 5.0
# The relay's bytes are written and hashed in runs of at least this many (a BitTorrent block):
# each run is one entry the one hash keeps for readers, and a relay that came a byte at a time
# (a hostile origin, a registry trickling) kept a million entries, 436 MB, per download.
RELAY_RUN = 16 << 10
# While no piece has arrived, re-announce this often to pick up peers that joined after us.
ANNOUNCE_RETRY = 1.5
# Pieces the whole-blob hash took are kept this long (bytes, at least two pieces) for readers
# just behind the first: clients pulling at once stay within a piece or two of each other (a
# reader further behind hashes on its own, as every reader used to), and every kept byte no
# reader holds any more is memory per download in flight (a node pulls several layers at once).
SHARED_WINDOW = 1 << 20
# and at most this many chunks (pieces are 16 KiB at least, and so are the relay's runs)
SHARED_CHUNKS = 128


class WholeHash:
    """The blob's sha256, once per node, over its bytes fed in order: the relay's chunks as they
    are written (1a), then verified pieces (or the rest of a piece after a relayed prefix).

    Each chunk fed is kept a while (SHARED_WINDOW) with a copy of the hash's state after it: a
    reader that sends exactly that bytes object right after the previous kept one borrows the
    state instead of hashing the chunk itself (see _Sent). A relayed chunk is kept marked
    unverified: only a whole-blob reader, which holds back its end until the digest matches,
    may send it."""

    def __init__(self, size: int, on_hashed: Callable[[int], None], window: int = SHARED_WINDOW) -> None:
        self.size = size
        self.next = 0  # the offset the hash takes next
        self.relayed = 0  # bytes of the hash that came from the relay (not read from the torrent)
        self._sha = hashlib.sha256()
        # offset -> (the bytes fed there, the state after them, whether they are verified pieces)
        self._kept: OrderedDict[int, tuple[bytes, Hash, bool]] = OrderedDict()
        self._kept_bytes = 0
        self._window = window
        self._on_hashed = on_hashed
        # Whole-blob readers in step with the hash (see _Sent): while one is, it feeds the hash
        # as it goes, and the download waits for it rather than hash ahead of it from the file
        # (the reader would then have to hash what it sends on its own: two passes again).
        self.followers = 0
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def leave(self) -> None:
        """A follower fell out of step or stopped reading."""
        self.followers -= 1
        self._notify()

    async def wait_change(self, within: float) -> bool:
        """Whether a chunk was fed or a follower left within `within` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), within)
        except TimeoutError:
            return False
        return True

    def get(self, offset: int, *, verified: bool) -> tuple[bytes, Hash] | None:
        """The chunk kept at `offset` and the state after it (with `verified`: only a verified one)."""
        kept = self._kept.get(offset)
        if kept is None or (verified and not kept[2]):
            return None
        return kept[0], kept[1]

    def feed(self, offset: int, data: bytes, *, verified: bool = True) -> tuple[bytes, Hash] | None:
        """Take `data` if it is the blob's next bytes; its entry (or None: not the next ones)."""
        if offset != self.next or not data or offset + len(data) > self.size:
            return None
        self._sha.update(data)
        self._on_hashed(len(data))
        self.next += len(data)
        if not verified:
            self.relayed += len(data)
        self._notify()
        state = self._sha.copy()
        self._kept[offset] = (data, state, verified)
        self._kept_bytes += len(data)
        while (self._kept_bytes > self._window or len(self._kept) > SHARED_CHUNKS) and len(self._kept) > 2:
            self._kept_bytes -= len(self._kept.popitem(last=False)[1][0])
        return data, state

    @property
    def complete(self) -> bool:
        return self.next == self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _Sent:
    """The sha256 of what one whole-blob reader has sent. While every chunk it sent was one the
    download's WholeHash took, in order (the same objects), it holds that hash's state after the
    last one; from its first other chunk on, it hashes on its own from there."""

    def __init__(self, on_hashed: Callable[[int], None]) -> None:
        self.state = hashlib.sha256()
        self.borrowed = False  # `state` is a WholeHash entry's: never updated in place
        self.in_step = True
        self._on_hashed = on_hashed

    def take(self, chunk: bytes, shared: Hash | None) -> None:
        if shared is not None and self.in_step:
            self.state, self.borrowed = shared, True
            return
        self.in_step = False
        if self.borrowed:
            self.state, self.borrowed = self.state.copy(), False
        self.state.update(chunk)
        self._on_hashed(len(chunk))


@dataclass(frozen=True, slots=True)
class Collaborators:
    """What a download works with, and nothing more (it does not see the Fetcher)."""

    store: BlobStore
    metrics: AgentMetrics
    policy: SwarmPolicy
    swarm: Swarm | None = None
    membership: Membership | None = None  # with `swarm`: how to find a blob's metainfo


class Download:
    def __init__(self, deps: Collaborators, upstream: Upstream, repo: str, digest: Digest, size: int,
                 authorization: Authorization) -> None:
        self.deps = deps
        self.upstream = upstream
        self.repo = repo
        self.digest = digest
        self.size = size
        # The credential of the client that started it (authorized for this blob): used if the
        # blob has to come from the registry.
        self.authorization = authorization
        # While the blob comes straight from the registry: the file being written and how much of
        # it is there (a whole-blob reader streams it, holding back the end until the digest matches).
        self.partial: Path | None = None
        self.written = 0
        self.job: TorrentJob | None = None
        # With `job`: the blob's one sha256 (see WholeHash)
        self.whole: WholeHash | None = None
        self.source: DownloadSource = "peers"
        # The registries known to hold these bytes (agent/provenance.py), kept with the blob: the
        # one it is fetched from, or those the origin vouched for.
        self.sources: set[str] = set()
        self.error: errors.ShoalError | None = None
        # Why the swarm path was given up for the registry, if it was (the journal records it)
        self.fallback: FallbackReason | None = None
        self.done = asyncio.Event()
        # Set once bytes are on their way (the swarm joined, the relay or the registry's answer
        # started) or the download ended.
        self.chosen = asyncio.Event()
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # ----- reading ------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)

    def path(self) -> Path | None:
        store = self.deps.store
        return store.path(self.digest) if store.has(self.digest) else None

    async def stream(self, offset: int, length: int, *, whole: bool) -> AsyncGenerator[bytes, None]:
        store, metrics = self.deps.store, self.deps.metrics
        sent = _Sent(metrics.blob_hash_bytes.labels("reader").inc) if whole else None
        pos, end = offset, offset + length
        follows = self.whole if whole else None
        if follows is not None:
            follows.followers += 1
        try:
            with store.pinned(self.digest):  # what is being served is never evicted under the client
                async with contextlib.aclosing(self._stream(pos, end, whole=whole)) as chunks:
                    async for chunk, shared in chunks:
                        # Hash before releasing: the chunk that completes the blob goes out only if
                        # the whole blob matches its digest.
                        if sent is not None:
                            sent.take(chunk, shared)
                            if follows is not None and not sent.in_step:
                                follows.leave()
                                follows = None
                            if pos + len(chunk) == end and sent.state.hexdigest() != self.digest.hex:
                                metrics.integrity_failures.labels(self.source).inc()
                                raise errors.IntegrityError(f"streamed bytes of {self.digest} do not match it")
                        pos += len(chunk)
                        yield chunk
        finally:
            if follows is not None:
                follows.leave()

    async def _stream(self, pos: int, end: int, *, whole: bool) -> AsyncGenerator[tuple[bytes, Hash | None], None]:
        """(chunk, the WholeHash state after it if the chunk is a piece that hash took, else None)"""
        store = self.deps.store
        last_progress = time.monotonic()
        while pos < end:
            if store.has(self.digest):
                async with contextlib.aclosing(read_file(store.path(self.digest), pos, end - pos)) as chunks:
                    async for chunk in chunks:
                        yield chunk, None
                        pos += len(chunk)
                return
            job, shared = self.job, self.whole
            # A chunk the one hash took at `pos`: a verified one unless this reader checks the
            # whole blob (a relayed chunk is unverified, see WholeHash), and once the torrent has
            # every piece, verified ones only (libtorrent may have replaced a wrong relayed piece:
            # a reader starting then must not fail on the relay's bytes).
            verified = not whole or (job is not None and job.finished.is_set())
            entry = shared.get(pos, verified=verified) if shared is not None else None
            if entry is not None:
                data, kept = entry
                chunk = data[: end - pos]
                yield chunk, kept if len(chunk) == len(data) else None
                pos += len(chunk)
                last_progress = time.monotonic()
                continue
            if job is not None and job.failed is None:
                index = pos // job.meta.piece_length
                if job.has_piece(index):
                    start = pos - index * job.meta.piece_length
                    try:
                        data = await job.read_piece(index)
                    except errors.SwarmUnavailable:
                        continue  # the torrent went away (fallback): the file will come
                    data = data[start:] if start else data
                    state = None
                    if shared is not None:
                        # another reader may have fed it meanwhile: then theirs is the one hashed
                        entry = shared.get(pos, verified=True) or shared.feed(pos, data)
                        if entry is not None:
                            data, state = entry
                    chunk = data[: end - pos]
                    if not chunk:
                        raise errors.IntegrityError(f"piece {index} of {self.digest} is short")
                    yield chunk, state if len(chunk) == len(data) else None
                    pos += len(chunk)
                    last_progress = time.monotonic()
                    continue
                job.want(index)
            if whole and self.partial is not None and pos < self.written:
                # From the registry, or relayed bytes the hash no longer keeps: not verified piece
                # by piece, so only a whole-blob reader takes them, and its last chunk waits for
                # the digest (see stream).
                try:
                    chunk = await asyncio.to_thread(_pread, self.partial, pos, min(self.written, end) - pos)
                except FileNotFoundError:
                    continue  # renamed into the cache (or dropped): look again
                if chunk:
                    yield chunk, None
                    pos += len(chunk)
                    last_progress = time.monotonic()
                    continue
            if self.done.is_set() and not store.has(self.digest):
                raise self.error or errors.SwarmUnavailable("download ended without the blob")
            if time.monotonic() - last_progress > READER_SAFETY_TIMEOUT:
                raise errors.SwarmUnavailable("no progress on the blob")
            await self._wait(1.0)

    # ----- the download -------------------------------------------------------------------------

    async def run(self) -> None:
        store = self.deps.store
        started = time.monotonic()
        try:
            with store.pinned(self.digest), store.reservation(self.size):
                await store.make_room()
                await store.ensure_free(self.size)
                admitted: Admitted | None = None
                if self.deps.membership is not None:
                    try:
                        small = self.size < self.deps.policy.threshold
                        answer = await self.deps.membership.admit(
                            self.upstream, self.repo, self.digest, self.authorization,
                            seeded_only=small, relay=not small)
                        admitted = await self._relayed(answer) if isinstance(answer, Relayed) else answer
                        if admitted is not None:
                            self.sources.add(self.upstream.name)  # the origin vouched for it
                            await self._from_swarm(admitted)
                            self._finish("peers", started)
                            return
                    except (errors.SwarmUnavailable, errors.IntegrityError) as exc:
                        reason: FallbackReason = exc.reason if isinstance(exc, SwarmFailure) else \
                            "integrity" if isinstance(exc, errors.IntegrityError) else "swarm_error"
                        self.deps.metrics.fallbacks.labels(reason).inc()
                        self.fallback = reason
                        # A relayed prefix (1a) the swarm did not take (a metainfo that does not
                        # describe the blob is refused before libtorrent has the file): nothing
                        # else removes it before the next start, and the store does not count it.
                        self.partial = self.whole = None
                        await asyncio.to_thread((store.downloads_dir / self.digest.hex).unlink, missing_ok=True)
                        log.warning("swarm could not deliver %s (%s); fetching from the registry",
                                    self.digest, exc)
                await self._from_registry(admitted)
                self._finish("registry", started)
        except errors.ShoalError as exc:
            self.error = exc
            self.deps.metrics.downloads.labels(self.source, "failed").inc()
            log.warning("download of %s failed: %s", self.digest, exc)
        except OSError as exc:
            # a full or failing disk: nothing partial stays (see _from_registry), clients get 503
            self.error = errors.StoreFull(f"cannot write the blob to the cache: {exc.strerror}")
            self.deps.metrics.downloads.labels(self.source, "failed").inc()
            log.error("download of %s failed writing to disk: %s", self.digest, exc.strerror)
        except asyncio.CancelledError:
            self.error = errors.UpstreamError("agent shutting down")
            raise
        except Exception as exc:
            log.exception("download of %s failed", self.digest)
            self.error = errors.ShoalError(f"internal error: {type(exc).__name__}")
        finally:
            self.done.set()
            self.chosen.set()
            self._notify()
        await store.make_room()

    async def _relayed(self, relayed: Relayed) -> Admitted:
        """The admission once the origin seeds the blob; meanwhile the bytes of its fetch, into
        the file libtorrent will check when it joins the swarm (see the module's 1a)."""
        membership = self.deps.membership
        assert membership is not None
        partial = self.deps.store.downloads_dir / self.digest.hex
        self.partial, self.written = partial, 0
        # The relay sends the bytes the origin fetches from this registry (it sends nothing if
        # it fetches from another): this registry's bytes, as on the registry path.
        self.sources.add(self.upstream.name)
        # The relay's bytes start the one hash (readers share it as they share pieces, and the
        # commit hashes from the file only what the relay did not bring).
        whole = self.whole = self._new_hash()
        self.chosen.set()
        self._notify()
        relay = asyncio.create_task(self._take_relay(relayed, partial, whole))
        relay.add_done_callback(lambda t: t.cancelled() or t.exception())  # (its end is logged in it)
        try:
            answer = await membership.admit(self.upstream, self.repo, self.digest, self.authorization)
            if not isinstance(answer, Admitted):
                raise SwarmFailure("origin_error", "the origin did not answer the admission with the metainfo")
            return answer
        except BaseException:
            self.partial = self.whole = None  # (readers must not spin on a file that is going away)
            await asyncio.to_thread(partial.unlink, missing_ok=True)
            raise
        finally:
            relay.cancel()
            # (wait, not gather: a cancellation of this download must not cancel the relay again
            # while its last write runs, see _in_thread)
            await asyncio.wait({relay})

    async def _take_relay(self, relayed: Relayed, partial: Path, whole: WholeHash) -> None:
        fd = await _in_thread(os.open, partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, undo=os.close)
        run: list[bytes] = []
        run_bytes = 0

        async def write_run() -> None:
            nonlocal run, run_bytes
            data = run[0] if len(run) == 1 else b"".join(run)
            run, run_bytes = [], 0
            await _in_thread(_pwrite_all, fd, data, self.written)
            whole.feed(self.written, data, verified=False)
            self.written += len(data)
            self.deps.metrics.relay_bytes.inc(len(data))
            self._notify()

        try:
            chunks = relayed.origin.relay(self.digest, relayed.ticket, connect=RELAY_CONNECT_TIMEOUT,
                                          idle=self.deps.policy.stall_timeout)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if self.written + run_bytes + len(chunk) > self.size:
                        log.warning("the origin relayed more than the %d bytes of %s: relay dropped", self.size,
                                    self.digest)
                        return
                    run.append(chunk)
                    run_bytes += len(chunk)
                    if run_bytes >= RELAY_RUN:
                        await write_run()
            if run:
                await write_run()
        except (aiohttp.ClientError, TimeoutError, ApiError, OSError) as exc:
            # a head start lost, nothing more: the swarm brings the blob (a full disk fails it too)
            log.info("relay of %s ended after %d bytes: %s", self.digest, self.written, exc)
        finally:
            os.close(fd)
            log.debug("relay of %s: %d bytes", self.digest, self.written)

    def _finish(self, source: DownloadSource, started: float) -> None:
        self.source = source
        elapsed = time.monotonic() - started
        m = self.deps.metrics
        m.downloads.labels(source, "ok").inc()
        m.download_seconds.labels(source).observe(elapsed)
        log.info("cached %s (%d bytes) from %s in %.2fs", self.digest, self.size, source, elapsed)

    async def _from_swarm(self, admitted: Admitted) -> None:
        published = admitted.published
        meta = published.meta
        swarm = self.deps.swarm
        assert swarm is not None
        if meta.digest != self.digest or meta.size != self.size:
            raise SwarmFailure("bad_metainfo", "metainfo does not describe this blob")
        store, policy = self.deps.store, self.deps.policy
        job = swarm.add(meta, store.downloads_dir, seed=False, grant=admitted.grant,
                        first_copy=admitted.first_copy is not None)
        self.attach(job)
        moved = False
        share: asyncio.Task[int] | None = None
        if admitted.first_copy is not None:
            origin, ticket = admitted.first_copy
            share = asyncio.create_task(firstcopy.take(job, origin, ticket, self.deps.metrics))
        try:
            joined = last_announce = time.monotonic()
            relayed = self.written > 0  # pieces of a relayed prefix (1a) came from no peer

            def nothing_from_peers() -> bool:
                return job.have_count == 0 or (relayed and job.peer_bytes == PeerBytes())

            while not job.finished.is_set():
                if job.failed is not None:
                    raise SwarmFailure("torrent_error", job.failed)
                if nothing_from_peers() and job.tracker_unreachable:
                    # no tracker, no peers (private torrents learn of peers from it alone): the
                    # registry now beats waiting for first_piece_timeout
                    raise SwarmFailure("tracker_unreachable", "the tracker cannot be reached to find peers")
                now = time.monotonic()
                if job.have_count == 0 and now - joined > policy.first_piece_timeout:
                    raise SwarmFailure("no_first_piece",
                                        f"no verified piece within {policy.first_piece_timeout:g}s")
                if job.have_count and now - job.last_progress > policy.stall_timeout:
                    raise SwarmFailure("stalled", f"no piece for {policy.stall_timeout:g}s")
                if not job.stalled and (now - joined > policy.first_piece_timeout / 2 if job.have_count == 0
                                        else now - job.last_progress > policy.stall_timeout / 2):
                    # Halfway to the registry. The tracker leaves the origin's seeder out of a
                    # swarm with seeders of its own (tracker/peers.py ORIGIN_SPARE), and those may
                    # be unreachable (a blocked port) or lying: ask for it.
                    log.info("no piece of %s for a while: asking the tracker for the origin's seeder", self.digest)
                    swarm.ask_for_origin(job)
                    self.deps.metrics.stall_escapes.inc()
                if nothing_from_peers() and now - last_announce > ANNOUNCE_RETRY:
                    # Nothing yet: perhaps the seeder was not listed when we joined. Ask again
                    # now rather than after the tracker's interval.
                    swarm.force_reannounce(job)
                    last_announce = now
                await job.wait_change(0.5)
            self.partial = None  # a relayed prefix (1a): every piece is the torrent's now
            await job.flush()
            partial = store.downloads_dir / self.digest.hex
            # The one hash covers what libtorrent handed out, not a re-read of the file: a file
            # written to after the flush (nothing of ours writes to it then; a stray writer, a
            # restore) is hashed again whole before it is adopted, as every file was before.
            flushed = stamp_of(await asyncio.to_thread(os.stat, partial))

            def settle() -> os.stat_result:
                if stamp_of(os.stat(partial)) != flushed:
                    log.warning("%s changed on disk after the flush: hashing it again", partial.name)
                    sha256_file(partial, self.digest)
                fsync_file(partial)
                store.blob_dir(self.digest).mkdir(parents=True, exist_ok=True)
                return os.stat(partial)

            try:
                await self.confirm(job, partial)
                settled = await asyncio.to_thread(settle)
            except errors.IntegrityError:
                self.deps.metrics.integrity_failures.labels("peers").inc()
                raise
            await job.move_to(store.blob_dir(self.digest))
            moved = True
            # its sources first: a request between adoption and them would find the blob
            # cached with no known source and ask the origin to vouch again (503 if it is away)
            for name in self.sources:
                await store.add_source(self.digest, name)
            try:
                await store.adopt_in_place(self.digest, settled)
            except errors.IntegrityError:
                self.deps.metrics.integrity_failures.labels("peers").inc()
                raise
            await store.save_metainfo(self.digest, meta.raw, published.signature, admitted.receipt)
            m = self.deps.metrics
            m.swarm_bytes.labels("seeder").inc(job.peer_bytes.from_seeders)
            m.swarm_bytes.labels("agent").inc(job.peer_bytes.from_agents)
            # The torrent seeds on for as long as the blob is cached: it must not hold this
            # Download, nor the pieces its hash kept (up to SHARED_WINDOW, at least two pieces,
            # per blob). Readers still here take the cached file from now on.
            self._detach(job)
            self.whole = None
        except BaseException:
            if share is not None:
                # (at once: once asked to stop it adds no piece, and a second cancellation of
                # this download must not skip the removal below)
                share.cancel()
            self._detach(job)
            self.job = self.whole = self.partial = None
            await swarm.remove(self.digest.hex, delete_files=not moved)
            await _stop(share)
            raise
        await _stop(share)

    def _detach(self, job: TorrentJob) -> None:
        while self._notify in job.listeners:
            job.listeners.remove(self._notify)

    def _new_hash(self) -> WholeHash:
        return WholeHash(self.size, self.deps.metrics.blob_hash_bytes.labels("download").inc)

    def attach(self, job: TorrentJob) -> None:
        """Readers take the blob from `job`'s verified pieces from now on (after the relay's
        bytes, if it brought some: the one hash goes on from them)."""
        if self.whole is None:
            self.whole = self._new_hash()
        self.job = job
        self.chosen.set()
        job.listeners.append(self._notify)
        self._notify()

    async def confirm(self, job: TorrentJob, partial: Path) -> None:
        """The whole blob's sha256 matches the digest, or IntegrityError. The pieces clients read
        were hashed as they went out (WholeHash), and a client still reading in step with the
        hash goes on feeding it; the rest are hashed now from the file, which the flush made
        whole: one pass over the blob in all, not one more after the readers'."""
        whole = self.whole
        assert whole is not None
        length = job.meta.piece_length
        # A client in step with the hash feeds it as it reads: waited for, stall_timeout in all.
        # Not per piece fed (a client reading one piece per stall_timeout held the blob out of
        # the cache for as long as it read), nor per client leaving (late joiners, each a
        # follower until its first piece shows it is behind, kept a stalled one holding it).
        # A client still reading after that hashes the rest on its own, as every client did
        # before there was one hash per node.
        deadline = time.monotonic() + self.deps.policy.stall_timeout
        following = True
        while not whole.complete:
            if following and whole.followers:
                left = deadline - time.monotonic()
                following = left > 0 and await whole.wait_change(left)
                continue
            at = whole.next  # to the end of its piece (a relay may have stopped within one)
            data = await asyncio.to_thread(read_exact, partial, at, min(length - at % length, self.size - at))
            whole.feed(at, data)  # unless a reader fed it meanwhile (then `next` moved on)
            self._notify()
        if whole.hexdigest() == self.digest.hex:
            return
        if not whole.relayed:
            raise errors.IntegrityError(f"the swarm's bytes of {self.digest} do not match it")
        # The relay is unverified: libtorrent's check of the file found a relayed piece wrong and
        # the swarm replaced it, so the file is not what the hash took. The file decides.
        log.warning("the relay's bytes of %s were not the blob's: hashing the file again", self.digest)
        await asyncio.to_thread(sha256_file, partial, self.digest)
        self.deps.metrics.blob_hash_bytes.labels("download").inc(self.size)

    async def _from_registry(self, admitted: Admitted | None) -> None:
        self.source = "registry"
        self.sources.add(self.upstream.name)
        self._notify()
        store, m = self.deps.store, self.deps.metrics
        if self.size == 0 and self.digest == EMPTY_DIGEST:
            return
        tmp = store.download_path(self.digest)

        def progress(n: int) -> None:
            m.registry_bytes.inc(n)
            self.written += n
            # Not chosen before the registry's first bytes: a refusal of this download's
            # credential then ends it before any reader started an answer, and a reader with
            # another credential can fetch the blob with its own (agent/api.py).
            self.chosen.set()
            self._notify()

        self.partial, self.written = tmp, 0
        try:
            await self.upstream.client.download_blob(self.repo, self.digest, tmp, max_size=self.size,
                                                     progress=progress, authorization=self.authorization)
        except errors.IntegrityError:
            m.integrity_failures.labels("registry").inc()
            raise
        finally:
            self.partial = None
        m.registry_requests.labels("blob", "200").inc()
        # These bytes came from the registry, checked against the digest (and any the origin
        # vouched for): known before the blob is visible, or a request in between would find it
        # cached with no source and ask the origin to vouch (503 while the origin is away).
        for name in self.sources:
            await store.add_source(self.digest, name)
        await store.commit_file(self.digest, tmp, verified=True)
        if admitted is not None and self.deps.swarm is not None:
            published = admitted.published
            await store.save_metainfo(self.digest, published.meta.raw, published.signature, admitted.receipt)
            self.deps.swarm.add(published.meta, store.blob_dir(self.digest), seed=True, grant=admitted.grant)


async def _stop(task: asyncio.Task[Any] | None) -> None:
    """End `task` (it logs its own end) and wait for it."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("the first copy's task failed", exc_info=task.exception())


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), min(length, READ_CHUNK), offset)


async def _in_thread(fn: Callable[..., T], *args: Any, undo: Callable[[T], object] | None = None) -> T:
    """fn(*args) in a thread, awaited to its end even when the caller is cancelled meanwhile (the
    cancellation follows, after `undo` of its result): asyncio cannot stop the thread, and the
    relay's file descriptor, closed at once, could have been reused by another open() before a
    write still to run in that thread."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():  # through further cancellations too (a shutdown's, say)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({work})
        if undo is not None and not work.cancelled() and work.exception() is None:
            undo(work.result())
        raise


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:  # (a regular file's pwrite may write less than asked, on a nearly full disk)
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(28, "no space left on device")
        view, offset = view[n:], offset + n
