"""Ships journal segments to the origin's collector, in order, in batches, until acknowledged.

Progress is a (segment, offset) pair in `shipped.json`, replaced atomically and fsync'd only
after the collector answered 2xx, so a crash at any point re-sends at most the last batch; the
collector drops duplicates by (event_id, phase), which makes delivery exactly-once end to end.
A segment is deleted once it is fully shipped and the writer has moved on from it; when the
shipper has caught up and the active segment holds `roll_bytes` or more, it asks the writer to
move on. So the journal on disk is what the collector has not acknowledged plus less than
`roll_bytes` (and, while the collector is away, grows with the load: records are never dropped).

With several origins each batch goes to the first collector, in the given order (the rendezvous
order of the node's name), that takes it: one that cannot be reached or refuses is passed over
for the next, and the next batch starts again from the first, so a node's journal returns to
its own collector when that is back. A collector that failed is tried last for `cooldown`
seconds, so that a dead one (or one that hangs until the 30 s timeout) does not delay every
batch. (Deduplication across collectors needs them to share one
audit store; each keeps its own otherwise, and a batch acknowledged by one is never re-sent.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import errors, protocol
from shoal.clients import ApiError, OriginClient
from shoal.flights import Backoff
from shoal_agent.config import DEFAULT_ROLL_BYTES
from shoal_agent.journal import Journal, segments

log = logging.getLogger(__name__)

BATCH_RECORDS = 500
# Journal lines per batch: the body carries them as they are plus about 30 bytes, well within
# protocol.JOURNAL_MAX_BODY (a line is at most audit.MAX_RECORD_BYTES of escaped JSON, so
# it stays under the limit however many of them are non-ASCII).
BATCH_BYTES = 512 << 10
RETRY_MIN, RETRY_MAX = 0.5, 30.0


@dataclass(frozen=True, slots=True)
class Batch:
    seq: int
    start: int
    end: int  # offset after the last complete line taken
    records: list[object]


class Shipper:
    def __init__(self, journal: Journal, collector: OriginClient | Sequence[tuple[str, OriginClient]], *, node: str,
                 key: Ed25519PrivateKey, roll_bytes: int = DEFAULT_ROLL_BYTES,
                 before: Callable[[str], Awaitable[None]] | None = None,
                 not_enrolled: Callable[[str], None] | None = None, cooldown: float = RETRY_MAX) -> None:
        """`collector`: one origin, or several as (name, client) in the order to try them;
        `before(name)` runs before a batch goes to that origin (the node enrolls there), and
        `not_enrolled(name)` when that origin says it holds no enrollment of the node (the next
        `before` enrolls again)."""
        self.journal = journal
        self.collectors = [("origin", collector)] if isinstance(collector, OriginClient) else list(collector)
        self.before = before
        self.not_enrolled = not_enrolled
        self.cooldown = cooldown
        self._failed_at: dict[str, float] = {}  # collector -> when it last failed a batch
        self.node = node
        self._key = key
        self.state_path = journal.directory / "shipped.json"
        self.roll_bytes = roll_bytes
        self.shipped_records = 0
        self.rejected_records = 0
        self.failures = 0
        self.failovers = 0  # batches a collector did not take and the next one was asked
        self.rolls = 0
        self.cursor = (0, 0)  # (segment, offset) acknowledged so far
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shipper")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            batch = await loop.run_in_executor(self._io, self._next_batch)
            if batch is None:
                if self.journal.active_bytes >= self.roll_bytes and \
                        await self.journal.roll(min_bytes=self.roll_bytes):
                    self.rolls += 1
                    continue  # the next pass finishes the old segment and deletes it
                self.journal.written.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.journal.written.wait(), 1.0)
                continue
            if batch.end == batch.start:  # a finished segment ended: state already moved on
                continue
            ack = await self._send(batch)
            if ack is not None:
                await loop.run_in_executor(self._io, self._save_state, batch.seq, batch.end)
                self.shipped_records += ack.accepted + ack.duplicates
                if ack.rejected:
                    # audit.fit makes every record valid: a rejection is a bug on one side,
                    # said once per batch, counted, and the rest of the batch still kept.
                    self.rejected_records += ack.rejected
                    log.error("the collector refused %d of %d journal records", ack.rejected, len(batch.records))
                backoff.reset()
            else:
                self.failures += 1
                await asyncio.sleep(backoff.next())

    def _order(self) -> list[tuple[str, OriginClient]]:
        """The collectors in their order, those that failed within `cooldown` last."""
        now = time.monotonic()
        cooling = {n for n, t in self._failed_at.items() if now - t < self.cooldown}
        return sorted(self.collectors, key=lambda c: c[0] in cooling)  # (stable: the order otherwise)

    async def _send(self, batch: Batch) -> protocol.JournalAck | None:
        for name, collector in self._order():
            where = f" at origin {name}" if len(self.collectors) > 1 else ""
            try:
                if self.before is not None:
                    await self.before(name)
                ack = await collector.ship_journal(protocol.JournalBatch(self.node, batch.records), self._key,
                                                   within=30)
                self._failed_at.pop(name, None)
                return ack
            except ApiError as exc:
                log.warning("%s%s", exc, where)  # shoal's own text: what was refused, and the status
                if exc.not_enrolled and self.not_enrolled is not None:
                    self.not_enrolled(name)
            except (aiohttp.ClientError, TimeoutError, errors.ShoalError) as exc:
                reason = str(exc) if isinstance(exc, errors.ShoalError) else \
                    errors.connection_problem(exc, collector.base, what="the origin's collector")
                log.info("journal not shipped%s: %s; kept for retry", where, reason)
            self.failovers += len(self.collectors) > 1
            self._failed_at[name] = time.monotonic()
        return None

    # ----- files (blocking, in the shipper's thread) --------------------------------------------

    def unshipped_bytes(self) -> int:
        """Journal bytes the collector has not acknowledged (blocking: a directory listing)."""
        seq, offset = self.cursor
        total = 0
        for segment_seq, path in segments(self.journal.directory):
            if segment_seq < seq:
                continue
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            total += max(size - offset, 0) if segment_seq == seq else size
        return total

    def _load_state(self) -> tuple[int, int]:
        try:
            doc = json.loads(self.state_path.read_text())
            self.cursor = (int(doc["segment"]), int(doc["offset"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            self.cursor = (0, 0)
        return self.cursor

    def _save_state(self, seq: int, offset: int) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"segment": seq, "offset": offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_path)
        self.cursor = (seq, offset)
        dfd = os.open(self.journal.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _next_batch(self) -> Batch | None:
        """The next records to send, or None when everything written is shipped."""
        seq, offset = self._load_state()
        for segment_seq, path in segments(self.journal.directory):
            if segment_seq < seq:
                path.unlink(missing_ok=True)  # shipped earlier; removal was interrupted
                self.journal.recount()
                continue
            if segment_seq > seq:
                seq, offset = segment_seq, 0
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(BATCH_BYTES)
            end = data.rfind(b"\n") + 1
            if end == 0 and len(data) == BATCH_BYTES:
                log.error("journal line longer than %d bytes in %s; skipping it", BATCH_BYTES, path.name)
                end = len(data)
            take = data[:end].split(b"\n")[:-1][:BATCH_RECORDS]  # complete lines only
            records: list[object] = []
            for line in take:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    log.error("unreadable journal line in %s; skipping it", path.name)
            if take:
                return Batch(seq, offset, offset + sum(len(line) + 1 for line in take), records)
            if segment_seq == self.journal.active_seq:
                return None  # all caught up with the writer
            # A finished segment fully shipped (any torn tail was never acknowledged): move on.
            self._save_state(segment_seq + 1, 0)
            path.unlink(missing_ok=True)
            self.journal.recount()
            return Batch(segment_seq, offset, offset, [])
        return None
