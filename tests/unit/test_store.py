from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable, Generator
from pathlib import Path

import pytest

from shoal import errors
from shoal.oci import Digest
from shoal.store import BlobStore, stamp_of


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
    import diskcache

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
    clock = [time.time() + 120]  # a while after the blobs were stored
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
    await store.close()
    # after a restart the order is what the index recorded
    again = BlobStore(tmp_path, max_bytes=1 << 20)
    await again.open()
    assert again.digests() == [newer[0], older[0]]
    await again.close()
