"""The agent's pull journal: append-only JSON lines, durable before a response starts.

Records go to `segment-<seq>.jsonl` files under the journal directory. `record()` returns only
after the line is written and fsync'd; concurrent records share one fsync (group commit), so
the cost is one disk flush per burst, not per request. A segment is closed at
`max_segment_bytes`, or earlier by `roll()` once everything in it was shipped (so shipped records
do not wait for a 64 MiB rotation, nine hours at a busy node, to be freed); a restarted agent
always starts a new segment, so a line torn by a crash stays at the end of a finished segment,
where the shipper drops it (it was never acknowledged, so its response never started).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shoal import audit, errors

log = logging.getLogger(__name__)

SEGMENT_RE = re.compile(r"segment-(\d{10})\.jsonl")


def _lines(docs: tuple[dict[str, Any], ...]) -> bytes:
    return b"".join(audit.line(doc) for doc in docs)


def segment_name(seq: int) -> str:
    return f"segment-{seq:010d}.jsonl"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """Existing segments, oldest first (blocking)."""
    found = []
    for path in directory.iterdir():
        m = SEGMENT_RE.fullmatch(path.name)
        if m and path.is_file() and not path.is_symlink():
            found.append((int(m.group(1)), path))
    return sorted(found)


class JournalError(errors.ShoalError):
    """The journal cannot be written: nothing may be served unrecorded."""

    oci = errors.UNAVAILABLE


DEFAULT_MAX_DISK_BYTES = 1 << 30


class Journal:
    def __init__(self, directory: Path, *, max_segment_bytes: int, max_disk_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_segment_bytes = max_segment_bytes
        self.max_disk_bytes = max_disk_bytes  # None: no budget
        self._disk = 0  # bytes of segments on disk, as of the last append or recount
        self.active_seq = 0
        self.written = asyncio.Event()  # set after each flush; the shipper waits on it
        self.records_written = 0
        self._fd = -1
        self._size = 0
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")

    async def open(self) -> None:
        def work() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            existing = segments(self.directory)
            self._start_segment(existing[-1][0] + 1 if existing else 1)
            self._disk = self.disk_bytes()

        await asyncio.get_running_loop().run_in_executor(self._io, work)

    def _start_segment(self, seq: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        path = self.directory / segment_name(seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)  # the new segment's name is durable too
        finally:
            os.close(fd)
        self._size = os.fstat(self._fd).st_size
        self.active_seq = seq

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

        def work() -> None:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

        await asyncio.get_running_loop().run_in_executor(self._io, work)
        self._io.shutdown(wait=True)

    async def record(self, *docs: dict[str, Any]) -> None:
        """Append records (one line each, in one write); returns once they are on disk.
        JournalError if they cannot be."""
        line = _lines(docs)
        # The budget gates new responses (start records); a started one always gets its end.
        if self.max_disk_bytes is not None and self._disk + len(line) > self.max_disk_bytes and \
                any(doc.get("phase") == "start" for doc in docs):
            # (a client sending 8 KB references wrote 13 MB/s of journal while shipping was down)
            # (on disk: records not yet shipped, and shipped ones the active segment still holds)
            raise JournalError(f"the pull journal is full ({self._disk} bytes on disk, at journal.max_disk_bytes: "
                               "shipping to the collector is behind); nothing is served unrecorded")
        await self._queue(line)

    def record_later(self, *docs: dict[str, Any]) -> None:
        """Append records without waiting for the disk: for a response's end record, whose
        client has had every byte (its start record went to disk before the first one), and
        whose connection would otherwise wait for one more fsync before its next request.
        They are written in order with the next group commit; a failure to write is logged
        there (the response is over: nothing to refuse)."""
        fut = self._queue(_lines(docs))
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _queue(self, line: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((line, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            data = b"".join(line for line, _ in batch)
            try:
                await loop.run_in_executor(self._io, self._append, data)
            except OSError as exc:
                log.error("cannot write the pull journal: %s", exc.strerror)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(JournalError("the pull journal cannot be written; not serving"))
                continue
            self.records_written += data.count(b"\n")
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            self.written.set()

    @property
    def active_bytes(self) -> int:
        return self._size

    def recount(self) -> None:
        """Count the segments on disk again (blocking), after the shipper removed some."""
        self._disk = self.disk_bytes()

    def disk_bytes(self) -> int:
        """Bytes of every segment on disk (blocking: a directory listing)."""
        total = 0
        for _, path in segments(self.directory):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue  # shipped and removed meanwhile
        return total

    async def roll(self, *, min_bytes: int) -> bool:
        """Close the active segment and start the next if it holds at least `min_bytes`. Runs
        in the writer's thread, between appends, so no record is split."""
        def work() -> bool:
            if self._fd < 0 or self._size < min_bytes:
                return False
            self._start_segment(self.active_seq + 1)
            return True

        return await asyncio.get_running_loop().run_in_executor(self._io, work)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)  # data and the size that makes it readable; 0.2 ms here
        self._size += len(data)
        self._disk += len(data)
        if self._size >= self.max_segment_bytes:
            self._start_segment(self.active_seq + 1)
