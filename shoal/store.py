"""The content-addressed blob store: verified files, a small index, byte-budget LRU eviction.

Layout under `root`:
    blobs/sha256/<2 hex>/<hex>   whole, verified blobs (and the libtorrent save path when seeding)
    downloads/                    partial downloads; wiped at start, never served
    meta/<hex>.torrent            the blob's metainfo, so a restart can seed it again (with .sig,
                                  the origin's signature, and .receipt, this node's admission)
    meta/<hex>.sources            the registries known to hold the blob
    index/                        diskcache (sqlite) index: size and last access per blob

A file appears in `blobs/` only by rename after its sha256 matched, followed by an fsync of the
directory, so a crash leaves either the whole verified blob or nothing. The index holds JSON
strings only (never pickles) and is rebuilt from `blobs/` if it disagrees with the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from shoal import errors
from shoal.oci import SHA256_HEX_RE, Digest

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
# How stale the on-disk index may let a blob's last-access time get (see BlobStore.touch).
ATIME_RESOLUTION = 60.0
# Room kept free on the cache's filesystem beyond what a download needs (indexes, metainfo).
FREE_SPACE_RESERVE = 4 << 20


class NoPickleDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's Disk that refuses to unpickle: a planted index entry cannot run code
    (CVE-2025-69872). The index only ever stores strings."""

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("refusing to unpickle a store index value")
        return super().fetch(mode, filename, value, read)


# What a verified file looked like: size, mtime_ns, ctime_ns, inode. Any write, truncation or
# replacement through the filesystem changes it (ctime cannot be set back from user space), so a
# cheap fstat tells whether the file is still the one that was hashed.
Stamp = tuple[int, int, int, int]


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(slots=True)
class _Entry:
    size: int
    atime: float
    stamp: Stamp | None  # None: not known to match the hash since start (checked before serving)
    indexed_atime: float = 0.0  # the atime the index on disk has
    path: Path | None = None  # made on first use (pathlib's joins cost more than a small hit's stat)


def sha256_file(path: Path, expected: Digest | None = None) -> Digest:
    """Hash a file (blocking; call in a thread). Raises IntegrityError on mismatch."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    got = Digest(h.hexdigest())
    if expected is not None and got != expected:
        raise errors.IntegrityError(f"{path.name}: content hashes to {got}, expected {expected}")
    return got


def _index_doc(entry: _Entry) -> str:
    return json.dumps({"size": entry.size, "atime": entry.atime, "stamp": entry.stamp})


def read_exact(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes of the file at `offset` (blocking); IntegrityError if it is shorter."""
    with open(path, "rb", buffering=0) as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise errors.IntegrityError(f"{path.name} is short at {offset}")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


EvictHook = Callable[[Digest], Awaitable[None]]


class BlobStore:
    """Verified blobs on disk plus their LRU index. All public methods run on the event loop;
    blocking work goes to threads (one ordered thread for index writes)."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.blobs_dir = root / "blobs" / "sha256"
        self.downloads_dir = root / "downloads"
        self.meta_dir = root / "meta"
        self._entries: OrderedDict[Digest, _Entry] = OrderedDict()  # LRU order, oldest first
        self._pins: dict[Digest, int] = {}
        self._reserved: dict[str, int] = {}
        self._index: diskcache.Cache | None = None
        self._index_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-index")
        self._used = 0
        self._evict_lock = asyncio.Lock()
        self._evict_hooks: list[EvictHook] = []
        self._sources: dict[Digest, frozenset[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.evictions = 0
        self.evicted_bytes = 0
        self.integrity_failures = 0

    # ----- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)
        log.info("store opened: %d blobs, %d bytes, budget %d bytes", len(self._entries), self.used_bytes,
                 self.max_bytes)

    def _open_sync(self) -> None:
        for d in (self.blobs_dir, self.downloads_dir, self.meta_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Partial downloads are disposable: nothing in downloads/ was ever verified.
        for child in self.downloads_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        self._index = diskcache.Cache(
            str(self.root / "index"), disk=NoPickleDisk, eviction_policy="none", cull_limit=0,
            size_limit=1 << 62,
        )
        indexed: dict[Digest, _Entry] = {}
        for key in list(self._index.iterkeys()):
            try:
                doc = json.loads(self._index.get(key))
                stamp = doc.get("stamp")
                atime = float(doc["atime"])
                indexed[Digest.parse(key)] = _Entry(int(doc["size"]), atime,
                                                    tuple(stamp) if isinstance(stamp, list) else None, atime)
            except (ValueError, TypeError, KeyError, errors.ShoalError):
                self._index.delete(key)
        on_disk = dict(self._scan_blobs())
        for digest in set(indexed) - set(on_disk):
            self._index.delete(str(digest))
        entries: list[tuple[Digest, _Entry]] = []
        for digest, st in on_disk.items():
            entry = indexed.get(digest)
            if entry is None:
                # Renamed into place after verification, but the index write was lost (a crash):
                # hash it again before taking it back; it is rare.
                try:
                    sha256_file(self.path(digest), digest)
                except errors.IntegrityError:
                    self.path(digest).unlink(missing_ok=True)
                    continue
                entry = _Entry(st.st_size, time.time(), stamp_of(st))
                self._index.set(str(digest), _index_doc(entry))
            elif entry.stamp != stamp_of(st):
                entry.stamp = None  # changed since it was verified (or unknown): hash before serving
            entries.append((digest, entry))
        entries.sort(key=lambda de: de[1].atime)
        self._entries = OrderedDict(entries)
        self._used = sum(e.size for _, e in entries)
        # (`<hex>.from` files, the sources an earlier version took from a byte sample, which a
        # registry could fake, go here too: their registries are confirmed again)
        for meta in self.meta_dir.iterdir():
            name = meta.name.removesuffix(".torrent").removesuffix(".sig").removesuffix(".sources") \
                .removesuffix(".receipt")
            if not SHA256_HEX_RE.fullmatch(name) or Digest(name) not in self._entries:
                meta.unlink(missing_ok=True)

    def _scan_blobs(self) -> Iterator[tuple[Digest, os.stat_result]]:
        for prefix in self.blobs_dir.iterdir():
            if prefix.is_symlink() or not prefix.is_dir():
                prefix.unlink(missing_ok=True)
                continue
            for f in prefix.iterdir():
                st = f.lstat()
                # A symlink or anything but a regular file under the right prefix is not ours.
                if (not stat.S_ISREG(st.st_mode) or not SHA256_HEX_RE.fullmatch(f.name)
                        or f.name[:2] != prefix.name):
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(f, ignore_errors=True)
                    else:
                        f.unlink(missing_ok=True)
                    continue
                yield Digest(f.name), st

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._index_writer, self._close_sync)
        self._index_writer.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._index is not None:
            self._index.close()

    def add_evict_hook(self, hook: EvictHook) -> None:
        """Called before a blob's file is removed (e.g. to stop seeding it)."""
        self._evict_hooks.append(hook)

    # ----- queries -----------------------------------------------------------------------------

    def path(self, digest: Digest) -> Path:
        entry = self._entries.get(digest)
        if entry is None:
            return self.blobs_dir / digest.hex[:2] / digest.hex
        if entry.path is None:
            entry.path = self.blobs_dir / digest.hex[:2] / digest.hex
        return entry.path

    def blob_dir(self, digest: Digest) -> Path:
        return self.blobs_dir / digest.hex[:2]

    def has(self, digest: Digest) -> bool:
        return digest in self._entries

    def size_of(self, digest: Digest) -> int | None:
        entry = self._entries.get(digest)
        return entry.size if entry else None

    def digests(self) -> list[Digest]:
        return list(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    # ----- pins and access --------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, digest: Digest) -> Iterator[None]:
        """Keep `digest` from eviction while serving or seeding-critical work runs.

        The release may run outside the event loop: a stream a client abandoned is closed by the
        garbage collector, in whatever thread it runs. It then finishes on the loop (once, a
        pin released with no loop to run on skipped the eviction it owed: a 300 MiB cache grew
        to 325 MiB in the soak)."""
        self._pins[digest] = self._pins.get(digest, 0) + 1
        try:
            yield
        finally:
            self._unpin(digest)

    def _unpin(self, digest: Digest) -> None:
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
                loop.call_soon_threadsafe(self._unpin, digest)
            return
        left = self._pins[digest] - 1
        if left:
            self._pins[digest] = left
            return
        del self._pins[digest]
        if self.used_bytes + self.reserved_bytes > self.max_bytes:
            # eviction skipped this blob while it was in use; it may be the one to go now
            task = asyncio.get_running_loop().create_task(self.make_room())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def pinned_bytes(self) -> int:
        # Also read by /metrics from a worker thread: iterate over a copy (made in C, atomic
        # under the GIL), never over the live dicts the loop mutates.
        entries = self._entries
        return sum(e.size for e in (entries.get(d) for d in list(self._pins)) if e is not None)

    def touch(self, digest: Digest) -> None:
        entry = self._entries.get(digest)
        if entry is None:
            return
        entry.atime = time.time()
        self._entries.move_to_end(digest)
        # The LRU order lives in memory; the index's atime only orders blobs after a restart,
        # so it is written at most once per ATIME_RESOLUTION per blob, not on every hit.
        if entry.atime - entry.indexed_atime >= ATIME_RESOLUTION:
            self._write_index(digest, entry)

    def _write_index(self, digest: Digest, entry: _Entry | None) -> None:
        index = self._index
        if index is None:
            return
        key = str(digest)
        doc = None if entry is None else _index_doc(entry)
        if entry is not None:
            entry.indexed_atime = entry.atime

        def write() -> None:
            if doc is None:
                index.delete(key)
            else:
                index.set(key, doc)

        asyncio.get_running_loop().run_in_executor(self._index_writer, write)

    # ----- downloads ------------------------------------------------------------------------

    @contextlib.contextmanager
    def reservation(self, size: int) -> Iterator[str]:
        """Count an in-flight download against the budget until it is committed or dropped."""
        token = secrets.token_hex(8)
        self._reserved[token] = size
        try:
            yield token
        finally:
            self._reserved.pop(token, None)

    def download_path(self, digest: Digest) -> Path:
        return self.downloads_dir / f"{digest.hex}.{secrets.token_hex(4)}"

    async def commit_file(self, digest: Digest, src: Path, *, verified: bool = False) -> None:
        """Verify `src` against `digest` (unless the caller hashed it as it arrived), fsync it
        and rename it into `blobs/`."""
        dest = self.path(digest)

        def work() -> os.stat_result:
            if not verified:
                sha256_file(src, digest)
            fsync_file(src)
            dest.parent.mkdir(exist_ok=True)
            os.replace(src, dest)
            fsync_dir(dest.parent)
            return dest.stat()

        try:
            st = await asyncio.to_thread(work)
        except BaseException:
            await asyncio.to_thread(src.unlink, missing_ok=True)
            raise
        self._add(digest, st)

    async def adopt_in_place(self, digest: Digest, verified: os.stat_result | None = None) -> None:
        """Register a blob that was verified and then moved to `path(digest)` by someone else
        (libtorrent's move_storage). `verified`: the file's stat when it was verified; a file
        that changed between that and its adoption (a write to it after the move, before its
        stamp is taken here) is hashed again, IntegrityError if it no longer matches. (The move
        changes the ctime only: size, mtime and inode say whether it is the same file.)"""
        path = self.path(digest)

        def work() -> os.stat_result:
            fsync_file(path)
            fsync_dir(path.parent)
            st = path.stat()
            if verified is not None and (st.st_size, st.st_mtime_ns, st.st_ino) != (
                    verified.st_size, verified.st_mtime_ns, verified.st_ino):
                log.warning("%s changed on disk after it was verified: hashing it again", digest)
                sha256_file(path, digest)
            return st

        self._add(digest, await asyncio.to_thread(work))

    def _add(self, digest: Digest, st: os.stat_result) -> None:
        entry = _Entry(st.st_size, time.time(), stamp_of(st))
        old = self._entries.get(digest)
        self._used += entry.size - (old.size if old is not None else 0)
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        self._write_index(digest, entry)

    async def remove(self, digest: Digest, *, reason: str) -> None:
        """Drop a blob now (corruption found, or eviction)."""
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._used -= entry.size
        for hook in self._evict_hooks:
            await hook(digest)
        path, meta = self.path(digest), self.meta_dir / digest.hex
        self._sources.pop(digest, None)

        def work() -> None:
            path.unlink(missing_ok=True)
            meta.with_suffix(".torrent").unlink(missing_ok=True)
            meta.with_suffix(".sig").unlink(missing_ok=True)
            meta.with_suffix(".sources").unlink(missing_ok=True)
            meta.with_suffix(".receipt").unlink(missing_ok=True)

        await asyncio.to_thread(work)
        self._write_index(digest, None)
        if entry is not None:
            log.info("removed blob %s (%d bytes): %s", digest, entry.size, reason)

    # ----- integrity -------------------------------------------------------------------------

    async def verify(self, digest: Digest, *, deep: bool = False) -> bool:
        """Is the cached file still exactly what was verified? A file whose stamp changed (or,
        with `deep`, any file) is hashed again; a corrupt or missing one is removed (False)."""
        entry = self._entries.get(digest)
        if entry is None:
            return False
        path, known = self.path(digest), entry.stamp
        if not deep and known is not None:
            # The common case, a stamp check, is one lstat of a local file: done here, as a hop
            # to a thread and back cost more than the stat (small cached blobs, bench/RESULTS.md).
            with contextlib.suppress(OSError):
                if stamp_of(os.lstat(path)) == known:
                    return True

        def work() -> Stamp | str:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return "missing"
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file"
            if not deep and known == stamp_of(st):
                return stamp_of(st)
            try:
                sha256_file(path, digest)
            except errors.IntegrityError:
                return "content does not hash to the digest"
            except OSError as exc:
                return f"unreadable ({exc.strerror})"
            return stamp_of(os.lstat(path))

        outcome = await asyncio.to_thread(work)
        if isinstance(outcome, str):
            self.integrity_failures += 1
            log.error("cached blob %s is corrupt (%s): evicting it", digest, outcome)
            await self.remove(digest, reason=f"corrupt on disk: {outcome}")
            return False
        if outcome != entry.stamp:
            entry.stamp = outcome
            self._write_index(digest, entry)
        return True

    async def scrub(self) -> int:
        """Hash every cached blob once (one at a time); returns how many were corrupt."""
        bad = 0
        for digest in list(self._entries):
            if digest not in self._entries:
                continue
            with self.pinned(digest):
                if not await self.verify(digest, deep=True):
                    bad += 1
        return bad

    # ----- metainfo -------------------------------------------------------------------------

    async def save_metainfo(self, digest: Digest, metainfo: bytes, signature: str, receipt: str | None = None) -> None:
        """Keep a blob's metainfo and the origin's signature of it, and the receipt of this node's
        admission to its swarm (to seed it again after a restart)."""
        files = ((".receipt", (receipt or "").encode()),) if receipt is not None else ()

        def work() -> None:
            for suffix, data in (*files, (".sig", signature.encode()), (".torrent", metainfo)):
                dest = self.meta_dir / f"{digest.hex}{suffix}"
                tmp = self.meta_dir / f".{digest.hex}.tmp{secrets.token_hex(4)}"
                tmp.write_bytes(data)
                os.replace(tmp, dest)

        await asyncio.to_thread(work)

    async def sources(self, digest: Digest) -> frozenset[str]:
        """The registries (upstream names) known to hold this blob: it came from them, or they
        proved they hold it (shoal_agent.provenance)."""
        known = self._sources.get(digest)
        if known is None:
            path = self.meta_dir / f"{digest.hex}.sources"

            def work() -> frozenset[str]:
                try:
                    return frozenset(line for line in path.read_text().splitlines() if line)
                except FileNotFoundError:
                    return frozenset()

            known = await asyncio.to_thread(work)
            if self.has(digest):
                self._sources[digest] = known
        return known

    async def add_source(self, digest: Digest, upstream: str) -> None:
        known = await self.sources(digest)
        if upstream in known:
            return
        updated = known | {upstream}
        path = self.meta_dir / f"{digest.hex}.sources"

        def work() -> None:
            tmp = self.meta_dir / f".{digest.hex}.tmp{secrets.token_hex(4)}"
            tmp.write_text("".join(f"{name}\n" for name in sorted(updated)))
            os.replace(tmp, path)

        await asyncio.to_thread(work)
        if self.has(digest):
            self._sources[digest] = updated

    async def load_metainfo(self, digest: Digest) -> tuple[bytes, str] | None:
        base = self.meta_dir / digest.hex

        def work() -> tuple[bytes, str] | None:
            try:
                return base.with_suffix(".torrent").read_bytes(), base.with_suffix(".sig").read_text().strip()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(work)

    async def load_receipt(self, digest: Digest) -> str | None:
        path = self.meta_dir / f"{digest.hex}.receipt"

        def work() -> str | None:
            try:
                return path.read_text().strip() or None
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(work)

    # ----- disk space ------------------------------------------------------------------------

    async def ensure_free(self, size: int) -> None:
        """Make sure the filesystem has room for `size` more bytes, evicting unpinned blobs
        (least recently used first) if it does not: the budget is a target, the disk a limit.
        StoreFull if even that cannot make room; nothing partial is left behind."""
        for _ in range(len(self._entries) + 1):
            free = (await asyncio.to_thread(shutil.disk_usage, self.root)).free
            if free >= size + FREE_SPACE_RESERVE:
                return
            victim = next((d for d in self._entries if d not in self._pins), None)
            if victim is None:
                break
            await self.remove(victim, reason="evicted (disk full)")
            self.evictions += 1
        raise errors.StoreFull(f"no disk space for a {size}-byte blob in the cache")

    # ----- eviction -------------------------------------------------------------------------

    async def make_room(self) -> None:
        """Evict least-recently-used blobs until cached + reserved bytes fit the budget.

        A blob in use (pinned: being served or downloaded) is never removed: it is being used
        right now, so it is the most recently used of all, and the walk takes the next blob
        instead. The budget then holds unless the blobs in use alone exceed it; releasing the
        last pin runs this again. (Deferring an in-use victim instead, as an earlier version
        did, left the cache over budget for as long as a slow client read.)
        """
        async with self._evict_lock:
            for digest in list(self._entries):
                if self.used_bytes + self.reserved_bytes <= self.max_bytes:
                    return
                entry = self._entries.get(digest)
                if entry is None or digest in self._pins:
                    continue
                await self.remove(digest, reason="evicted (least recently used)")
                self.evictions += 1
                self.evicted_bytes += entry.size
