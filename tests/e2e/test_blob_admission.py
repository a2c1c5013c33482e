"""A node joins only the swarms its pullers may read (issue 13). The origin admits a node to a
blob's swarm (metainfo, a token and a certificate naming that blob) only after the registry
accepted, for that repository and blob, the credential the node presents for a puller. Tried
here with the node's own secrets, straight at the origin, the tracker and the peers (not through
the agent's HTTP API, which would refuse first): with the token-auth registry, where alice may
pull private/app and bob may not, and with htpasswd."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest

from shoal import metainfo, peercerts, protocol
from shoal.clients import ApiError
from shoal.config import split_hostport
from shoal.registry import Credentials
from tests.e2e.conftest import USERS, Images
from tests.support import api
from tests.support.images import Blob
from tests.support.peerprobe import node_identity, probe
from tests.support.procs import Component, http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack
from tests.support.tokenworld import USERS as TOKEN_USERS
from tests.support.tokenworld import TokenWorld, pull_as, token_from_challenge

TTL = 2  # the origin's admission_ttl in these tests (seconds)


def basic(user: str, password: str) -> str:
    return Credentials(user, password).basic()


def node_key(agent: Component) -> peercerts.NodeKey:
    """The node's own key, as root on the node reads it."""
    return peercerts.NodeKey.load_or_create(Path(agent.config["data_dir"]) / "node.key", "data_dir")


def refused(stack: Stack, digest: str, node: str, key: peercerts.NodeKey, credential: str | None,
            repository: str = "private/app") -> int:
    assert stack.origin is not None
    with pytest.raises(ApiError) as exc:
        api.admission(stack.origin.url, stack.node_token, digest, node, key, stack.registry.host, repository,
                      credential)
    return exc.value.status


def announce(meta: metainfo.Metainfo, token: str) -> bytes:
    query = (f"info_hash={quote_from_bytes(meta.tracker_hash)}&peer_id={quote_from_bytes(b'-PR0001-' + os.urandom(12))}"
             f"&port=6999&uploaded=0&downloaded=0&left={meta.size}&compact=1&event=started&token={token}")
    status, body = http_get(f"{meta.announce}?{query}")
    assert status == 200
    return body


def largest(blobs: dict[str, Blob]) -> Blob:
    return max(blobs.values(), key=lambda b: b.size)


def test_a_node_reaches_only_what_its_pullers_could_pull(tstack: Stack, world: TokenWorld) -> None:
    stack = tstack
    stack.start_tracker()
    origin = stack.start_origin(admission_ttl=f"{TTL}s")
    upstream = {"name": world.registry.host, "url": world.registry.url}  # no node credentials at all
    served_alice, served_bob = (stack.start_agent(upstreams=[upstream], auth={"unauthenticated": "challenge"})
                                for _ in range(2))
    blob = largest(world.private.blobs)
    public = largest(world.public.blobs)
    path = f"/v2/private/app/blobs/{blob.digest}"
    before = len(world.registry.settle())

    # bob's node: bob is refused by the agent itself, and the node gets nothing on its own
    assert pull_as(served_bob, path, "bob").status == 401
    bob_key = node_key(served_bob)
    wait_for(lambda: served_bob.metric("shoal_agent_swarm_token_expiry_timestamp_seconds") > 0,
             what="bob's node enrolled")
    scoped = f'Bearer realm="{world.tokens.realm}",service="{world.tokens.service}",' \
             f'scope="repository:private/app:pull"'
    for who, credential in (("bob's registry token", f"Bearer {token_from_challenge(scoped, 'bob')}"),
                            ("bob's login", basic("bob", TOKEN_USERS["bob"])),
                            ("no credential", None),
                            ("a wrong password for alice", basic("alice", "guess")),
                            ("something that is not a credential", "Basic !!!")):
        assert refused(stack, blob.digest, "node1", bob_key, credential) in (401, 403), who
    # under another repository the blob is not alice's to give either (bob may pull public/app)
    assert refused(stack, blob.digest, "node1", bob_key, basic("bob", TOKEN_USERS["bob"]), "public/app") == 403
    # ... and the origin fetched nothing for those refusals
    assert not [p for p in world.registry.settle()[before:] if p.digest == blob.digest and p.method == "GET"]
    assert origin.metric("shoal_origin_admission_checks_total", result="denied") >= 5

    # alice's node: alice pulls through the swarm (the origin admitted her node for her)
    answer = pull_as(served_alice, path, "alice")
    assert answer.status == 200 and "sha256:" + hashlib.sha256(answer.body).hexdigest() == blob.digest
    wait_for(lambda: served_alice.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
             what="alice's node to fetch the blob from the swarm")
    kept = Path(served_alice.config["data_dir"]) / "cache" / "meta" / blob.digest.removeprefix("sha256:")
    alice_receipt = kept.with_suffix(".receipt").read_text().strip()
    meta = metainfo.parse(kept.with_suffix(".torrent").read_bytes())

    # bob's node, with what it can get (a grant for public/app's blob, which bob may pull), and
    # the private blob's info-hash (not a secret): no peer gives it a byte of the private blob
    granted, _ = stack.admit(public.digest, node="node1", key=bob_key, credential=basic("bob", TOKEN_USERS["bob"]),
                             repository="public/app")
    assert b"not admitted to this torrent" in announce(meta, granted.grant.token)
    for holder in (origin, served_alice):
        address = split_hostport(holder.config["torrent"]["listen"])
        got = probe(address, meta, source_ip="127.0.0.61", identity=node_identity(bob_key, granted.grant.certificate),
                    enough=meta.size)
        assert got == b"", f"bob's node got {len(got)} bytes of the private blob from the {holder.name}"
    # nor can it have grants renewed for alice's node's admission, or for one it makes up
    assert stack.origin is not None
    renewed = api.grants(origin.url, stack.node_token, "node1", bob_key,
                         [protocol.Receipt(blob.digest, alice_receipt),
                          protocol.Receipt(blob.digest, base64.urlsafe_b64encode(os.urandom(64)).decode().rstrip("="))])
    assert renewed.grants == [] and renewed.refused == [blob.digest, blob.digest]
    # alice's node renews its own
    alice_key = node_key(served_alice)
    mine = api.grants(origin.url, stack.node_token, "node0", alice_key,
                      [protocol.Receipt(blob.digest, alice_receipt)])
    assert [g.digest for g in mine.grants] == [blob.digest] and mine.refused == []

    # a node that serves alice can be admitted with her credential, straight at the origin too
    alice_login = basic("alice", TOKEN_USERS["alice"])
    again, _ = stack.admit(blob.digest, node="node1", key=bob_key, credential=alice_login)
    assert again.metainfo == meta.raw

    # revoked at the registry: no new admission once the origin's answer is older than its TTL
    world.tokens.revoke("alice", "private/app")

    def admission_status() -> int:
        try:
            api.admission(origin.url, stack.node_token, blob.digest, "node1", bob_key, world.registry.host,
                          "private/app", alice_login)
        except ApiError as exc:
            return exc.status
        return 200

    try:
        revoked = time.monotonic()
        status = admission_status()
        while status == 200:  # the origin's last yes may be younger than its TTL
            assert time.monotonic() - revoked < TTL + 5, "still admitted well past the TTL of the registry's yes"
            time.sleep(0.1)
            status = admission_status()
        assert status == 403
    finally:
        world.tokens.grant("alice", "private/app", "pull")
    # the registry decided (and recorded) each admission under the puller's own name: alice's
    # node asked for her (the agent's check, then the origin's), and so did the direct calls
    heads = [p for p in world.registry.settle()[before:] if p.method == "HEAD" and p.digest == blob.digest]
    assert sum(1 for p in heads if p.actor == "alice") >= 3


def test_admission_against_htpasswd(stack: Stack, registry: Registry, images: Images) -> None:
    """With htpasswd every user the registry knows may pull every repository: the node's login
    is admitted, a wrong password, an unknown user or no credential is not, and the origin
    fetches nothing until someone is."""
    stack.start_tracker()
    stack.start_origin(admission_ttl=f"{TTL}s")
    blob = largest(images.get("private/admission", layers=[5 * (1 << 20), 100_000], seed=41).blobs)
    before = len(registry.settle())
    key = peercerts.NodeKey.generate()
    assert stack.origin is not None
    api.grants(stack.origin.url, stack.node_token, "probe", key)
    for credential in (None, basic("node", "not-the-password"), basic("mallory", "x"), "Bearer not-a-token"):
        assert refused(stack, blob.digest, "probe", key, credential, "private/admission") == 403, credential
    # a valid login, in the name of node "probe" but signed by another key (another enrolled node
    # spending probe's budget, or a copy of its public key): refused before the registry is asked
    assert refused(stack, blob.digest, "probe", peercerts.NodeKey.generate(), basic("node", USERS["node"]),
                   "private/admission") == 403
    assert not [p for p in registry.settle()[before:] if p.digest == blob.digest and p.method == "GET"]
    admission, _ = stack.admit(blob.digest, node="probe", key=key, credential=basic("node", USERS["node"]),
                               repository="private/admission")
    assert str(metainfo.parse(admission.metainfo).digest) == blob.digest
    # an agent in node mode (its own login) pulls through the swarm
    agent = stack.start_agent()
    status, body = http_get(f"{agent.url}/v2/private/admission/blobs/{blob.digest}", timeout=60)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
             what="the blob from the swarm")
