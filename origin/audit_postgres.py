"""The audit store in PostgreSQL: one trail (records, enrolled nodes, banned keys) for every
origin given the same database. psycopg 3 with a bounded pool of connections, each checked before
use (so the pool reconnects after PostgreSQL restarts); the collector calls it from as many
threads as the pool has connections.

Exactly-once as in SQLite: (event_id, phase) is the primary key and a batch is one
`INSERT ... ON CONFLICT DO NOTHING`, acknowledged only after its COMMIT returned. Two origins that
store the same batch at once insert each record once (the second waits on the first's index
entries, then skips them). PostgreSQL unreachable: StoreUnavailable (the collector answers 503,
the agent keeps the batch and sends it again)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from shoal_origin.audit_store import BLOCKED, Filters, Row, StoreUnavailable, storable, storable_text
from shoal_origin.config import PostgresSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant: origins starting at once take this transaction lock before creating the schema
# (concurrent CREATE TABLE IF NOT EXISTS can fail on the catalog's unique index).
_SCHEMA_LOCK = 0x5E0A1_A0D17
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
    received   DOUBLE PRECISION NOT NULL,
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
    enrolled   DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS banned_keys (
    public_key TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    banned     DOUBLE PRECISION NOT NULL
);
"""
# After a failure to reach PostgreSQL, calls for this long are refused at once rather than each
# waiting connect_timeout in one of pool_size threads: a fleet's retries would otherwise queue
# behind one another and be answered later than the agents wait.
FAIL_FAST = 1.0
# Every table and index SCHEMA makes (the primary keys' indexes included).
_RELATIONS = ("records", "records_pkey", "records_ts", "records_repository", "records_digest", "records_principal",
              "records_node", "nodes", "nodes_pkey", "banned_keys", "banned_keys_pkey")
# One statement for a whole batch (up to collector.MAX_BATCH rows): the columns as arrays.
_INSERT_OPERATOR = (
    "INSERT INTO records (event_id, phase, ts, node, principal, ns, repository, reference, digest, doc, received) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::text[], %s::float8[])")
_INSERT = _INSERT_OPERATOR + " ON CONFLICT (event_id, phase) DO NOTHING"
_UNAVAILABLE = "the audit store (PostgreSQL) is unavailable; retry later"
# What a failure to reach the server (or a connection lost mid-call) raises.
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class PostgresStore:
    def __init__(self, settings: PostgresSettings, password: str | None) -> None:
        self.settings = settings
        self.workers = settings.pool_size
        params: dict[str, Any] = {
            "host": settings.host, "port": settings.port, "dbname": settings.dbname, "user": settings.user,
            "sslmode": settings.sslmode, "connect_timeout": max(1, round(settings.connect_timeout)),
            "application_name": settings.application_name, "autocommit": True,
        }
        if settings.sslrootcert is not None:
            params["sslrootcert"] = settings.sslrootcert
        if password is not None:
            params["password"] = password  # kept in the pool's kwargs only, never in a DSN string
            # Only through SCRAM: whoever answers at `host` (a spoofed name, a man in the middle
            # refusing TLS under sslmode prefer) could otherwise ask for it in clear, and get it.
            params["require_auth"] = "scram-sha-256"
        self._pool = ConnectionPool("", kwargs=params, min_size=1, max_size=settings.pool_size,
                                    timeout=settings.connect_timeout, check=ConnectionPool.check_connection,
                                    name="audit", open=False)
        self._schema_ready = False
        self._failed_at = -math.inf  # time.monotonic() of the last failure to reach PostgreSQL

    def __repr__(self) -> str:  # never the password
        s = self.settings
        return f"PostgresStore(host={s.host!r}, port={s.port}, dbname={s.dbname!r}, user={s.user!r})"

    def _where(self) -> str:
        s = self.settings
        return f"PostgreSQL at {s.host}:{s.port}/{s.dbname}"

    def open(self) -> None:
        """Start the pool. PostgreSQL down now is not fatal: the origin starts (seeding needs no
        database), answers 503 to the calls that do, and creates the schema when it can."""
        self._pool.open(wait=False)
        try:
            self._call(lambda conn: None)
        except StoreUnavailable:
            log.warning("%s is unreachable; the collector answers 503 until it is", self._where())

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _conn(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        if time.monotonic() - self._failed_at < FAIL_FAST:
            raise StoreUnavailable(_UNAVAILABLE)
        try:
            with self._pool.connection(timeout=timeout) as conn:
                if not self._schema_ready:
                    self._create_schema(conn)
                yield conn
        except _UNREACHABLE as exc:
            # the server's or libpq's words name host, port, user and database, never the password
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            self._failed_at = time.monotonic()
            log.warning("%s: %s", self._where(), reason)
            raise StoreUnavailable(_UNAVAILABLE) from None

    def _call(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        with self._conn() as conn:
            return work(conn)

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        # Present already (the usual start): no DDL at all. CREATE INDEX IF NOT EXISTS locks its
        # table before it finds the index, so an origin restarting beside a long transaction
        # would wait for it.
        found = conn.execute("SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
                             "AND relname = ANY(%s)", (list(_RELATIONS),)).fetchone()
        if found is not None and found[0] == len(_RELATIONS):
            self._schema_ready = True
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement.encode())  # (fixed text)
        self._schema_ready = True

    def check(self) -> str | None:
        try:
            # within a readiness probe's usual 1 s (a connection made meanwhile serves the next)
            with self._conn(timeout=min(1.0, self.settings.connect_timeout)) as conn:
                conn.execute("SELECT 1")
        except StoreUnavailable:
            return "the audit store (PostgreSQL) is unreachable"
        return None

    def enroll(self, node: str, public_key: str, max_nodes: int, now: float) -> str:
        def work(conn: psycopg.Connection[Any]) -> str:
            with conn.transaction():
                if conn.execute("SELECT 1 FROM banned_keys WHERE public_key = %s", (public_key,)).fetchone():
                    return "banned"
                row = conn.execute("SELECT public_key FROM nodes WHERE name = %s", (node,)).fetchone()
                if row is None:
                    count = conn.execute("SELECT count(*) FROM nodes").fetchone()
                    if count is not None and count[0] >= max_nodes:
                        return "full"
                    # another origin may bind the name between the SELECT and here: then its key decides
                    if conn.execute("INSERT INTO nodes VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
                                    (node, public_key, now)).rowcount == 1:
                        return "enrolled"
                    row = conn.execute("SELECT public_key FROM nodes WHERE name = %s", (node,)).fetchone()
                    assert row is not None
                return "ok" if row[0] == public_key else "blocked" if row[0] == BLOCKED else "taken"

        return self._call(work)

    def node_key(self, node: str) -> str | None:
        row = self._call(lambda conn: conn.execute("SELECT public_key FROM nodes WHERE name = %s",
                                                   (node,)).fetchone())
        return None if row is None else str(row[0])

    def insert(self, node: str, rows: list[Row]) -> tuple[int, int]:
        # In one order, so two transactions storing overlapping batches wait on each other's
        # index entries in the same order (never a deadlock).
        rows = sorted((storable(row) for row in rows), key=lambda r: (r[0], r[1]))

        def work(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            with conn.transaction():
                # An event belongs to the node that recorded it first: another node (anyone
                # holding the node token can enroll one) may not add its end, or its start.
                ids = sorted({row[0] for row in rows})
                taken = {r[0] for r in conn.execute(
                    "SELECT DISTINCT event_id FROM records WHERE node <> %s AND event_id = ANY(%s)", (node, ids))}
                mine = [row for row in rows if row[0] not in taken]
                inserted = conn.execute(_INSERT, [list(column) for column in zip(*mine, strict=True)]).rowcount \
                    if mine else 0
            return inserted, len(rows) - len(mine)  # the COMMIT above returned: on disk

        return self._call(work)

    def insert_operator(self, rows: list[Row]) -> None:
        rows = [storable(row) for row in rows]

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(_INSERT_OPERATOR,
                             [list(column) for column in zip(*rows, strict=True)])

        self._call(work)

    def query(self, filters: Filters) -> list[tuple[str, str | None]]:
        where, args = ["phase = 'start'"], []
        for column, value in filters.equals.items():
            where.append(f"{column} = %s")  # (a name from FILTER_COLUMNS)
            args.append(storable_text(value))
        if filters.since is not None:
            where.append("ts >= %s")
            args.append(storable_text(filters.since))
        if filters.until is not None:
            where.append("ts < %s")
            args.append(storable_text(filters.until))
        sql = (f"SELECT event_id, node, doc FROM records WHERE {' AND '.join(where)} "  # noqa: S608
               "ORDER BY ts, event_id LIMIT %s")  # (built from fixed column names only)

        def work(conn: psycopg.Connection[Any]) -> list[tuple[str, str | None]]:
            with conn.transaction():  # one snapshot for the starts and their ends
                starts = conn.execute(sql.encode(), [*args, filters.limit]).fetchall()
                ends = {(event_id, node): doc for event_id, node, doc in conn.execute(
                    "SELECT event_id, node, doc FROM records WHERE phase = 'end' AND event_id = ANY(%s)",
                    ([row[0] for row in starts],))}
            # an event's end is the one its own node recorded
            return [(doc, ends.get((event_id, node))) for event_id, node, doc in starts]

        return self._call(work)

    def unban(self, node: str) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("DELETE FROM nodes WHERE name = %s AND public_key = %s", (node, BLOCKED))
                return conn.execute("DELETE FROM banned_keys WHERE name = %s", (node,)).rowcount

        return self._call(work)

    def enroll_node(self, node: str, public_key: str, *, replace: bool, now: float) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                if conn.execute("SELECT 1 FROM banned_keys WHERE public_key = %s", (public_key,)).fetchone():
                    raise ValueError("this key is banned (lift the ban first: forget-node NAME --unban)")
                row = conn.execute("SELECT public_key FROM nodes WHERE name = %s FOR UPDATE", (node,)).fetchone()
                if row is not None and row[0] not in (BLOCKED, public_key) and not replace:
                    raise ValueError(f"node {node!r} is bound to another key (give --replace to rebind it)")
                conn.execute("INSERT INTO nodes VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE "
                             "SET public_key = excluded.public_key, enrolled = excluded.enrolled",
                             (node, public_key, now))

        self._call(work)

    def forget_node(self, node: str, *, ban: bool, now: float) -> bool:
        def work(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                row = conn.execute("SELECT public_key FROM nodes WHERE name = %s FOR UPDATE", (node,)).fetchone()
                if row is not None and row[0] == BLOCKED and not ban:
                    raise ValueError(f"node {node!r} is banned: bind the real node's new key with enroll-node, "
                                     "or lift the ban with --unban")
                if row is not None:
                    if ban:
                        # the key, under any name, and the name, for any new key
                        conn.execute("INSERT INTO banned_keys VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                     (row[0], node, now))
                        conn.execute("UPDATE nodes SET public_key = %s WHERE name = %s", (BLOCKED, node))
                    else:
                        conn.execute("DELETE FROM nodes WHERE name = %s", (node,))
                return row is not None

        return self._call(work)
