"""The journal collector: agents' pull records, stored once, queried and exported.

The records, the enrolled nodes and the banned keys live in an audit store (audit_store.py):
SQLite in the data directory by default (audit_sqlite.py), or PostgreSQL shared by several
origins (audit_postgres.py, `audit.postgresql`). (event_id, phase) is unique there: a batch
re-sent after a crash or a lost answer inserts nothing twice. A batch is acknowledged only after
its transaction is committed. Queries merge each event's start and end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal import audit, errors, peercerts, protocol
from shoal_origin.audit_sqlite import AUDIT_DB, SqliteStore
from shoal_origin.audit_store import BLOCKED, FILTER_COLUMNS, AuditStore, Filters, Row, StoreUnavailable
from shoal_origin.config import OriginConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["AUDIT_DB", "BLOCKED", "RESERVED_NODES", "Collector", "StoreUnavailable", "Stored", "enroll_node",
           "forget_node", "store_for", "unban"]

MAX_BATCH = 5000
# The origin's own seeder is admitted without enrolling, and the origin files its operator
# events under this name (shoal.audit.OPERATOR_NODE): no node may take it.
RESERVED_NODES = frozenset({"origin", audit.OPERATOR_NODE})
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


def store_for(config: OriginConfig, *, create: bool = True) -> AuditStore:
    """The store the configuration names (not yet opened). Reads the PostgreSQL password now, so
    a bad secret fails at start with its key named. `create=False` (offline admin commands): an
    SQLite file must exist already."""
    pg = config.audit.postgresql
    if pg is None:
        return SqliteStore(Path(config.data_dir) / AUDIT_DB, create=create)
    from shoal_origin.audit_postgres import PostgresStore  # psycopg only where it is used

    return PostgresStore(pg, pg.password.read("audit.postgresql.password"))


class Collector:
    def __init__(self, store: AuditStore | Path, *, max_nodes: int = 10_000) -> None:
        self.backend = SqliteStore(store) if isinstance(store, Path) else store
        self.max_nodes = max_nodes
        self.enrollment_refusals = 0
        self._io = ThreadPoolExecutor(max_workers=self.backend.workers, thread_name_prefix="collector")
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0
        self.unavailable = 0  # calls answered 503: the store could not be reached
        # told of each stored batch's records (node, validated records; a re-sent batch again):
        # the status page counts bytes served by source from them (origin/page.py)
        self.on_stored: Callable[[str, list[dict[str, Any]]], None] | None = None

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._io, work)
        except StoreUnavailable:
            self.unavailable += 1
            raise

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self.backend.open)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self.backend.close)
        self._io.shutdown(wait=True)

    async def check(self) -> str | None:
        """None while the store answers, else why not (for /readyz)."""
        return await asyncio.get_running_loop().run_in_executor(self._io, self.backend.check)

    async def enroll(self, node: str, public_key: str) -> None:
        """Bind `node` to the key it first asked for a swarm token with (trust on first use); a
        later request for that name with another key is refused. So the cluster's node token
        lets its holder add nodes, never act as one that enrolled (it would need its key)."""
        if node in RESERVED_NODES:
            raise errors.Denied(f"the node name {node!r} is reserved")

        verdict = await self._run(lambda: self.backend.enroll(node, public_key, self.max_nodes, time.time()))
        if verdict == "enrolled":
            log.info("node %s enrolled", node)  # (a validated DNS name)
        if verdict in ("ok", "enrolled"):
            return
        self.enrollment_refusals += 1
        # the node name is a validated DNS name, the reason one of the fixed texts above
        log.warning("refused a swarm token for node %s: %s", node, _REFUSALS[verdict])  # log-safe
        raise errors.Denied(f"node {node!r}: {_REFUSALS[verdict]}")

    async def node_key(self, node: str) -> Ed25519PublicKey | None:
        """The key `node` enrolled with, if it did."""
        pem = await self._run(lambda: self.backend.node_key(node))
        return None if pem is None or pem == BLOCKED else peercerts.parse_public_key(pem)

    async def store(self, node: str, raw_records: list[Any]) -> Stored:
        rows: list[Row] = []
        valid: list[dict[str, Any]] = []
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
            valid.append(rec)
            rows.append((rec["event_id"], rec["phase"], rec["ts"], node, rec.get("principal"), rec.get("ns"),
                         rec.get("repository"), rec.get("reference"), rec.get("digest"),
                         json.dumps({**rec, "node": node}, separators=(",", ":")), time.time()))

        inserted, foreign = await self._run(lambda: self.backend.insert(node, rows))
        if foreign:
            rejected += foreign
            first_reason = first_reason or "a record's event belongs to another node"
        if rejected:  # once per batch (once per record was 15,000 lines in 10 s)
            log.warning("refused %d of %d journal records from %s (first: %s)", rejected, len(raw_records), node,
                        first_reason)
        kept = len(rows) - foreign
        if self.on_stored is not None and inserted and not foreign:
            try:
                self.on_stored(node, valid)
            except Exception:  # the batch is stored: a page's counting bug must not fail it
                log.exception("counting a stored journal batch failed")
        self.stored += inserted
        self.duplicates += kept - inserted
        self.rejected += rejected
        return Stored(inserted, kept - inserted, rejected)

    async def record_operator(self, start: dict[str, Any], end: dict[str, Any]) -> None:
        """Store an operator event (shoal.audit.operator_records), durably, before the origin
        answers the operator: under the reserved node name, which no node can ship records as."""
        rows: list[Row] = [
            (rec["event_id"], rec["phase"], rec["ts"], audit.OPERATOR_NODE, rec.get("principal"), None, None, None,
             None, json.dumps({**rec, "node": audit.OPERATOR_NODE}, separators=(",", ":")), time.time())
            for rec in (start, end)]
        await self._run(lambda: self.backend.insert_operator(rows))

    async def query(self, q: protocol.AuditQuery) -> list[dict[str, Any]]:
        """Merged events whose start matches the filters, oldest first (`image` must have been
        resolved into ns, repository and digest or reference; `format` is the caller's)."""
        equals = {column: value for column in FILTER_COLUMNS if (value := getattr(q, column)) is not None}
        filters = Filters(equals, q.since, q.until, max(1, min(q.limit, protocol.AUDIT_MAX_LIMIT)))
        found = await self._run(lambda: self.backend.query(filters))
        return [audit.merge(json.loads(start), None if end is None else json.loads(end)) for start, end in found]


Target = Path | AuditStore
"""What the offline admin commands act on: an audit.db file, or a store (not yet opened)."""


def _admin(target: Target, work: Callable[[AuditStore], T]) -> T:
    store = SqliteStore(target, create=False) if isinstance(target, Path) else target
    store.open()
    try:
        return work(store)
    finally:
        store.close()


def unban(target: Target, node: str) -> int:
    """Lift the bans of keys banned under `node`'s name, and free the name; how many keys."""
    return _admin(target, lambda store: store.unban(node))


def enroll_node(target: Target, node: str, public_key: str, *, replace: bool = False) -> None:
    """Bind `node` to `public_key` (PEM): an operator admitting a node ahead of its first start
    (no one can take its name first), or again after a ban. Refused (ValueError, saying why) for
    a reserved name, a banned key, or a name bound to another live key unless `replace`."""
    if node in RESERVED_NODES:
        raise ValueError(f"the node name {node!r} is reserved")
    canonical = peercerts.canonical_public_pem(peercerts.parse_public_key(public_key))
    _admin(target, lambda store: store.enroll_node(node, canonical, replace=replace, now=time.time()))


def forget_node(target: Target, node: str, *, ban: bool = False) -> bool:
    """Release a node's name, so that it enrolls again with a new key (a node that lost its
    data directory); with `ban` (a compromised node), its key is refused under any name from now
    on and the name takes no new key until enroll_node binds one (its certificate stays valid
    until it expires, at most swarm_token_ttl). Run on the origin host: only who can write the
    audit store can do this. False if no such node enrolled."""
    return _admin(target, lambda store: store.forget_node(node, ban=ban, now=time.time()))
