from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path

import diskcache
import pytest

from shoal import errors
from shoal import store as store_module
from shoal.oci import Digest
from shoal.store import FREE_SPACE_RESERVE, BlobStore, stamp_of


def blob(n: int, seed: int) -> tuple[Digest, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1)
    data = data[:n]
    return Digest(hashlib.sha256(data).hexdigest()), data


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def put(store: BlobStore, data: bytes, digest: Digest) -> None:
    tmp = store.download_path(digest)
    tmp.write_bytes(data)
    await store.commit_file(digest, tmp)


async def test_commit_verifies_and_places(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(1000, 1)
    await put(store, data, d)
    assert store.has(d) and store.path(d).read_bytes() == data
    assert store.path(d) == tmp_path / "blobs" / "sha256" / d.hex[:2] / d.hex
    other, _ = blob(10, 2)
    tmp = store.download_path(other)
    tmp.write_bytes(data)
    with pytest.raises(errors.IntegrityError):
        await store.commit_file(other, tmp)
    assert not store.has(other) and not store.path(other).exists() and not tmp.exists()
    await store.close()


async def test_lru_eviction_skips_blobs_in_use(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=3000)
    await store.open()
    evicted: list[Digest] = []

    async def hook(d: Digest) -> None:
        evicted.append(d)

    store.add_evict_hook(hook)
    blobs = [blob(1000, i) for i in range(3)]
    for d, data in blobs:
        await put(store, data, d)
    store.touch(blobs[0][0])  # LRU order is now 1, 2, 0
    d3, data3 = blob(1000, 3)
    with store.pinned(blobs[1][0]):
        await put(store, data3, d3)
        await store.make_room()
        # 1 is the oldest but in use, so the most recently used of all: 2 goes, the budget holds
        assert evicted == [blobs[2][0]]
        assert store.path(blobs[1][0]).exists() and not store.path(blobs[2][0]).exists()
        assert store.used_bytes == 3000
        assert store.pinned_bytes == 1000
    assert store.pinned_bytes == 0
    with store.reservation(1500):
        await store.make_room()
    assert evicted == [blobs[2][0], blobs[1][0], blobs[0][0]]
    assert store.digests() == [d3]
    assert store.evictions == 3 and store.evicted_bytes == 3000
    await store.close()


async def test_unpin_evicts_what_was_kept_over_budget(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1500)
    await store.open()
    a, da = blob(1000, 1)
    b, db = blob(1000, 2)
    with store.pinned(b):
        with store.pinned(a):
            await put(store, da, a)
            await put(store, db, b)
            await store.make_room()
            assert store.has(a) and store.has(b)  # both pinned: over budget for now
        await wait_until(lambda: not store.has(a))  # releasing a's pin let the evictor run
        assert not store.path(a).exists()
        assert store.has(b) and store.used_bytes <= 1500
    await store.close()


async def test_a_pin_released_outside_the_loop_still_evicts(tmp_path: Path) -> None:
    """An abandoned stream's pin is released by the garbage collector, in any thread and with
    no running loop; the eviction it owes still happens, on the loop."""
    store = BlobStore(tmp_path, max_bytes=1500)
    await store.open()
    a, da = blob(1000, 1)
    b, db = blob(1000, 2)

    def reader() -> Generator[None, None, None]:  # a response stream that holds its blob pinned
        with store.pinned(a):
            yield

    stream = reader()
    next(stream)
    with store.pinned(b):
        await put(store, da, a)
        await put(store, db, b)
        await store.make_room()
        assert store.has(a) and store.has(b)  # both in use: over budget for now
        # the client hung up; the collector finalizes its stream in a worker thread
        await asyncio.to_thread(stream.close)
        await wait_until(lambda: not store.has(a))
    assert store.used_bytes == 1000 and store.pinned_bytes == 0
    await store.close()


async def test_restart_recovers_and_cleans(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "cache", max_bytes=1 << 20)
    await store.open()
    d, data = blob(500, 7)
    await put(store, data, d)
    await store.save_metainfo(d, b"meta", "sig")
    partial = store.download_path(d)
    partial.write_bytes(b"partial")
    await store.close()
    sha = tmp_path / "cache" / "blobs" / "sha256"
    # Junk a crash or an attacker could leave. The links carry the right names and point at
    # content that hashes to them, so only their being links can get them refused (a store that
    # followed links would adopt them and later serve or delete what they point at).
    outside = tmp_path / "outside"
    outside.mkdir()
    linked, ldata = blob(400, 9)
    (outside / linked.hex).write_bytes(ldata)
    (sha / linked.hex[:2]).mkdir(exist_ok=True)
    os.symlink(outside / linked.hex, sha / linked.hex[:2] / linked.hex)
    dir_linked, ddata = blob(300, 10)
    (outside / dir_linked.hex[:2]).mkdir(exist_ok=True)
    (outside / dir_linked.hex[:2] / dir_linked.hex).write_bytes(ddata)
    assert not (sha / dir_linked.hex[:2]).exists()
    (sha / dir_linked.hex[:2]).symlink_to(outside / dir_linked.hex[:2])
    (sha / d.hex[:2] / "notahash").write_text("x")
    adopted, adata = blob(300, 8)
    (sha / adopted.hex[:2]).mkdir(exist_ok=True)
    (sha / adopted.hex[:2] / adopted.hex).write_bytes(adata)

    again = BlobStore(tmp_path / "cache", max_bytes=1 << 20)
    await again.open()
    assert again.has(d) and again.size_of(d) == 500
    assert again.has(adopted)
    assert await again.load_metainfo(d) == (b"meta", "sig")
    assert not partial.exists()
    assert not again.has(linked) and not again.has(dir_linked)
    assert not (sha / linked.hex[:2] / linked.hex).is_symlink()
    assert not (sha / dir_linked.hex[:2]).is_symlink()
    assert (outside / linked.hex).read_bytes() == ldata  # what the links pointed at is untouched
    assert (outside / dir_linked.hex[:2] / dir_linked.hex).read_bytes() == ddata
    assert not (sha / d.hex[:2] / "notahash").exists()
    assert sorted(again.digests()) == sorted([d, adopted])
    await again.close()


async def test_scrub_rehashes_blobs_whose_stamp_still_matches(tmp_path: Path) -> None:
    """Bit rot changes bytes below the file system: size, times and inode stay as verified, so
    only the scrubber's full rehash can find it (a hit trusts an unchanged stamp)."""
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    (d, data), (ok, okdata) = blob(4000, 11), blob(4000, 12)
    await put(store, data, d)
    await put(store, okdata, ok)
    path = store.path(d)
    before = os.lstat(path)
    with open(path, "r+b") as f:
        f.seek(2000)
        f.write(bytes([data[2000] ^ 0x40]))
    # Rot leaves the stamp as verified; a write through the file system cannot restore ctime, so
    # the store is told the file's new stamp is the verified one.
    entry = store._entries[d]
    entry.stamp = stamp_of(os.lstat(path))
    assert os.lstat(path).st_size == before.st_size
    assert await store.verify(d)  # the cheap check trusts the stamp, as designed
    assert await store.scrub() == 1
    assert not store.has(d) and not path.exists()
    assert store.has(ok) and store.path(ok).read_bytes() == okdata
    assert store.integrity_failures == 1
    await store.close()


class _Planted:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


async def test_index_refuses_pickles(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s", max_bytes=1 << 20)
    await store.open()
    await store.close()
    # a planted pickled value (CVE-2025-69872) must never be unpickled
    marker = tmp_path / "pwned"
    raw = diskcache.Cache(str(tmp_path / "s" / "index"))
    raw.set("sha256:" + "c" * 64, _Planted(marker))
    raw.close()
    again = BlobStore(tmp_path / "s", max_bytes=1 << 20)
    await again.open()
    assert not marker.exists()
    assert again.digests() == []
    await again.close()


async def test_hits_move_the_lru_at_once_and_the_index_at_most_once_a_minute(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    older, newer = blob(1000, 1), blob(1000, 2)
    for d, data in (older, newer):
        await put(store, data, d)
    clock = [float(int(time.time()) + 120)]  # a while after the blobs were stored (whole seconds: exact sums)
    monkeypatch.setattr("shoal.store.time.time", lambda: clock[0])
    writes: list[Digest] = []
    real_write = store._write_index

    def counting(digest: Digest, entry: object) -> None:
        writes.append(digest)
        real_write(digest, entry)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_write_index", counting)
    store.touch(older[0])
    assert store.digests()[-1] == older[0]  # most recently used, in memory
    clock[0] += 30
    store.touch(older[0])
    store.touch(newer[0])
    assert store.digests()[-1] == newer[0]
    assert writes == [older[0], newer[0]]  # the second hit on `older` within a minute: no write
    clock[0] += 31
    store.touch(older[0])
    assert writes == [older[0], newer[0], older[0]]
    clock[0] += 59.5
    store.touch(older[0])
    clock[0] += 0.5  # exactly a minute after the last write
    store.touch(older[0])
    assert writes == [older[0], newer[0], older[0], older[0]]
    await store.close()
    # after a restart the order is what the index recorded
    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    assert again.digests() == [newer[0], older[0]]
    await again.close()


def count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the store hashes from now on (hashing is what a stamp saves)."""
    hashed: list[str] = []
    real = store_module.sha256_file

    def counting(path: Path, expected: Digest | None = None) -> Digest:
        hashed.append(path.name)
        return real(path, expected)

    monkeypatch.setattr(store_module, "sha256_file", counting)
    return hashed


def index_keys(root: Path) -> list[str]:
    """The keys of a closed store's index on disk (keys only: no value is read)."""
    raw = diskcache.Cache(str(root / "index"), eviction_policy="none")
    try:
        return sorted(raw.iterkeys())
    finally:
        raw.close()


def same_prefix_blobs() -> tuple[tuple[Digest, bytes], tuple[Digest, bytes]]:
    seen: dict[str, tuple[Digest, bytes]] = {}
    for seed in range(1000):
        d, data = blob(100 + seed, seed)
        if d.hex[:2] in seen:
            return seen[d.hex[:2]], (d, data)
        seen[d.hex[:2]] = (d, data)
    raise AssertionError("no two blobs share a prefix")


async def test_layout_on_disk(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs", "downloads", "index", "meta"]
    d, data = blob(100, 1)
    assert store.download_path(d).parent == tmp_path / "downloads"
    assert store.download_path(d).name.startswith(f"{d.hex}.")
    assert store.blob_dir(d) == store.path(d).parent == tmp_path / "blobs" / "sha256" / d.hex[:2]
    await put(store, data, d)
    await store.save_metainfo(d, b"meta", "sig")
    assert (tmp_path / "meta" / f"{d.hex}.torrent").read_bytes() == b"meta"
    assert (tmp_path / "meta" / f"{d.hex}.sig").read_text() == "sig"
    await store.close()


async def test_a_store_that_was_never_opened(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1000)
    d, _ = blob(10, 1)
    assert not store.has(d) and store.digests() == [] and store.size_of(d) is None
    assert store.used_bytes == 0 and store.reserved_bytes == 0
    with store.pinned(d):
        assert store.pinned_bytes == 0
    assert store.evictions == 0 and store.evicted_bytes == 0 and store.integrity_failures == 0
    await store.close()  # nothing to close: no error


async def test_restart_trusts_the_index_and_hashes_only_what_changed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = count_hashes(monkeypatch)
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    (a, da), (b, db), (c, dc) = blob(1000, 1), blob(2000, 2), blob(3000, 3)
    for d, data in ((a, da), (b, db), (c, dc)):
        await put(store, data, d)
    hashed.clear()
    assert await store.verify(a) and await store.verify(b) and await store.verify(c)
    assert hashed == []  # just committed: the stamp says it is the file that was hashed
    await store.close()
    store.path(b).write_bytes(bytes(2000))  # other bytes, same size
    os.utime(store.path(b), ns=(1, 1))
    os.utime(store.path(c), ns=(2, 2))  # touched, same bytes

    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    assert hashed == []  # every blob is in the index: none is hashed at start
    assert [again.size_of(d) for d in (a, b, c)] == [1000, 2000, 3000] and again.used_bytes == 6000
    writes: list[Digest] = []
    real_write = again._write_index

    def counting(digest: Digest, entry: object) -> None:
        writes.append(digest)
        real_write(digest, entry)  # type: ignore[arg-type]

    monkeypatch.setattr(again, "_write_index", counting)
    again.touch(a)
    assert writes == []  # the index has this minute's access time already
    monkeypatch.setattr(again, "_write_index", real_write)
    assert await again.verify(a) and hashed == []  # unchanged since it was verified
    assert not await again.verify(b) and hashed == [b.hex]  # changed: hashed, corrupt, gone
    assert not again.has(b) and not again.path(b).exists()
    # c changed (times only) and is not hashed until asked for; its index entry then says so
    now = time.time()
    monkeypatch.setattr("shoal.store.time.time", lambda: now + 120)
    again.touch(c)
    await again.close()
    assert index_keys(tmp_path) == sorted([str(a), str(c)])

    third = BlobStore(tmp_path, max_bytes=1 << 20)
    await third.open()
    assert hashed == [b.hex] and third.has(c)  # an entry without a stamp is taken back unhashed
    assert await third.verify(c) and hashed == [b.hex, c.hex]
    assert await third.verify(c) and hashed == [b.hex, c.hex]  # the new stamp is kept
    await third.close()
    fourth = BlobStore(tmp_path, max_bytes=1 << 20)
    await fourth.open()
    assert await fourth.verify(c) and await fourth.verify(a) and hashed == [b.hex, c.hex]  # and written
    await fourth.close()


async def test_open_cleans_up_and_hashes_what_the_index_lacks(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    kept, kdata = blob(500, 1)
    await put(store, kdata, kept)
    await store.close()
    sha = tmp_path / "blobs" / "sha256"
    # an index entry whose file is gone, and entries that are not index documents
    gone, _ = blob(10, 2)
    raw = diskcache.Cache(str(tmp_path / "index"), eviction_policy="none")
    raw.set(str(gone), '{"size": 10, "atime": 1.0, "stamp": null}')
    garbled, gdata = blob(20, 3)
    raw.set(str(garbled), "not json")
    raw.set("not a digest", '{"size": 1, "atime": 1.0, "stamp": null}')
    raw.close()
    # files with the right names that the index does not know: two corrupt, three good
    unknown = [blob(300 + i, 10 + i) for i in range(5)]
    for i, (d, data) in enumerate(unknown):
        (sha / d.hex[:2]).mkdir(exist_ok=True)
        (sha / d.hex[:2] / d.hex).write_bytes(data if i >= 2 else data[::-1])
    (sha / garbled.hex[:2]).mkdir(exist_ok=True)
    (sha / garbled.hex[:2] / garbled.hex).write_bytes(gdata)
    # a good blob in the wrong prefix directory, a directory where a blob should be, and junk beside
    # every blob (the scan must go on after each piece of junk it removes)
    misplaced, mdata = blob(200, 30)
    wrong = sha / ("00" if misplaced.hex[:2] != "00" else "01")
    wrong.mkdir(exist_ok=True)
    (wrong / misplaced.hex).write_bytes(mdata)
    not_a_file, _ = blob(40, 31)
    (sha / not_a_file.hex[:2]).mkdir(exist_ok=True)
    (sha / not_a_file.hex[:2] / not_a_file.hex).mkdir()
    (sha / not_a_file.hex[:2] / not_a_file.hex / "x").write_text("x")
    junk: list[Path] = []
    for d, _ in [(kept, b""), *unknown]:
        for j in range(6):
            junk.append(sha / d.hex[:2] / f"junk{j}")
    for j in range(12):
        junk.append(sha / f"stray{j}")
    for p in junk:
        p.write_text("junk")
    # downloads: a partial file and a partial directory (libtorrent's save path)
    (tmp_path / "downloads" / "partial").write_bytes(b"p")
    (tmp_path / "downloads" / "job").mkdir()
    (tmp_path / "downloads" / "job" / "piece").write_bytes(b"p")
    # metainfo of a blob the store does not have
    (tmp_path / "meta" / f"{gone.hex}.torrent").write_bytes(b"m")
    (tmp_path / "meta" / f"{gone.hex}.sig").write_text("s")
    await store.save_metainfo(kept, b"meta", "sig")

    hashed = count_hashes(monkeypatch)
    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    good = [kept, garbled] + [d for d, _ in unknown[2:]]
    assert sorted(hashed) == sorted(d.hex for d in [garbled] + [d for d, _ in unknown])
    assert sorted(again.digests(), key=str) == sorted(good, key=str)
    assert again.used_bytes == sum(again.size_of(d) or 0 for d in good) == 500 + 20 + 302 + 303 + 304
    for d, _ in unknown[:2]:
        assert not again.path(d).exists()
    assert not (wrong / misplaced.hex).exists() and not again.has(misplaced)
    assert not (sha / not_a_file.hex[:2] / not_a_file.hex).exists()
    assert [p for p in junk if p.exists()] == []
    assert list((tmp_path / "downloads").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == [f"{kept.hex}.sig", f"{kept.hex}.torrent"]
    hashed.clear()
    assert all([await again.verify(d) for d in good]) and hashed == []  # hashed at start: stamped
    await again.close()
    assert index_keys(tmp_path) == sorted(str(d) for d in good)
    third = BlobStore(tmp_path, max_bytes=1 << 20)
    await third.open()
    assert hashed == [] and sorted(third.digests(), key=str) == sorted(good, key=str)
    await third.close()


async def test_commit_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    (a, da), (b, db) = same_prefix_blobs()
    await put(store, da, a)
    await put(store, db, b)  # the prefix directory exists already
    assert store.has(a) and store.has(b) and store.used_bytes == len(da) + len(db)
    await put(store, db, b)  # the same blob again (two downloads raced): counted once
    assert store.used_bytes == len(da) + len(db) and store.digests() == [a, b]
    other, _ = blob(10, 99)
    tmp = store.download_path(other)
    tmp.write_bytes(da)
    with pytest.raises(errors.IntegrityError) as exc:
        await store.commit_file(other, tmp)
    assert str(exc.value) == f"{tmp.name}: content hashes to {a}, expected {other}"

    # a failure after the rename: the caller sees that failure, not the missing source file
    def failing_fsync(path: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store_module, "fsync_dir", failing_fsync)
    c, dc = blob(50, 5)
    tmp = store.download_path(c)
    tmp.write_bytes(dc)
    with pytest.raises(OSError, match="I/O error") as oserr:
        await store.commit_file(c, tmp)
    assert oserr.value.errno == errno.EIO and not store.has(c)
    await store.close()


async def test_adopt_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(700, 1)
    store.blob_dir(d).mkdir(parents=True, exist_ok=True)
    store.path(d).write_bytes(data)  # moved there by libtorrent after it was verified
    await store.adopt_in_place(d)
    assert store.has(d) and store.size_of(d) == 700 and store.used_bytes == 700
    hashed = count_hashes(monkeypatch)
    assert await store.verify(d) and hashed == []
    await store.close()
    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    assert again.digests() == [d] and hashed == []
    await again.close()


async def test_verify_and_remove_edge_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    evicted: list[Digest] = []

    async def hook(d: Digest) -> None:
        evicted.append(d)

    store.add_evict_hook(hook)
    unknown, _ = blob(10, 9)
    assert not await store.verify(unknown)
    await store.remove(unknown, reason="test")  # nothing cached: nothing to do, no error
    assert evicted == [unknown] and store.used_bytes == 0
    (a, da), (b, db), (c, dc) = blob(1000, 1), blob(1000, 2), blob(1000, 3)
    for d, data in ((a, da), (b, db), (c, dc)):
        await put(store, data, d)
        await store.save_metainfo(d, b"meta", "sig")
    store.path(a).unlink()  # deleted behind the store's back
    assert not await store.verify(a) and not store.has(a)
    assert store.integrity_failures == 1
    store.path(b).write_bytes(bytes(1000))  # changed behind its back: the stamp check notices
    os.utime(store.path(b), ns=(1, 1))
    assert not await store.verify(b) and not store.has(b) and not store.path(b).exists()
    assert store.integrity_failures == 2 and store.used_bytes == 1000
    assert sorted(p.name for p in store.meta_dir.iterdir()) == [f"{c.hex}.sig", f"{c.hex}.torrent"]
    hashed = count_hashes(monkeypatch)
    os.utime(store.path(c), ns=(2, 2))  # same bytes, new stamp: hashed once, then trusted again
    assert await store.verify(c) and await store.verify(c) and hashed == [c.hex]
    await store.close()
    assert index_keys(tmp_path) == [str(c)]  # the removed blobs left the index too
    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    assert await again.verify(c) and hashed == [c.hex]
    await again.close()


async def test_scrub_counts_and_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    blobs = [blob(1000 + i, i) for i in range(6)]
    for d, data in blobs:
        await put(store, data, d)
    pinned_while_hashing: list[int] = []
    real = store_module.sha256_file

    def hashing(path: Path, expected: Digest | None = None) -> Digest:
        pinned_while_hashing.append(store.pinned_bytes)
        return real(path, expected)

    monkeypatch.setattr(store_module, "sha256_file", hashing)
    # the first blob is corrupt; removing it makes eviction take the second meanwhile
    with open(store.path(blobs[0][0]), "r+b") as f:
        f.write(b"\x00")

    async def evict_the_next(d: Digest) -> None:
        if d == blobs[0][0]:
            await store.remove(blobs[1][0], reason="evicted meanwhile")

    store.add_evict_hook(evict_the_next)
    with open(store.path(blobs[3][0]), "r+b") as f:
        f.write(b"\x00")
    assert await store.scrub() == 2  # the second is skipped, the rest are still checked
    assert [d for d, _ in blobs if store.has(d)] == [blobs[2][0], blobs[4][0], blobs[5][0]]
    assert pinned_while_hashing == [1000, 1002, 1003, 1004, 1005]  # each blob is pinned while hashed
    assert store.integrity_failures == 2
    await store.close()


async def test_pins_nest_and_a_reservation_counts_at_release(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=1500)
    await store.open()
    a, da = blob(1000, 1)
    await put(store, da, a)
    with store.pinned(a):
        with store.pinned(a):
            pass
        await store.make_room()
        with store.reservation(1000):
            await store.make_room()
            assert store.has(a) and store.pinned_bytes == 1000  # still pinned once: kept
    assert store.has(a)  # the reservation ended first: within budget
    with store.reservation(1000):
        with store.pinned(a):
            await store.make_room()
            assert store.has(a)
        # the release found the blob plus the reservation over budget and made room
        await wait_until(lambda: not store.has(a))
        await wait_until(lambda: not store._tasks)  # and the eviction task was let go
    assert store.evictions == 1 and store.evicted_bytes == 1000 and store.pinned_bytes == 0
    await store.close()


def test_a_pin_released_after_the_loop_closed(tmp_path: Path) -> None:
    """At exit a stream may be finalized after the loop is gone: the release is dropped quietly."""
    store = BlobStore(tmp_path, max_bytes=1500)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(store.open())
    a, _ = blob(10, 1)
    pin = store.pinned(a)
    pin.__enter__()
    loop.run_until_complete(store.close())
    loop.close()
    pin.__exit__(None, None, None)  # outside the (closed) loop: no error


class FakeDisk:
    """A file system whose free space is what the store's blobs leave of a fixed capacity."""

    def __init__(self, store: BlobStore, capacity: int) -> None:
        self.store, self.capacity = store, capacity

    def __call__(self, path: object) -> shutil._ntuple_diskusage:
        assert path == self.store.root
        free = self.capacity - self.store.used_bytes
        return shutil._ntuple_diskusage(self.capacity, self.capacity - free, free)


async def test_ensure_free_evicts_lru_blobs_until_the_disk_has_room(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 30)
    await store.open()
    blobs = [blob(1000, i) for i in range(4)]
    for d, data in blobs:
        await put(store, data, d)
    monkeypatch.setattr(shutil, "disk_usage", FakeDisk(store, FREE_SPACE_RESERVE + 5500))
    await store.ensure_free(1500)  # 1,500 free beyond the reserve: enough
    assert store.evictions == 0 and len(store.digests()) == 4
    with store.pinned(blobs[0][0]):
        # 1,500 + reserve needs 2,000 more bytes: the two least recently used unpinned blobs go
        # and the free space is then exactly enough
        await store.ensure_free(3500)
    assert store.digests() == [blobs[0][0], blobs[3][0]]
    assert store.evictions == 2 and not store.path(blobs[1][0]).exists()
    with store.pinned(blobs[0][0]), store.pinned(blobs[3][0]), pytest.raises(errors.StoreFull) as exc:
        await store.ensure_free(4000)  # everything left is in use
    assert str(exc.value) == "no disk space for a 4000-byte blob in the cache"
    assert store.digests() == [blobs[0][0], blobs[3][0]] and store.evictions == 2
    with pytest.raises(errors.StoreFull):
        await store.ensure_free(10_000)  # more than the whole disk: all goes, still no room
    assert store.digests() == [] and store.evictions == 4
    await store.close()


async def test_open_goes_on_when_junk_cannot_be_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Junk in downloads/ or blobs/ that cannot be deleted is left; the store still opens."""
    (tmp_path / "downloads" / "stuck").mkdir(parents=True)
    d, data = blob(100, 1)
    prefix = tmp_path / "blobs" / "sha256" / d.hex[:2]
    prefix.mkdir(parents=True)
    (prefix / d.hex).write_bytes(data)
    (prefix / "stuck").mkdir()
    real_rmdir = os.rmdir

    def rmdir(path: str | Path, *, dir_fd: int | None = None) -> None:
        if Path(path).name == "stuck":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir)
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    assert store.digests() == [d]
    assert (tmp_path / "downloads" / "stuck").is_dir()
    await store.close()


async def test_close_returns_with_every_index_write_on_disk(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Index writes go to the store's own writer thread, and close() drains it: they do not wait in
    the loop's shared thread pool, which other work can keep busy."""
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(100, 1)
    await put(store, data, d)
    loop = asyncio.get_running_loop()
    shared = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(shared)
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait)  # the shared pool is busy with other work
    try:
        now = time.time()
        monkeypatch.setattr("shoal.store.time.time", lambda: now + 3600)
        store.touch(d)
        async with asyncio.timeout(5):
            await store.close()
        raw = diskcache.Cache(str(tmp_path / "index"), eviction_policy="none")
        assert json.loads(raw.get(str(d)))["atime"] == now + 3600
        raw.close()
    finally:
        release.set()
        await busy
        shared.shutdown(wait=True)


async def test_a_failed_stamp_check_is_done_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(100, 1)
    await put(store, data, d)
    real_lstat = os.lstat
    failures = [OSError(errno.EIO, "I/O error")]

    def lstat(path: str | Path) -> os.stat_result:
        if failures:
            raise failures.pop()
        return real_lstat(path)

    monkeypatch.setattr(os, "lstat", lstat)
    hashed = count_hashes(monkeypatch)
    assert await store.verify(d) and store.has(d) and hashed == [] and failures == []
    await store.close()


async def test_index_writes_run_in_order_in_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(100, 1)
    await put(store, data, d)
    done: list[tuple[int, str, float | None]] = []
    real_set, real_delete = diskcache.Cache.set, diskcache.Cache.delete
    gate = threading.Event()  # holds the first write until all the others are queued
    first = [True]

    def recording_set(cache: diskcache.Cache, key: str, value: str, *args: object, **kwargs: object) -> bool:
        if first:
            first.clear()
            gate.wait(10)
        done.append((threading.get_ident(), "set", json.loads(value)["atime"]))
        return bool(real_set(cache, key, value, *args, **kwargs))

    def recording_delete(cache: diskcache.Cache, key: str, *args: object, **kwargs: object) -> bool:
        done.append((threading.get_ident(), "delete", None))
        return bool(real_delete(cache, key, *args, **kwargs))

    monkeypatch.setattr(diskcache.Cache, "set", recording_set)
    monkeypatch.setattr(diskcache.Cache, "delete", recording_delete)
    start = float(int(time.time()) + 120)
    for i in range(30):  # thirty hits a minute apart, written back to back
        monkeypatch.setattr("shoal.store.time.time", lambda i=i: start + 60 * i)
        store.touch(d)
    gate.set()
    await store.remove(d, reason="test")
    await store.close()
    assert len({ident for ident, _, _ in done}) == 1
    assert [(op, atime) for _, op, atime in done] == [("set", start + 60 * i) for i in range(30)] + [("delete", None)]
    assert index_keys(tmp_path) == []


async def test_a_blobs_sources_are_kept_across_restarts_and_go_with_it(tmp_path: Path) -> None:
    """The registries known to hold a cached blob (agent/provenance.py): added once each,
    persisted beside its metainfo, forgotten when the blob leaves the cache."""
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(1000, 7)
    assert await store.sources(d) == frozenset()
    await put(store, data, d)
    await store.add_source(d, "registry.a:5000")
    await store.add_source(d, "registry.b")
    await store.add_source(d, "registry.a:5000")
    assert await store.sources(d) == {"registry.a:5000", "registry.b"}
    await store.close()
    legacy = tmp_path / "meta" / f"{d.hex}.from"  # what a sample "proved" before: not trusted
    legacy.write_text("registry.liar\n")
    reopened = BlobStore(tmp_path, max_bytes=1 << 20)
    await reopened.open()
    assert await reopened.sources(d) == {"registry.a:5000", "registry.b"}
    assert not legacy.exists()
    await reopened.remove(d, reason="test")
    assert await reopened.sources(d) == frozenset()
    await put(reopened, data, d)  # cached again: it starts with no source
    assert await reopened.sources(d) == frozenset()
    await reopened.close()


async def test_a_blobs_admission_receipt_is_kept_across_restarts_and_goes_with_it(tmp_path: Path) -> None:
    """The receipt of this node's admission to a blob's swarm (agent/membership.py), kept beside
    its metainfo so that a restart can have the grant renewed; none when none was given."""
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(1000, 8)
    other, other_data = blob(900, 9)
    await put(store, data, d)
    await put(store, other_data, other)
    await store.save_metainfo(d, b"metainfo", "signature", "receipt-1")
    await store.save_metainfo(other, b"metainfo", "signature")  # an earlier version's: no receipt
    assert await store.load_receipt(d) == "receipt-1"
    assert await store.load_receipt(other) is None and not (tmp_path / "meta" / f"{other.hex}.receipt").exists()
    assert await store.load_metainfo(d) == (b"metainfo", "signature")
    assert not [p for p in (tmp_path / "meta").iterdir() if p.name.startswith(".")]  # no temporary file left
    await store.close()
    stray = tmp_path / "meta" / f"{'0' * 64}.receipt"  # of a blob not in the cache
    stray.write_text("receipt-0")
    reopened = BlobStore(tmp_path, max_bytes=1 << 20)
    await reopened.open()
    assert await reopened.load_receipt(d) == "receipt-1" and not stray.exists()
    (tmp_path / "meta" / f"{other.hex}.receipt").write_text("  \n")
    assert await reopened.load_receipt(other) is None  # empty: none
    await reopened.save_metainfo(other, b"metainfo", "signature", "")
    assert await reopened.load_receipt(other) is None
    await reopened.remove(d, reason="test")
    assert await reopened.load_receipt(d) is None
    assert not any(p.name.startswith(d.hex) for p in (tmp_path / "meta").iterdir())
    await reopened.close()


async def test_adopt_in_place_hashes_a_file_changed_after_it_was_verified(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A write between the verification (before libtorrent's move) and the adoption (after it):
    the stamp taken at the adoption would have vouched for the changed bytes."""
    store = BlobStore(tmp_path, max_bytes=1 << 20)
    await store.open()
    d, data = blob(700, 2)
    store.blob_dir(d).mkdir(parents=True, exist_ok=True)
    moved = store.path(d)
    moved.write_bytes(data)
    verified = os.stat(moved)
    hashed = count_hashes(monkeypatch)
    await store.adopt_in_place(d, verified)  # unchanged: taken without a second hash
    assert store.has(d) and hashed == []
    await store.remove(d, reason="test")
    moved.write_bytes(data)
    verified = os.stat(moved)
    with open(moved, "r+b") as f:
        f.seek(350)
        f.write(bytes([data[350] ^ 1]))
    os.utime(moved, ns=(verified.st_atime_ns, verified.st_mtime_ns + 1_000_000))  # (coarse clocks)
    with pytest.raises(errors.IntegrityError):
        await store.adopt_in_place(d, verified)
    assert not store.has(d)
    await store.close()
