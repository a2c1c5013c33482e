"""One audit trail for several origins (issue 15): two origins write one PostgreSQL (a real
cluster, tests/support/postgres.py), four agents ship their journals to them (two to each), one
origin is killed with SIGKILL while its INSERT of a batch is in progress in PostgreSQL, and
restarted: `shoal audit` at either origin returns every record of the four agents' journal files
exactly once, both phases of every event."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal import protocol
from tests.e2e.conftest import Images
from tests.support.postgres import Database, Postgres
from tests.support.procs import ROOT, Component, free_port, http_get, wait_for
from tests.support.stack import Stack

REQUESTS = 60  # per agent: 120 records, all in the one batch the killed origin was storing


def request(agent: Component, path: str) -> int:
    host, port = agent.config["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def journal_records(agent: Component) -> set[tuple[str, str]]:
    """(event_id, phase) of every record in the agent's own journal files."""
    found: list[tuple[str, str]] = []
    for path in sorted((Path(agent.config["data_dir"]) / "journal").glob("segment-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                found.append((rec["event_id"], rec["phase"]))
    assert len(found) == len(set(found))
    return set(found)


def shoal_audit(origin: Component, token_file: Path, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "shoal.cli", "audit", "--origin", origin.url, "--token-file",
                             str(token_file), "--format", "jsonl", "--limit", "100000", *args],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_metric(c: Component, name: str, ok: Callable[[float], bool], what: str, timeout: float = 30) -> None:
    wait_for(lambda: ok(c.metric(name)), timeout=timeout, what=f"{c.name}: {what}")


def sessions(db: Database, application: str) -> int:
    with db.connect(autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application,)).fetchone()
        return 0 if row is None else int(row[0])


def insert_waiting(db: Database, application: str) -> bool:
    """The origin's INSERT of a journal batch is in progress in PostgreSQL (waiting on the lock)."""
    with db.connect(autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                           "AND state = 'active' AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO records%%'",
                           (application,)).fetchone()
        return row is not None and row[0] > 0


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_two_origins_one_postgresql_a_collector_killed_mid_batch(stack: Stack, images: Images,
                                                                 postgres: Postgres, pg_database: Database) -> None:
    image = images.app()
    small = [b for b in image.blobs.values() if b.size < 1 << 20]
    stack.start_tracker()
    origin_a = stack.start_origin(audit={"postgresql": pg_database.settings(application_name="origin-a")})
    cfg_b = stack.cluster.origin(listen=f"127.0.0.1:{free_port()}", data_dir=stack.workdir / "origin-b",
                                 torrent_listen=f"127.0.0.1:{free_port()}",
                                 upstreams=[stack.upstream(stack.seeder_user, stack.seeder_password)],
                                 audit={"postgresql": pg_database.settings(application_name="origin-b")})
    origin_b = Component("origin", stack.workdir, cfg_b, name="origin-b").start()
    stack.components.append(origin_b)
    agents = [stack.start_agent(n, **({"origin": origin_b.url} if n >= 2 else {})) for n in range(4)]
    token = stack.keys["operator_token"]

    # 1. the agents pull while origin A is down: its two agents' journals wait on their disks
    origin_a.stop()
    for agent in agents:
        for i in range(REQUESTS):
            blob = small[i % len(small)]
            assert request(agent, f"/v2/private/app/blobs/{blob.digest}") == 200
    assert request(agents[0], "/v2/private/app/blobs/sha256:" + "0" * 64) == 404
    for agent in agents[:2]:
        wait_metric(agent, "shoal_agent_journal_ship_failures_total", lambda v: v > 0, "a shipment failed")
    # 2. a transaction holds the records table: origin A restarts and its INSERT of the agents'
    # whole backlog waits inside PostgreSQL; it is killed there, mid-batch, then the lock goes
    with pg_database.connect() as blocker:
        blocker.execute("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")
        origin_a.start()
        wait_for(lambda: insert_waiting(pg_database, "origin-a"), timeout=60,
                 what="origin A's INSERT of a batch in progress")
        origin_a.stop(kill=True)
        blocker.commit()
    # what origin A had in flight was not acknowledged (its agents still hold it), nor committed:
    # its backend, cut off before COMMIT, rolls back once it sees the connection gone
    assert all(agent.metric("shoal_agent_journal_unshipped_bytes") > 0 for agent in agents[:2])
    wait_for(lambda: not sessions(pg_database, "origin-a"), what="origin A's sessions gone")
    with pg_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM records WHERE node IN ('node0', 'node1')").fetchone() == (0,)
    # 3. origin A again: the agents send the batch again, the store keeps each record once
    origin_a.start()
    for agent in agents:
        wait_metric(agent, "shoal_agent_journal_unshipped_bytes", lambda v: v == 0, "its journal shipped", 90)
    assert origin_a.metric("shoal_origin_journal_stored_records_total") > 0

    expected = {agent.name: journal_records(agent) for agent in agents}
    assert all(len(records) >= 2 * REQUESTS for records in expected.values())
    # every record, exactly once, both phases: through either origin's API, as `shoal audit` shows it
    for origin in (origin_a, origin_b):
        events = [e for e in shoal_audit(origin, token) if e.get("kind") != "operator"]
        ids = [e["event_id"] for e in events]
        assert len(ids) == len(set(ids))
        for n, agent in enumerate(agents):
            mine = {e["event_id"] for e in events if e["node"] == f"node{n}"}
            assert {(i, phase) for i in mine for phase in ("start", "end")} == expected[agent.name], agent.name
        assert all(e["outcome"] == "complete" for e in events)
    with pg_database.connect() as conn:
        stored = conn.execute("SELECT node, event_id, phase FROM records WHERE node LIKE 'node%'").fetchall()
    assert len(stored) == sum(len(records) for records in expected.values())
    for n, agent in enumerate(agents):
        assert {(e, p) for node, e, p in stored if node == f"node{n}"} == expected[agent.name]
    # the nodes enrolled at either origin are one table
    with pg_database.connect() as conn:
        assert {r[0] for r in conn.execute("SELECT name FROM nodes")} >= {f"node{n}" for n in range(4)}


def test_postgresql_down_answers_503_and_readyz_says_so(stack: Stack, images: Images, postgres: Postgres,
                                                        pg_database: Database) -> None:
    image = images.app()
    blob = min(image.blobs.values(), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin(audit={"postgresql": pg_database.settings(connect_timeout="1s")})
    agent = stack.start_agent()
    postgres.stop("fast")
    try:
        status, body = http_get(protocol.READYZ.url(origin.url))
        assert status == 503 and b"PostgreSQL" in body
        assert request(agent, f"/v2/private/app/blobs/{blob.digest}") == 200  # served, journaled on the node
        status, body = http_get(protocol.AUDIT.url(origin.url, {"limit": "10"}),
                                headers={"Authorization": f"Bearer {stack.operator_token}"}, timeout=10)
        error = json.loads(body)["errors"][0]
        assert (status, error["code"]) == (503, "UNAVAILABLE")
        assert pg_database.password not in origin.log()
        wait_for(lambda: agent.metric("shoal_agent_journal_ship_failures_total") > 0, what="a refused shipment")
        assert origin.metric("shoal_origin_audit_store_unavailable_total") > 0
    finally:
        postgres.start()
    # back: ready again, and the journal arrives (nothing lost)
    wait_for(lambda: http_get(protocol.READYZ.url(origin.url))[0] == 200, what="ready again")
    events = stack.journal(agent, minimum=1, timeout=60)
    assert [e["digest"] for e in events] == [blob.digest]
