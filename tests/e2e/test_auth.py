"""Private images stay private: the origin registry runs with JWT token auth (a token server
the tests run), the agent passes the puller's credentials through and asks the registry before
any blob byte. alice may pull private/app, bob may not, anonymous clients only public/app."""

from __future__ import annotations

import collections
import hashlib
import tempfile
from pathlib import Path

from tests.support import api
from tests.support.clients import Containerd
from tests.support.procs import Component, wait_for
from tests.support.stack import Stack
from tests.support.tokenworld import MANIFEST, USERS, Answer, TokenWorld, get, pull_as, start


def test_private_content_matrix(tstack: Stack, world: TokenWorld) -> None:
    agent, other = start(tstack)
    image = world.private
    layers = sorted((b for b in image.blobs.values() if b.size > 1_000_000), key=lambda b: b.size, reverse=True)
    cached, on_peers, nowhere = layers[0], layers[1], layers[2]
    # set up the blob states as alice: one blob on this node, one only on the other node (and the seeder)
    assert pull_as(agent, f"/v2/private/app/blobs/{cached.digest}", "alice").status == 200
    assert pull_as(other, f"/v2/private/app/blobs/{on_peers.digest}", "alice").status == 200
    assert agent.metric("shoal_agent_cache_blobs") == 1

    content = [b.path.read_bytes() for b in image.blobs.values()] + list(image.manifests.values())
    probes = {"cached": cached, "peers": on_peers, "nowhere": nowhere}

    def check_denied(answer: Answer, why: str) -> None:
        assert answer.status in (401, 403, 404), why
        assert len(answer.body) < 2000, why
        assert not any(answer.body and answer.body in c for c in content), why  # not one byte of content

    def run(principal: str, user: str | None, allowed: bool) -> None:
        for state, blob in probes.items():
            for request in ("manifest", "blob", "blob_other_repo"):
                why = f"{principal} {request} {state}"
                if request == "manifest":
                    answer = pull_as(agent, "/v2/private/app/manifests/v1", user, accept=MANIFEST)
                elif request == "blob":
                    answer = pull_as(agent, f"/v2/private/app/blobs/{blob.digest}", user)
                else:
                    answer = pull_as(agent, f"/v2/public/app/blobs/{blob.digest}", user)
                if request == "blob_other_repo":
                    assert answer.status == 404, why  # the blob is not linked to public/app
                    check_denied(answer, why)
                elif allowed:
                    assert answer.status == 200, why
                    digest = image.digest if request == "manifest" else blob.digest
                    assert "sha256:" + hashlib.sha256(answer.body).hexdigest() == digest, why
                else:
                    assert answer.status == 401, why
                    assert answer.headers["www-authenticate"].startswith(f'Bearer realm="{world.tokens.realm}"')
                    check_denied(answer, why)

    run("anonymous", None, allowed=False)
    run("bob", "bob", allowed=False)
    run("alice", "alice", allowed=True)
    # "peers" and "nowhere" are now here too (a client may have had a relay's every byte before
    # the download is in the cache)
    wait_for(lambda: agent.metric("shoal_agent_cache_blobs") == 3)
    world.tokens.revoke("alice", "private/app")
    try:
        run("alice after revocation", "alice", allowed=False)
    finally:
        world.tokens.grant("alice", "private/app", "pull")
    # requests without any credentials get the registry's own challenge, scoped to the repository
    bare = get(agent, f"/v2/private/app/blobs/{cached.digest}")
    assert bare.status == 401
    assert 'scope="repository:private/app:pull"' in bare.headers["www-authenticate"]
    # anonymous clients may pull the public image
    public_blob = next(iter(world.public.blobs.values()))
    public = pull_as(agent, f"/v2/public/app/blobs/{public_blob.digest}", None)
    assert public.status == 200
    assert "sha256:" + hashlib.sha256(public.body).hexdigest() == public_blob.digest


def test_containerd_pulls_with_its_users_credentials(tstack: Stack, world: TokenWorld) -> None:
    """ctr --user through the agent, for each principal, with the private blobs nowhere yet, then
    cached on this node (after alice pulled), then only on a peer (another node's agent)."""
    agent, peer = start(tstack)
    ref = f"{world.registry.host}/private/app:v1"
    private = set(world.private.blobs)

    def fetch(via: Component, user: str | None, image: str = ref) -> tuple[bool, set[str]]:
        ctd = Containerd(Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp")))
        try:
            ctd.start()
            hosts = ctd.hosts_dir(world.registry.host, world.registry.url, via)
            # the registry itself (the `server` fallback) is unreachable for containerd, so what it
            # gets, or does not get, is the agent's answer
            (hosts / world.registry.host / "hosts.toml").write_text(
                f'server = "http://127.0.0.1:9"\n\n[host."{via.url}"]\n  capabilities = ["pull", "resolve"]\n')
            args = ["content", "fetch", "--plain-http", "--hosts-dir", str(hosts)]
            if user:
                args += ["--user", f"{user}:{USERS[user]}"]
            ok = ctd.ctr(*args, image, check=False).returncode == 0
            listed = set(ctd.ctr("content", "ls", "-q").stdout.split())
            if ok:
                wanted = world.private if image == ref else world.public
                ctd.verify_content([wanted.digest, *wanted.blobs])
            return ok, listed
        finally:
            ctd.close()

    for user in ("bob", None):  # nowhere
        ok, got = fetch(agent, user)
        assert not ok and not got & private, user
    ok, got = fetch(agent, "alice")
    assert ok and private <= got
    assert agent.metric("shoal_agent_cache_blobs") == len(private)
    for via, state in ((agent, "cached"), (peer, "on peers")):
        for user in ("bob", None):
            ok, got = fetch(via, user)
            assert not ok, (user, state)
            assert not got & private, (user, state)
    assert peer.metric("shoal_agent_cache_blobs") == 0
    ok, _ = fetch(peer, None, f"{world.registry.host}/public/app:v1")  # anonymous, public image
    assert ok
    ok, _ = fetch(peer, "alice")  # and alice through the peer: from the swarm
    assert ok
    wait_for(lambda: peer.metric("shoal_agent_downloads_total", source="peers", result="ok") >= 1,
             what="a download from the swarm")


def test_every_private_200_joins_a_registry_pull_event(tstack: Stack, world: TokenWorld) -> None:
    """The audit join: every 200 for non-public content has a journal record with the principal
    and a pull event at the registry for the same principal, repository and digest."""
    agent, other = start(tstack)
    before = len(world.registry.settle())
    for node in (agent, other, agent):  # cold, cold, then from cache and decision cache
        assert pull_as(node, "/v2/private/app/manifests/v1", "alice", accept=MANIFEST).status == 200
        for blob in world.private.blobs.values():
            assert pull_as(node, f"/v2/private/app/blobs/{blob.digest}", "alice").status == 200
        assert pull_as(node, "/v2/private/app/manifests/v1", "bob", accept=MANIFEST).status == 401
    events = world.registry.settle()[before:]
    seen = {(e.actor, e.repository, e.digest) for e in events}
    assert tstack.origin is not None
    journal = wait_for_journal(tstack, minimum=2 * (2 + 2 * len(world.private.blobs)))
    served = [e for e in journal if e["status"] == 200 and e["repository"] == "private/app"]
    assert len(served) == 3 * (1 + len(world.private.blobs))
    for e in served:
        assert e["principal"] == "alice"
        assert str(e["cred_fpr"]).startswith("fp:")
        assert (e["principal"], e["repository"], e["digest"]) in seen, e
    # Not only "somebody asked once": each node asked the registry itself, and a decision reused
    # from cache follows that node's own yes (a node serving under another node's yes would pass
    # a plain membership test). The registry records an authorization as a HEAD pull event.
    blob_digests = {b.digest for b in world.private.blobs.values()}
    asked: dict[tuple[str, str], list[str]] = {}
    for e in sorted(served, key=lambda e: str(e["ts"])):
        if e["digest"] not in blob_digests:
            continue
        methods = asked.setdefault((str(e["node"]), str(e["digest"])), [])
        methods.append(str(e["authz_method"]))
    assert len(asked) == 2 * len(blob_digests)
    for who, methods in asked.items():
        # (a pull with a fresh bearer token is a new credential: the registry is asked again)
        assert methods[0] == "registry", (who, methods)
        assert set(methods) <= {"registry", "decision_cache"}, (who, methods)
    heads = collections.Counter(p.digest for p in events
                                if p.method == "HEAD" and p.actor == "alice" and p.repository == "private/app")
    for digest in blob_digests:
        asked_registry = sum(m.count("registry") for (_, d), m in asked.items() if d == digest)
        assert asked_registry >= 2 and heads[digest] >= asked_registry, (digest, heads[digest], asked_registry)
    denied = [e for e in journal if e["status"] == 401]
    assert denied and all(e["principal"] is None for e in denied)


def wait_for_journal(stack: Stack, *, minimum: int, timeout: float = 30) -> list[dict[str, object]]:
    import time

    assert stack.origin is not None
    deadline = time.monotonic() + timeout
    events: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        events = api.audit_events(stack.origin.url, stack.operator_token)
        if len(events) >= minimum and all(e["outcome"] != "incomplete" for e in events):
            return events
        time.sleep(0.2)
    raise AssertionError(f"journal has {len(events)} events, expected at least {minimum}")
