"""The journal collector: agents' pull records, stored once, queried and exported.

Records are kept in SQLite (`audit.db`, WAL, synchronous=FULL) with (event_id, phase) as the
primary key: a batch re-sent after a crash or a lost answer inserts nothing twice. A batch is
acknowledged only after its transaction is on disk. Queries merge each event's start and end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal import audit, errors, peercerts, protocol

log = logging.getLogger(__name__)

MAX_BATCH = 5000
AUDIT_DB = "audit.db"  # in the data directory
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
CREATE TABLE IF NOT EXISTS nodes (
    name       TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    enrolled   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS banned_keys (
    public_key TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    banned     REAL NOT NULL
);
"""
# The origin's own seeder is admitted without enrolling, and the origin files its operator
# events under this name (shoal.audit.OPERATOR_NODE): no node may take it.
RESERVED_NODES = frozenset({"origin", audit.OPERATOR_NODE})
# The key of a name banned with `forget-node --ban`: matches no key, so the name stays taken.
BLOCKED = ""
_REFUSALS = {
    "taken": "enrolled with another key (a node that lost its key is released by an operator on the "
             "origin host: shoal-origin forget-node NAME --config ORIGIN_CONFIG)",
    "banned": "this key was banned by an operator (shoal-origin forget-node --ban)",
    "blocked": "this name was banned by an operator; it takes a key again only through "
               "shoal-origin enroll-node NAME --public-key FILE",
    "full": "the origin has enrolled max_nodes nodes",
}


@dataclass(frozen=True, slots=True)
class Stored:
    accepted: int
    duplicates: int
    rejected: int


class Collector:
    def __init__(self, path: Path, *, max_nodes: int = 10_000) -> None:
        self.path = path
        self.max_nodes = max_nodes
        self.enrollment_refusals = 0
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

    async def enroll(self, node: str, public_key: str) -> None:
        """Bind `node` to the key it first asked for a swarm token with (trust on first use); a
        later request for that name with another key is refused. So the cluster's node token
        lets its holder add nodes, never act as one that enrolled (it would need its key)."""
        if node in RESERVED_NODES:
            raise errors.Denied(f"the node name {node!r} is reserved")

        def work() -> str:
            assert self._db is not None
            db = self._db
            if db.execute("SELECT 1 FROM banned_keys WHERE public_key = ?", (public_key,)).fetchone():
                return "banned"
            row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
            if row is not None:
                return "ok" if row[0] == public_key else "blocked" if row[0] == BLOCKED else "taken"
            if db.execute("SELECT count(*) FROM nodes").fetchone()[0] >= self.max_nodes:
                return "full"
            db.execute("INSERT INTO nodes VALUES (?, ?, ?)", (node, public_key, time.time()))
            log.info("node %s enrolled", node)  # (a validated DNS name)
            return "ok"

        verdict = await asyncio.get_running_loop().run_in_executor(self._io, work)
        if verdict == "ok":
            return
        self.enrollment_refusals += 1
        # the node name is a validated DNS name, the reason one of the fixed texts above
        log.warning("refused a swarm token for node %s: %s", node, _REFUSALS[verdict])  # log-safe
        raise errors.Denied(f"node {node!r}: {_REFUSALS[verdict]}")

    async def node_key(self, node: str) -> Ed25519PublicKey | None:
        """The key `node` enrolled with, if it did."""
        def work() -> Any:
            assert self._db is not None
            return self._db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()

        row = await asyncio.get_running_loop().run_in_executor(self._io, work)
        return None if row is None or row[0] == BLOCKED else peercerts.parse_public_key(str(row[0]))

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

        def work() -> tuple[int, int]:
            assert self._db is not None
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                # An event belongs to the node that recorded it first: another node (anyone
                # holding the node token can enroll one) may not add its end, or its start.
                ids = list({row[0] for row in rows})
                taken: set[str] = set()
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    taken.update(r[0] for r in db.execute(
                        f"SELECT DISTINCT event_id FROM records WHERE node <> ? AND event_id IN "  # noqa: S608
                        f"({','.join('?' * len(chunk))})", [node, *chunk]))  # (placeholders only)
                mine = [row for row in rows if row[0] not in taken]
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", mine)
                inserted = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return inserted, len(rows) - len(mine)

        inserted, foreign = await asyncio.get_running_loop().run_in_executor(self._io, work)
        if foreign:
            rejected += foreign
            first_reason = first_reason or "a record's event belongs to another node"
        if rejected:  # once per batch (once per record was 15,000 lines in 10 s)
            log.warning("refused %d of %d journal records from %s (first: %s)", rejected, len(raw_records), node,
                        first_reason)
        kept = len(rows) - foreign
        self.stored += inserted
        self.duplicates += kept - inserted
        self.rejected += rejected
        return Stored(inserted, kept - inserted, rejected)

    async def record_operator(self, start: dict[str, Any], end: dict[str, Any]) -> None:
        """Store an operator event (shoal.audit.operator_records), durably, before the origin
        answers the operator: under the reserved node name, which no node can ship records as."""
        rows = [(rec["event_id"], rec["phase"], rec["ts"], audit.OPERATOR_NODE, rec.get("principal"), None, None,
                 None, None, json.dumps({**rec, "node": audit.OPERATOR_NODE}, separators=(",", ":")), time.time())
                for rec in (start, end)]

        def work() -> None:
            assert self._db is not None
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await asyncio.get_running_loop().run_in_executor(self._io, work)

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
                f"SELECT event_id, node, doc FROM records WHERE {' AND '.join(where)} ORDER BY ts LIMIT ?",  # noqa: S608
                [*args, limit]).fetchall()  # (the WHERE clause is built from fixed column names only)
            ends: dict[tuple[str, str], dict[str, Any]] = {}
            ids = [row[0] for row in starts]
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for event_id, node, doc in self._db.execute(
                        f"SELECT event_id, node, doc FROM records WHERE phase = 'end' AND event_id IN ({marks})",  # noqa: S608
                        chunk):
                    ends[(event_id, node)] = json.loads(doc)
            # an event's end is the one its own node recorded
            return [audit.merge(json.loads(doc), ends.get((event_id, node))) for event_id, node, doc in starts]

        return await asyncio.get_running_loop().run_in_executor(self._io, work)


def _open_existing(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FileNotFoundError(path)  # a wrong data_dir: never create an empty database there
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(_SCHEMA)
    return db


def unban(path: Path, node: str) -> int:
    """Lift the bans of keys banned under `node`'s name, and free the name; how many keys."""
    with contextlib.closing(_open_existing(path)) as db:
        db.execute("DELETE FROM nodes WHERE name = ? AND public_key = ?", (node, BLOCKED))
        return int(db.execute("DELETE FROM banned_keys WHERE name = ?", (node,)).rowcount)


def enroll_node(path: Path, node: str, public_key: str, *, replace: bool = False) -> None:
    """Bind `node` to `public_key` (PEM): an operator admitting a node ahead of its first start
    (no one can take its name first), or again after a ban. Refused (ValueError, saying why) for
    a reserved name, a banned key, or a name bound to another live key unless `replace`."""
    if node in RESERVED_NODES:
        raise ValueError(f"the node name {node!r} is reserved")
    canonical = peercerts.canonical_public_pem(peercerts.parse_public_key(public_key))
    with contextlib.closing(_open_existing(path)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM banned_keys WHERE public_key = ?", (canonical,)).fetchone():
                raise ValueError("this key is banned (lift the ban first: forget-node NAME --unban)")
            row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
            if row is not None and row[0] not in (BLOCKED, canonical) and not replace:
                raise ValueError(f"node {node!r} is bound to another key (give --replace to rebind it)")
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?)", (node, canonical, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def forget_node(path: Path, node: str, *, ban: bool = False) -> bool:
    """Release a node's name, so that it enrolls again with a new key (a node that lost its
    data directory); with `ban` (a compromised node), its key is refused under any name from now
    on and the name takes no new key until enroll_node binds one (its certificate stays valid
    until it expires, at most swarm_token_ttl). Run on the origin host: only who can write
    audit.db can do this. False if no such node enrolled."""
    with contextlib.closing(_open_existing(path)) as db:
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
        if row is not None and row[0] == BLOCKED and not ban:
            db.execute("ROLLBACK")
            raise ValueError(f"node {node!r} is banned: bind the real node's new key with enroll-node, "
                             "or lift the ban with --unban")
        if row is not None:
            if ban:
                # the key, under any name, and the name, for any new key: a compromised host
                # would otherwise come back under the same name with a fresh key
                db.execute("INSERT OR IGNORE INTO banned_keys VALUES (?, ?, ?)", (row[0], node, time.time()))
                db.execute("UPDATE nodes SET public_key = ? WHERE name = ?", (BLOCKED, node))
            else:
                db.execute("DELETE FROM nodes WHERE name = ?", (node,))
        db.execute("COMMIT")
        return row is not None
