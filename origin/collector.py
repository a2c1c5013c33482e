"""The journal collector: agents' pull records, stored once, queried and exported.

Records are kept in SQLite (`audit.db`, WAL, synchronous=FULL) with (event_id, phase) as the
primary key: a batch re-sent after a crash or a lost answer inserts nothing twice. A batch is
acknowledged only after its transaction is on disk. Queries merge each event's start and end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import audit, protocol

log = logging.getLogger(__name__)

MAX_BATCH = 5000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    event_id   TEXT NOT NULL,
    phase      TEXT NOT NULL,
    ts         TEXT NOT NULL,
    node       TEXT,
    principal  TEXT,
    ns         TEXT,
    repository TEXT,
    reference  TEXT,
    digest     TEXT,
    doc        TEXT NOT NULL,
    received   REAL NOT NULL,
    PRIMARY KEY (event_id, phase)
);
CREATE INDEX IF NOT EXISTS records_ts ON records (ts);
CREATE INDEX IF NOT EXISTS records_repository ON records (repository);
CREATE INDEX IF NOT EXISTS records_digest ON records (digest);
CREATE INDEX IF NOT EXISTS records_principal ON records (principal);
CREATE INDEX IF NOT EXISTS records_node ON records (node);
"""


@dataclass(frozen=True, slots=True)
class Stored:
    accepted: int
    duplicates: int
    rejected: int


class Collector:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector")
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0

    async def open(self) -> None:
        def work() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._io, work)

    async def close(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.close()

        await asyncio.get_running_loop().run_in_executor(self._io, work)
        self._io.shutdown(wait=True)

    async def store(self, node: str, raw_records: list[Any]) -> Stored:
        rows = []
        rejected = max(0, len(raw_records) - MAX_BATCH)  # counted, not silently dropped
        first_reason = f"more than {MAX_BATCH} records in a batch" if rejected else ""
        for raw in raw_records[:MAX_BATCH]:
            try:
                rec = audit.validate(raw)
            except audit.RecordError as exc:
                rejected += 1
                first_reason = first_reason or str(exc)
                continue
            if rec.get("node") not in (None, node):
                rejected += 1
                first_reason = first_reason or f"a record claims node {str(rec.get('node'))[:64]!r}"
                continue
            rows.append((rec["event_id"], rec["phase"], rec["ts"], node, rec.get("principal"), rec.get("ns"),
                         rec.get("repository"), rec.get("reference"), rec.get("digest"),
                         json.dumps({**rec, "node": node}, separators=(",", ":")), time.time()))

        if rejected:  # once per batch (once per record was 15,000 lines in 10 s)
            log.warning("refused %d of %d journal records from %s (first: %s)", rejected, len(raw_records), node,
                        first_reason)

        def work() -> int:
            assert self._db is not None
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                inserted = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return inserted

        inserted = await asyncio.get_running_loop().run_in_executor(self._io, work)
        self.stored += inserted
        self.duplicates += len(rows) - inserted
        self.rejected += rejected
        return Stored(inserted, len(rows) - inserted, rejected)

    async def query(self, q: protocol.AuditQuery) -> list[dict[str, Any]]:
        """Merged events whose start matches the filters, oldest first (`image` must have been
        resolved into ns, repository and digest or reference; `format` is the caller's)."""
        where, args = ["phase = 'start'"], []
        for column in ("repository", "digest", "reference", "ns", "principal", "node"):
            value = getattr(q, column)
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.since is not None:
            where.append("ts >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("ts < ?")
            args.append(q.until)
        limit = max(1, min(q.limit, protocol.AUDIT_MAX_LIMIT))

        def work() -> list[dict[str, Any]]:
            assert self._db is not None
            starts = self._db.execute(
                f"SELECT event_id, doc FROM records WHERE {' AND '.join(where)} ORDER BY ts LIMIT ?",  # noqa: S608
                [*args, limit]).fetchall()  # (the WHERE clause is built from fixed column names only)
            ends: dict[str, dict[str, Any]] = {}
            ids = [row[0] for row in starts]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for event_id, doc in self._db.execute(
                        f"SELECT event_id, doc FROM records WHERE phase = 'end' AND event_id IN ({marks})",  # noqa: S608
                        chunk):
                    ends[event_id] = json.loads(doc)
            return [audit.merge(json.loads(doc), ends.get(event_id)) for event_id, doc in starts]

        return await asyncio.get_running_loop().run_in_executor(self._io, work)
