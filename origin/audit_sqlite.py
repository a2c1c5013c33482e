"""The audit store in SQLite (`audit.db` in the data directory, WAL, synchronous=FULL): one
origin's embedded default. (event_id, phase) is the primary key, so a batch re-sent after a crash
or a lost answer inserts nothing twice; a batch's transaction is on disk before it returns."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shoal_origin.audit_store import BLOCKED, Filters, Row, storable, storable_text

AUDIT_DB = "audit.db"  # in the data directory
SCHEMA = """
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


class SqliteStore:
    workers = 1  # one connection, one writer

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """`create=False` (the offline admin commands): the file must exist; a wrong data_dir
        never gets an empty database."""
        self.path = path
        self.create = create
        self._db: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def open(self) -> None:
        if self.create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        else:
            if not self.path.exists():
                raise FileNotFoundError(self.path)
            db = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA busy_timeout=10000")  # beside a running origin
        db.executescript(SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "open() first"
        return self._db

    def check(self) -> str | None:
        return None  # a local file: its failures are the disk's, reported by the requests themselves

    def enroll(self, node: str, public_key: str, max_nodes: int, now: float) -> str:
        db = self.db
        if db.execute("SELECT 1 FROM banned_keys WHERE public_key = ?", (public_key,)).fetchone():
            return "banned"
        row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
        if row is not None:
            return "ok" if row[0] == public_key else "blocked" if row[0] == BLOCKED else "taken"
        if db.execute("SELECT count(*) FROM nodes").fetchone()[0] >= max_nodes:
            return "full"
        db.execute("INSERT INTO nodes VALUES (?, ?, ?)", (node, public_key, now))
        return "enrolled"

    def node_key(self, node: str) -> str | None:
        row = self.db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
        return None if row is None else str(row[0])

    def insert(self, node: str, rows: list[Row]) -> tuple[int, int]:
        rows = [storable(row) for row in rows]
        db = self.db
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

    def insert_operator(self, rows: list[Row]) -> None:
        rows = [storable(row) for row in rows]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def query(self, filters: Filters) -> list[tuple[str, str | None]]:
        where, args = ["phase = 'start'"], []
        for column, value in filters.equals.items():
            where.append(f"{column} = ?")  # (a name from FILTER_COLUMNS)
            args.append(storable_text(value))
        if filters.since is not None:
            where.append("ts >= ?")
            args.append(storable_text(filters.since))
        if filters.until is not None:
            where.append("ts < ?")
            args.append(storable_text(filters.until))
        db = self.db
        starts = db.execute(
            f"SELECT event_id, node, doc FROM records WHERE {' AND '.join(where)} ORDER BY ts LIMIT ?",  # noqa: S608
            [*args, filters.limit]).fetchall()  # (the WHERE clause is built from fixed column names only)
        ends: dict[tuple[str, str], str] = {}
        ids = [row[0] for row in starts]
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for event_id, node, doc in db.execute(
                    f"SELECT event_id, node, doc FROM records WHERE phase = 'end' AND event_id IN ({marks})",  # noqa: S608
                    chunk):
                ends[(event_id, node)] = doc
        # an event's end is the one its own node recorded
        return [(doc, ends.get((event_id, node))) for event_id, node, doc in starts]

    def unban(self, node: str) -> int:
        db = self.db
        db.execute("DELETE FROM nodes WHERE name = ? AND public_key = ?", (node, BLOCKED))
        return int(db.execute("DELETE FROM banned_keys WHERE name = ?", (node,)).rowcount)

    def enroll_node(self, node: str, public_key: str, *, replace: bool, now: float) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM banned_keys WHERE public_key = ?", (public_key,)).fetchone():
                raise ValueError("this key is banned (lift the ban first: forget-node NAME --unban)")
            row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
            if row is not None and row[0] not in (BLOCKED, public_key) and not replace:
                raise ValueError(f"node {node!r} is bound to another key (give --replace to rebind it)")
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?)", (node, public_key, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def forget_node(self, node: str, *, ban: bool, now: float) -> bool:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT public_key FROM nodes WHERE name = ?", (node,)).fetchone()
            if row is not None and row[0] == BLOCKED and not ban:
                raise ValueError(f"node {node!r} is banned: bind the real node's new key with enroll-node, "
                                 "or lift the ban with --unban")
            if row is not None:
                if ban:
                    # the key, under any name, and the name, for any new key: a compromised host
                    # would otherwise come back under the same name with a fresh key
                    db.execute("INSERT OR IGNORE INTO banned_keys VALUES (?, ?, ?)", (row[0], node, now))
                    db.execute("UPDATE nodes SET public_key = ? WHERE name = ?", (BLOCKED, node))
                else:
                    db.execute("DELETE FROM nodes WHERE name = ?", (node,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return row is not None
