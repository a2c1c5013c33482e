"""Every node has its own identity (issue 12, part 4): the origin binds a node's name to the key
it enrolled with, so the holder of the cluster's node token (the bootstrap secret) can add nodes
but not act as one that enrolled: no swarm token or certificate for its name, no journal records
in its name. An operator on the origin host releases a name with `shoal-origin forget-node`."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from shoal import audit, peercerts, protocol, signing
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.procs import Component, http_get, wait_for
from tests.support.stack import Stack


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def enroll(origin: Component, bearer: dict[str, str], node: str, key: peercerts.NodeKey | None,
           request: protocol.GrantsRequest | None = None) -> tuple[int, Any]:
    """A grants request for `node` (its key's public half in it), signed by `key` (None: unsigned)."""
    body = (request or protocol.GrantsRequest(node, key.public_pem if key else "", [])).encode()
    signed = {protocol.NODE_SIGNATURE_HEADER: signing.sign_request(key.private_key, "grants", body)} if key else {}
    return post(protocol.GRANTS.url(origin.url), body, {**bearer, **signed})


def record(node: str, principal: str) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "phase": "start", "ts": audit.now(), "node": node, "status": 200,
            "repository": "private/app", "principal": principal, "method": "GET"}


def test_the_node_token_cannot_act_as_an_enrolled_node(stack: Stack, images: Images) -> None:
    stack.start_tracker()
    origin = stack.start_origin()
    agent = stack.start_agent()  # node0: enrolls with the key it made in its data directory
    key_file = stack.workdir / "agent0" / "node.key"
    wait_for(lambda: agent.metric("shoal_agent_swarm_token_expiry_timestamp_seconds") > 0, what="node0 enrolled")
    assert key_file.stat().st_mode & 0o777 == 0o600
    blob = min(images.app().blobs.values(), key=lambda b: b.size)
    status, body = http_get(f"{agent.url}/v2/private/app/blobs/{blob.digest}", timeout=30)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    wait_for(lambda: agent.metric("shoal_agent_journal_unshipped_bytes") == 0, what="node0's journal shipped")
    bearer = {"Authorization": f"Bearer {stack.node_token}"}
    thief = peercerts.NodeKey.generate()

    # 1. enrolling (grants) in node0's name with another key: refused
    status, doc = enroll(origin, bearer, "node0", thief)
    assert status == 403, doc
    assert "enrolled with another key" in doc["errors"][0]["message"]
    # ... and with node0's own public key (anyone in its swarms sees it) but not its private key:
    # unsigned, signed by another key, or an old signed request seen on the wire
    real = peercerts.NodeKey.load_or_create(key_file, "data_dir")
    stale = protocol.GrantsRequest("node0", real.public_pem, [], at=int(time.time()) - 3600)
    for req, signer in ((protocol.GrantsRequest("node0", real.public_pem, []), None),
                        (protocol.GrantsRequest("node0", real.public_pem, []), thief),
                        (protocol.GrantsRequest("decoy", real.public_pem, []), thief),
                        (stale, real)):
        status, doc = enroll(origin, bearer, req.node, signer, req)
        assert status == 403, doc

    # 2. journal records in node0's name: unsigned, or signed by another key, are refused whole
    forged = protocol.JournalBatch("node0", [record("node0", "alice")]).encode()
    for signature in (None, signing.sign_batch(thief.private_key, forged)):
        headers = {**bearer, **({protocol.NODE_SIGNATURE_HEADER: signature} if signature else {})}
        status, doc = post(protocol.JOURNAL.url(origin.url), forged, headers)
        assert status == 403, doc
    # a batch signed by the real key of an unknown name: refused (enrolling comes first)
    stranger = protocol.JournalBatch("nobody", [record("nobody", "alice")]).encode()
    status, _ = post(protocol.JOURNAL.url(origin.url), stranger,
                     {**bearer, protocol.NODE_SIGNATURE_HEADER: signing.sign_batch(thief.private_key, stranger)})
    assert status == 403

    # 3. the token holder may add a node of its own; its records are its own, never node0's
    assert api.grants(origin.url, stack.node_token, "intruder", thief).ttl_seconds > 0  # enrolled
    mixed = protocol.JournalBatch("intruder", [record("node0", "alice"), record("intruder", "mallory")]).encode()
    status, doc = post(protocol.JOURNAL.url(origin.url), mixed,
                       {**bearer, protocol.NODE_SIGNATURE_HEADER: signing.sign_batch(thief.private_key, mixed)})
    assert status == 200 and doc == {"accepted": 1, "duplicates": 0, "rejected": 1}
    events = api.audit_events(origin.url, stack.operator_token, limit=1000)
    assert {e["node"] for e in events} == {"node0", "intruder"}
    assert not any(e["principal"] == "alice" for e in events)  # nothing forged reached the audit
    assert [e["principal"] for e in events if e["node"] == "intruder"] == ["mallory"]
    assert any(e["node"] == "node0" and e.get("digest") == blob.digest for e in events)

    # 4. an operator on the origin host releases node0 (it lost its key): a new key may enroll
    result = subprocess.run([sys.executable, "-m", "shoal_origin", "forget-node", "node0",
                             "--config", str(origin.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert api.grants(origin.url, stack.node_token, "node0", thief).ttl_seconds > 0  # enrolled
    again = subprocess.run([sys.executable, "-m", "shoal_origin", "forget-node", "never-seen",
                            "--config", str(origin.config_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "no node named 'never-seen'" in again.stderr

    # 5. the thief's key is found out: banned, it gets nothing under any name
    banned = subprocess.run([sys.executable, "-m", "shoal_origin", "forget-node", "node0", "--ban",
                             "--config", str(origin.config_path)], capture_output=True, text=True, timeout=60)
    assert banned.returncode == 0, banned.stderr
    for name in ("node0", "intruder", "fresh-name"):
        status, doc = enroll(origin, bearer, name, thief)
        assert status == 403 and "banned" in doc["errors"][0]["message"], (name, doc)
    # nor may the host come back under the name with a fresh key
    status, doc = enroll(origin, bearer, "node0", peercerts.NodeKey.generate())
    assert status == 403 and "enroll-node" in doc["errors"][0]["message"], doc
    assert origin.metric("shoal_origin_enrollment_refusals_total") >= 5
    # the operator admits the real node's new key explicitly
    renewed = peercerts.NodeKey.generate()
    (stack.workdir / "node0.pub").write_text(renewed.public_pem)
    bound = subprocess.run([sys.executable, "-m", "shoal_origin", "enroll-node", "node0", "--public-key",
                            str(stack.workdir / "node0.pub"), "--config", str(origin.config_path)],
                           capture_output=True, text=True, timeout=60)
    assert bound.returncode == 0, bound.stderr
    assert api.grants(origin.url, stack.node_token, "node0", renewed).ttl_seconds > 0  # enrolled
    # 6. it was a mistake: the ban is lifted, the key may enroll a (free) name again
    lifted = subprocess.run([sys.executable, "-m", "shoal_origin", "forget-node", "node0", "--unban",
                             "--config", str(origin.config_path)], capture_output=True, text=True, timeout=60)
    assert lifted.returncode == 0 and "lifted 1 ban" in lifted.stdout, lifted.stderr
    assert api.grants(origin.url, stack.node_token, "fresh-name", thief).ttl_seconds > 0  # enrolled
    upper = subprocess.run([sys.executable, "-m", "shoal_origin", "forget-node", "Node0",
                            "--config", str(origin.config_path)], capture_output=True, text=True, timeout=60)
    assert upper.returncode == 2 and "lowercase DNS name" in upper.stderr


def test_an_origin_that_lost_its_enrollments_takes_the_node_back(stack: Stack, images: Images) -> None:
    """newcomer15: origins moved to a fresh audit store (PostgreSQL) held no enrollment of the
    running agents, which got 403 on every admission - every layer from the registry - and on
    every journal batch, until restarted. The origin's 403 says "not enrolled"; the node enrolls
    again and asks once more."""
    blobs = sorted((b for b in images.app().blobs.values() if b.size >= 1 << 20), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin()
    agent = stack.start_agent()

    def pull(digest: str) -> None:
        url = f"http://{agent.config['listen']}/v2/private/app/blobs/{digest}"
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert "sha256:" + hashlib.sha256(resp.read()).hexdigest() == digest

    pull(blobs[0].digest)
    stack.journal(agent, minimum=1)
    origin.stop()
    for path in (stack.workdir / "origin").glob("audit.db*"):
        path.unlink()  # the enrollments (and the journal) are gone, as with a new audit store
    origin.start()
    pull(blobs[1].digest)
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 2,
             what="the second blob from the swarm")
    assert agent.metric("shoal_agent_fallbacks_total") == 0
    events = stack.journal(agent, minimum=1)  # shipped again: the new store holds the node's records
    assert blobs[1].digest in {e.get("digest") for e in events}
