"""The collector on PostgreSQL (origin/audit_postgres.py), against a real cluster
(tests/support/postgres.py): records stored once by (event_id, phase) whoever sends them, two
origins sharing nodes and bans, the offline admin commands, PostgreSQL stopped and started under a
running collector, and the password kept out of every log, error and repr."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import audit, errors, peercerts, protocol
from shoal.config import load_section
from shoal_origin import __main__ as origin_cli
from shoal_origin import config as origin_config
from shoal_origin.audit_postgres import PostgresStore
from shoal_origin.audit_store import StoreUnavailable
from shoal_origin.collector import Collector, enroll_node, forget_node, unban
from tests.support.postgres import Database, Postgres


def store(db: Database, **extra: Any) -> PostgresStore:
    settings = load_section(origin_config.PostgresSettings, db.settings(**extra), "audit.postgresql")
    return PostgresStore(settings, db.password)


async def opened(db: Database, **extra: Any) -> Collector:
    collector = Collector(store(db, **extra))
    await collector.open()
    return collector


def records(n: int, *, prefix: str = "") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        event = f"{prefix or '0'}{i:031x}"
        out.append({"event_id": event, "phase": "start", "ts": audit.now(), "status": 200, "repository": "team/app",
                    "digest": "sha256:" + "a" * 64})
        out.append({"event_id": event, "phase": "end", "ts": audit.now(), "bytes": i, "outcome": "ok"})
    return out


async def reachable(collector: Collector, timeout: float = 30) -> None:
    """Once PostgreSQL is back (within FAIL_FAST of a failure, calls are still refused)."""
    deadline = time.monotonic() + timeout
    while (reason := await collector.check()) is not None:
        assert time.monotonic() < deadline, reason
        await asyncio.sleep(0.1)


def count(db: Database) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM records").fetchone()
        assert row is not None
        return int(row[0])


async def test_a_batch_sent_again_is_stored_once_and_queried_merged(pg_database: Database) -> None:
    collector = await opened(pg_database)
    try:
        batch = records(300)
        first = await collector.store("node-a", batch)
        assert (first.accepted, first.duplicates, first.rejected) == (600, 0, 0)
        again = await collector.store("node-a", batch[::-1])  # the agent re-sends after a lost answer
        assert (again.accepted, again.duplicates) == (0, 600)
        mixed = await collector.store("node-a", batch[:10] + records(5, prefix="f"))
        assert (mixed.accepted, mixed.duplicates) == (10, 10)
        assert await asyncio.to_thread(count, pg_database) == 610
        events = await collector.query(protocol.AuditQuery(limit=1000))
        assert len(events) == 305
        assert all(e["outcome"] == "ok" and e["node"] == "node-a" for e in events)
        assert {e["event_id"] for e in events} == {r["event_id"] for r in batch + records(5, prefix="f")}
        narrowed = await collector.query(protocol.AuditQuery(node="node-b", limit=10))
        assert narrowed == []
        assert (collector.stored, collector.duplicates) == (610, 610)
    finally:
        await collector.close()


async def test_a_nul_or_a_lone_surrogate_in_a_field_is_stored_marked(pg_database: Database) -> None:
    """PostgreSQL's text takes no NUL and no invalid UTF-8: a client-made Basic user name such as
    "ali\x00ce" (an anonymous registry says yes to any) failed the whole batch, and the agent sent
    it again forever (its journal wedged, then every pull got 503). Stored, marked; and a query
    with one answers instead of failing."""
    collector = await opened(pg_database)
    try:
        batch = records(2)
        batch[0]["principal"] = "ali\x00ce"
        batch[2]["repository"] = "team/\ud800app"
        stored = await collector.store("node-a", batch)
        assert (stored.accepted, stored.rejected) == (4, 0)
        events = {e["event_id"]: e for e in await collector.query(protocol.AuditQuery(limit=10))}
        assert len(events) == 2
        assert await collector.query(protocol.AuditQuery(principal="ali\ufffdce", limit=10)) != []
        assert await collector.query(protocol.AuditQuery(principal="ali\x00ce", limit=10)) != []
        assert await collector.query(protocol.AuditQuery(repository="team/\ufffdapp", limit=10)) != []
    finally:
        await collector.close()


async def test_the_same_batch_from_two_origins_at_once_is_stored_once(pg_database: Database) -> None:
    """Both INSERTs are held in flight together (a table lock taken first), then run at once:
    each record lands once, and the two acknowledgements add up to the batch."""
    batch = records(2000)
    rows = await _rows(pg_database, "node-a", batch)

    def scenario() -> list[tuple[int, int]]:
        one, two = store(pg_database, application_name="origin-one"), store(pg_database, application_name="origin-two")
        one.open()
        two.open()
        results: dict[str, tuple[int, int]] = {}
        try:
            with pg_database.connect() as blocker:
                blocker.execute("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")  # (in a transaction)
                threads = [threading.Thread(target=lambda s=s, name=name: results.__setitem__(name, s.insert("node-a",
                                                                                                            rows)))
                           for s, name in ((one, "one"), (two, "two"))]
                for t in threads:
                    t.start()
                _wait_waiting(pg_database, 2)
                blocker.commit()
                for t in threads:
                    t.join(60)
        finally:
            one.close()
            two.close()
        return sorted(results.values())

    assert await asyncio.to_thread(scenario) == [(0, 0), (4000, 0)]
    assert await asyncio.to_thread(count, pg_database) == 4000


async def _rows(db: Database, node: str, batch: list[dict[str, Any]]) -> list[Any]:
    """The rows the collector would hand its store (its own validation, not a copy of it)."""
    captured: list[Any] = []

    class Capture:
        workers = 1

        def insert(self, _node: str, rows: list[Any]) -> tuple[int, int]:
            captured.extend(rows)
            return len(rows), 0

    collector = Collector(Capture())  # type: ignore[arg-type]
    await collector.store(node, batch)
    return captured


def _wait_waiting(db: Database, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with db.connect(autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock' "
                               "AND query LIKE 'INSERT INTO records%%'", (db.dbname,)).fetchone()
            if row is not None and row[0] >= n:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} INSERTs never waited on the lock")
            time.sleep(0.05)


async def test_two_origins_share_nodes_bans_and_records(pg_database: Database, tmp_path: Path) -> None:
    a, b = await opened(pg_database), await opened(pg_database)
    key, other = peercerts.NodeKey.generate(), peercerts.NodeKey.generate()
    try:
        await a.enroll("node-a", key.public_pem)
        assert await b.node_key("node-a") == key.public_key  # enrolled at one, known at the other
        with pytest.raises(errors.Denied, match="enrolled with another key"):
            await b.enroll("node-a", other.public_pem)
        # the offline admin command, given the origin's configuration, acts on the shared store
        cfg = _origin_config(tmp_path, pg_database)
        cli = origin_cli.main
        assert await asyncio.to_thread(cli, ["forget-node", "node-a", "--config", str(cfg), "--ban"]) == 0
        for collector in (a, b):
            assert await collector.node_key("node-a") is None
            with pytest.raises(errors.Denied, match="banned"):
                await collector.enroll("elsewhere", key.public_pem)
        with pytest.raises(ValueError, match="is banned"):
            await asyncio.to_thread(forget_node, store(pg_database), "node-a")
        pem = tmp_path / "other.pem"
        pem.write_text(other.public_pem)
        enroll = ["enroll-node", "node-a", "--config", str(cfg), "--public-key", str(pem)]
        assert await asyncio.to_thread(cli, enroll) == 0
        assert await a.node_key("node-a") == other.public_key
        with pytest.raises(ValueError, match="another key"):
            await asyncio.to_thread(enroll_node, store(pg_database), "node-a", peercerts.NodeKey.generate().public_pem)
        assert await asyncio.to_thread(unban, store(pg_database), "node-a") == 1
        # records shipped to either origin are one trail
        batch = records(20)
        assert (await a.store("node-a", batch[:20])).accepted == 20
        assert (await b.store("node-a", batch)).accepted == 20
        assert len(await a.query(protocol.AuditQuery(limit=100))) == 20
        assert await a.query(protocol.AuditQuery(limit=100)) == await b.query(protocol.AuditQuery(limit=100))
        # an event recorded by one node cannot be ended by another through the other origin
        await b.enroll("intruder", key.public_pem)
        forged = await b.store("intruder", [{**batch[1], "outcome": "error"}])
        assert (forged.accepted, forged.rejected) == (0, 1)
    finally:
        await a.close()
        await b.close()


def _origin_config(tmp_path: Path, db: Database) -> Path:
    doc = {"data_dir": str(tmp_path / "data"), "tracker": "http://127.0.0.1:1",
           "upstreams": [{"name": "registry.example", "url": "https://registry.example"}],
           "registration_token": {"file": str(tmp_path / "unused")}, "node_token": {"file": str(tmp_path / "unused")},
           "signing_key": str(tmp_path / "unused"), "audit": {"postgresql": db.settings()}}
    path = tmp_path / "origin.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_origins_starting_at_once_create_the_schema_once(pg_database: Database) -> None:
    stores = [store(pg_database) for _ in range(4)]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.open) for s in stores))
        assert [await asyncio.to_thread(s.check) for s in stores] == [None] * 4

        def tables() -> set[str]:
            with pg_database.connect() as conn:
                return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

        assert await asyncio.to_thread(tables) == {"records", "nodes", "banned_keys"}

        # a later start finds the schema and runs no DDL: it does not wait for a transaction
        # holding the table (CREATE INDEX IF NOT EXISTS would)
        def start_beside_a_lock() -> str | None:
            with pg_database.connect() as blocker:
                blocker.execute("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")
                late = store(pg_database, connect_timeout="2s")
                try:
                    late.open()
                    return late.node_key("node-a") or late.check()
                finally:
                    late.close()

        assert await asyncio.to_thread(start_beside_a_lock) is None
    finally:
        for s in stores:
            await asyncio.to_thread(s.close)


async def test_postgresql_down_is_unavailable_and_a_restart_loses_nothing(postgres: Postgres,
                                                                          pg_database: Database,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    collector = await opened(pg_database, connect_timeout="1s")
    try:
        batch = records(100)
        assert (await collector.store("node-a", batch[:100])).accepted == 100
        await asyncio.to_thread(postgres.stop, "immediate")  # a crash: the pool's connections are cut
        with pytest.raises(StoreUnavailable) as refused:
            await collector.store("node-a", batch)
        assert refused.value.oci.status == 503
        # right after a failure, calls are refused at once (none waits connect_timeout again)
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await collector.node_key("node-a")
        assert time.monotonic() - began < 0.5
        assert await collector.check() == "the audit store (PostgreSQL) is unreachable"
        assert collector.unavailable == 2
        await asyncio.to_thread(postgres.start)
        await reachable(collector)
        # the pool drops its dead connections and connects again; the re-sent batch lands once
        stored = await collector.store("node-a", batch)
        assert (stored.accepted, stored.duplicates) == (100, 100)
        assert await collector.check() is None
        assert await asyncio.to_thread(count, pg_database) == 200
    finally:
        await collector.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "unavailable" in str(refused.value) and pg_database.password not in logged


async def test_an_origin_started_while_postgresql_is_down_creates_the_schema_later(
        postgres: Postgres, pg_database: Database) -> None:
    await asyncio.to_thread(postgres.stop, "fast")
    collector = Collector(store(pg_database, connect_timeout="1s"))
    await collector.open()  # not fatal: the origin starts
    try:
        with pytest.raises(StoreUnavailable):
            await collector.node_key("node-a")
        await asyncio.to_thread(postgres.start)
        await reachable(collector)
        assert (await collector.store("node-a", records(3))).accepted == 6
        assert await asyncio.to_thread(count, pg_database) == 6
    finally:
        await collector.close()


def test_the_password_is_never_shown(pg_database: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-password-" + "x" * 12
    settings = load_section(origin_config.PostgresSettings, pg_database.settings(connect_timeout="1s"),
                                          "audit.postgresql")
    bad = PostgresStore(settings, wrong)
    try:
        bad.open()  # logged, not fatal: the origin starts and answers 503
        with pytest.raises(StoreUnavailable) as refused:
            bad.node_key("node-a")
    finally:
        bad.close()
    shown = "\n".join([r.getMessage() for r in caplog.records] + [str(refused.value), repr(bad), repr(settings)])
    assert "password authentication failed" in shown  # the reason is logged ...
    assert wrong not in shown  # ... never the secret


@pytest.mark.parametrize(("section", "message"), [
    ({"host": "db", "user": "u"}, "audit.postgresql.dbname: required key is missing"),
    ({"host": "db", "dbname": "d", "user": "u", "port": 0}, "audit.postgresql.port: expected 1 to 65535"),
    ({"host": "db", "dbname": "d", "user": "u", "sslmode": "verify-full"}, "audit.postgresql.sslrootcert: required"),
    ({"host": "db", "dbname": "d", "user": "u", "sslmode": "on"}, "audit.postgresql.sslmode: expected one of"),
    ({"host": "db", "dbname": "d", "user": "u", "password": "inline"}, "audit.postgresql.password: expected a mapping"),
    ({"host": "db", "dbname": "d", "user": "u", "pool_size": 0}, "audit.postgresql.pool_size: must be between"),
])
def test_config_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.ConfigError) as exc:
        load_section(origin_config.AuditSettings, {"postgresql": section}, "audit")
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value) and "inline" not in str(exc.value)


def test_the_password_never_goes_to_a_server_that_asks_for_it_in_clear() -> None:
    """Under the default sslmode (prefer), whoever answers at `host` (a spoofed name, a man in the
    middle refusing TLS) could ask for the password in clear, and got it: only SCRAM now."""
    import socket
    import struct
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                try:
                    n = struct.unpack("!I", c.recv(4))[0]
                    body = c.recv(n - 4)
                    if struct.unpack("!I", body[:4])[0] in (80877103, 80877104):  # SSL/GSS request: no
                        c.sendall(b"N")
                        n = struct.unpack("!I", c.recv(4))[0]
                        c.recv(n - 4)
                    c.sendall(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
                    if c.recv(1) == b"p":
                        n = struct.unpack("!I", c.recv(4))[0]
                        got.append(c.recv(n - 4).rstrip(b"\0"))
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    settings = origin_config.PostgresSettings(host="127.0.0.1", port=srv.getsockname()[1], dbname="shoal", user="shoal",
                                connect_timeout=1)
    store = PostgresStore(settings, "s3cret-pg-password")
    try:
        store.open()
    finally:
        store.close()
        srv.close()
    assert b"s3cret-pg-password" not in got
