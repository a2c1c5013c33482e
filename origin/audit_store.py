"""The audit store's interface: where the collector keeps journal records, enrolled nodes and
banned keys. Two implementations: SQLite in the data directory (audit_sqlite.py, the default) and
PostgreSQL shared by several origins (audit_postgres.py). Every method blocks: the collector calls
them from its own threads, the offline admin commands (shoal-origin forget-node, enroll-node)
directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shoal import audit, errors

# A stored record: event_id, phase, ts, node, principal, ns, repository, reference, digest, doc
# (the record as JSON text), received (epoch seconds).
Row = tuple[str, str, str, str, str | None, str | None, str | None, str | None, str | None, str, float]
# The columns a query may filter on by equality (fixed names: they are written into SQL).
FILTER_COLUMNS = ("repository", "digest", "reference", "ns", "principal", "node")
# The key of a name banned with `forget-node --ban`: matches no key, so the name stays taken.
BLOCKED = ""


def storable_text(value: str) -> str:
    """What both stores take: no NUL (PostgreSQL's text), valid UTF-8 (both: a lone surrogate,
    which a node's JSON escape `\\udcff` decodes to, failed SQLite's insert). A NUL in one field (a
    Basic user name a client made up, on a registry that lets anyone pull) failed the whole batch,
    every time it was sent again, and wedged that node's journal. Marked U+FFFD (as the agent's
    journal marks such bytes), never dropped."""
    return audit.clean(value.replace("\x00", "\ufffd"))


def storable(row: Row) -> Row:
    return tuple(storable_text(v) if isinstance(v, str) else v for v in row)  # type: ignore[return-value]


class StoreUnavailable(errors.ShoalError):
    """The store cannot be reached now (PostgreSQL down or restarting): 503, the agent keeps its
    journal and sends the batch again; nothing was acknowledged."""

    oci = errors.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Filters:
    equals: dict[str, str]  # column (one of FILTER_COLUMNS) -> value
    since: str | None
    until: str | None
    limit: int


class AuditStore(Protocol):
    # How many threads may call the store at once (SQLite: one writer; PostgreSQL: the pool).
    workers: int

    def open(self) -> None:
        """Connect and create the schema if missing (idempotent)."""

    def close(self) -> None: ...

    def check(self) -> str | None:
        """None if the store answers now, else a short reason (for /readyz)."""

    def enroll(self, node: str, public_key: str, max_nodes: int, now: float) -> str:
        """Bind `node` to `public_key` if it is free: "enrolled" (bound now), "ok" (bound to it
        already), or why not ("banned", "blocked", "taken", "full")."""

    def node_key(self, node: str) -> str | None:
        """The PEM `node` is bound to (BLOCKED if banned), None if it never enrolled."""

    def insert(self, node: str, rows: list[Row]) -> tuple[int, int]:
        """Store `node`'s rows in one transaction, each (event_id, phase) once, except those whose
        event another node recorded first; committed before it returns: (inserted, foreign)."""

    def insert_operator(self, rows: list[Row]) -> None:
        """Store an operator event's records (new event ids), committed before it returns."""

    def query(self, filters: Filters) -> list[tuple[str, str | None]]:
        """Matching start records (JSON), oldest first, each with its own node's end, if any."""

    def unban(self, node: str) -> int:
        """Lift the bans of keys banned under `node`'s name, free the name; how many keys."""

    def enroll_node(self, node: str, public_key: str, *, replace: bool, now: float) -> None:
        """An operator binds `node` to `public_key` (canonical PEM); ValueError says why not."""

    def forget_node(self, node: str, *, ban: bool, now: float) -> bool:
        """Release (or ban) `node`; False if it never enrolled; ValueError for a banned name
        without `ban`."""
