"""The pull journal arrives at the collector exactly once, across a collector outage and an agent
killed with SIGKILL in the middle of a response."""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import socket
import subprocess
import sys
import time

from shoal import protocol
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.procs import ROOT, Component, http_get, wait_for
from tests.support.stack import Stack

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def request(agent: Component, path: str, accept: str | None = None) -> tuple[int, bytes]:
    host, port = agent.config["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def collected(stack: Stack) -> list[dict[str, object]]:
    assert stack.origin is not None
    return api.audit_events(stack.origin.url, stack.operator_token)


def wait_collected(stack: Stack, count: int, timeout: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    events = collected(stack)
    while len(events) < count and time.monotonic() < deadline:
        time.sleep(0.25)
        events = collected(stack)
    return events


def test_exactly_once_across_collector_outage_and_sigkill(stack: Stack, images: Images) -> None:
    image = images.app()
    big = max(image.blobs.values(), key=lambda b: b.size)
    small = [b for b in image.blobs.values() if b is not big]
    stack.start(agents=1)
    agent, origin = stack.agents[0], stack.origin
    assert origin is not None
    made = 0
    # 1. the collector is down: requests are journaled locally, shipping fails and retries
    origin.stop()
    for blob in small:
        status, body = request(agent, f"/v2/private/app/blobs/{blob.digest}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        made += 1
    assert request(agent, "/v2/private/app/manifests/v1", MANIFEST)[0] == 200
    assert request(agent, "/v2/private/app/blobs/sha256:" + "0" * 64)[0] == 404
    made += 2
    wait_for(lambda: agent.metric("shoal_agent_journal_ship_failures_total") > 0, what="a failed shipment")
    assert agent.metric("shoal_agent_journal_shipped_records_total") == 0
    # 2. SIGKILL in the middle of a blob response
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"GET /v2/private/app/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = b""
    while len(received) < 1 << 20:
        received += sock.recv(1 << 16)
    assert received.startswith(b"HTTP/1.1 200")
    agent.stop(kill=True)
    sock.close()
    made += 1
    # 3. the agent comes back on the same data directory, the collector too; more requests
    agent.start()
    origin.start()
    for blob in small:
        assert request(agent, f"/v2/private/app/blobs/{blob.digest}")[0] == 200
        made += 1
    # an end record is written once the response is sent, so it can reach the collector a
    # batch after the next request's start: wait for the ends too (all but the cut one's)
    wait_for(lambda: sum(e["outcome"] == "incomplete" for e in wait_collected(stack, made)) <= 1,
             what="every end record but the cut response's collected")
    events = wait_collected(stack, made)
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)) == made, (len(ids), made)
    cut = [e for e in events if e["outcome"] == "incomplete"]
    assert len(cut) == 1
    assert cut[0]["digest"] == big.digest
    assert cut[0]["status"] == 200
    assert all(e["outcome"] == "complete" for e in events if e is not cut[0])
    statuses = sorted(int(str(e["status"])) for e in events)
    assert statuses.count(404) == 1
    assert all(e["node"] == "node0" and e["principal"] == "node" for e in events if e["status"] == 200)
    # nothing left to ship, nothing shipped twice into the store
    wait_for(lambda: agent.metric("shoal_agent_journal_unshipped_bytes") == 0, what="the journal shipped")
    assert agent.metric("shoal_agent_journal_shipped_records_total") >= 2 * len(small)
    assert len(collected(stack)) == made


def test_shoal_audit_queries_and_exports(stack: Stack, images: Images) -> None:
    image = images.app()
    stack.start(agents=2)
    first, second = stack.agents
    small = [b for b in image.blobs.values() if b.size < 1 << 20]
    start = audit_now()
    for agent in (first, second):
        for blob in small:
            assert request(agent, f"/v2/private/app/blobs/{blob.digest}")[0] == 200
    assert request(first, "/v2/private/nosuch/blobs/sha256:" + "1" * 64)[0] == 404
    events = wait_collected(stack, 2 * len(small) + 1)
    assert len(events) == 2 * len(small) + 1

    def shoal_audit(*args: str) -> str:
        assert stack.origin is not None
        result = subprocess.run([sys.executable, "-m", "shoal.cli", "audit", "--origin", stack.origin.url,
                                 "--token-file", str(stack.keys["operator_token"]), *args],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return result.stdout

    rows = list(csv.DictReader(io.StringIO(shoal_audit("--repository", "private/app", "--format", "csv"))))
    assert len(rows) == 2 * len(small)
    assert {r["digest"] for r in rows} == {b.digest for b in small}
    assert {r["node"] for r in rows} == {"node0", "node1"}
    assert all(r["principal"] == "node" and r["status"] == "200" and r["outcome"] == "complete" for r in rows)
    lines = shoal_audit("--node", "node1", "--format", "jsonl").splitlines()
    assert len(lines) == len(small)
    assert all(json.loads(line)["node"] == "node1" for line in lines)
    digest = small[0].digest
    assert len(shoal_audit("--digest", digest, "--format", "jsonl").splitlines()) == 2
    assert len(shoal_audit("--image", f"{stack.registry.host}/private/nosuch", "--format", "jsonl").splitlines()) == 1
    # each query is itself an event (the operator's), so the pulls are told apart by their kind
    assert [json.loads(line)["kind"] for line in shoal_audit("--since", audit_now(), "--format", "jsonl").splitlines()
            ] == ["operator"]
    since = [json.loads(line) for line in shoal_audit("--since", start, "--format", "jsonl").splitlines()]
    assert len([e for e in since if e["kind"] != "operator"]) == 2 * len(small) + 1
    queries = [e for e in since if e["kind"] == "operator"]
    # (the five queries above, this one, and wait_collected's)
    assert len(queries) >= 6 and {(e["principal"], e["action"], e["node"]) for e in queries} == {
        ("token:local-admin", "audit", "origin")}
    assert [json.loads(e["detail"]).get("node") for e in queries].count("node1") == 1  # the filters it ran with
    table = shoal_audit("--principal", "node", "--digest", digest)
    assert table.splitlines()[0].split()[:3] == ["TS", "NODE", "PRINCIPAL"]
    assert len(table.splitlines()) == 3
    # the collector needs an operator credential; the node token is not one
    assert stack.origin is not None
    status, _ = http_get(protocol.AUDIT.url(stack.origin.url))
    assert status == 401
    status, body = http_get(protocol.AUDIT.url(stack.origin.url),
                            headers={"Authorization": f"Bearer {stack.node_token}"})
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    # a limit that str.isdigit() accepts and int() does not was a 500 with a traceback
    status, body = http_get(protocol.AUDIT.url(stack.origin.url, {"limit": "²"}),
                            headers={"Authorization": f"Bearer {stack.operator_token}"})
    assert status == 400 and "limit must be a whole number" in json.loads(body)["errors"][0]["message"]
    # an operator sees the origin's reason, not only its status
    refused = subprocess.run([sys.executable, "-m", "shoal.cli", "audit", "--origin", stack.origin.url,
                              "--token-file", str(stack.keys["operator_token"]), "--limit", "-1"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "shoal audit: the origin refused: HTTP 400: limit must be a whole number"


def audit_now() -> str:
    from shoal.audit import now

    return now()
