"""One registry's yes does not unlock another registry's blobs (issue 12, part 7). The cache and
the swarm are keyed by digest; a registry that says yes to a digest it does not hold (a lying or
intercepted one) must not be served another registry's private blob from either. A blob goes out
for a registry only if this node fetched it from there, or the origin vouches that the registry
holds it: it fetched the blob from that registry and checked it against the digest."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Images
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.procs import http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

ALIAS = "mirror.example:5000"  # the same registry under a second name: an honest upstream


def test_a_lying_registry_gets_nothing_from_the_cache_or_the_swarm_and_an_honest_one_is_vouched_for(
        stack: Stack, registry: Registry, images: Images) -> None:
    blob = min(images.app().large_blobs(1 << 20), key=lambda b: b.size)  # large: it goes through the swarm
    data = blob.path.read_bytes()
    liar = FakeServer("127.0.0.40")
    try:
        path = f"/v2/private/app/blobs/{blob.digest}"
        # "yes, I have it" to the HEAD (and a size of its own making), and bytes of its own to a GET
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size + 1000)
        liar.routes[("GET", path)] = Canned(200, {}, os.urandom(blob.size))
        liar.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")

        def upstreams(user: str, password: Path) -> list[dict[str, Any]]:
            real = stack.upstream(user, password)
            return [real, {"name": liar.host, "url": liar.url}, {**real, "name": ALIAS}]

        stack.start_tracker()
        origin = stack.start_origin(upstreams=upstreams(stack.seeder_user, stack.seeder_password))
        first = stack.start_agent(upstreams=upstreams(stack.node_user, stack.node_password))
        second = stack.start_agent(upstreams=upstreams(stack.node_user, stack.node_password))

        # first pulls it from its registry (through the swarm: the origin seeds it from there)
        status, body = http_get(f"{first.url}{path}?ns={registry.host}", timeout=60)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        wait_for(lambda: first.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
                 what="the first node to cache and seed the blob")
        # the liar asks the node that has it cached: a HEAD is answered as for a blob not here
        # (the liar's own size: it does not even learn that it is cached), a GET is refused
        head = urllib.request.Request(f"{first.url}{path}?ns={liar.host}", method="HEAD")
        with urllib.request.urlopen(head, timeout=60) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == blob.size + 1000
        assert first.metric("shoal_agent_cache_hits_total") == 0
        status, body = http_get(f"{first.url}{path}?ns={liar.host}", timeout=60)
        assert status == 404, body[:200]
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert first.metric("shoal_agent_provenance_checks_total", result="refused") == 1
        # the origin asked the liar for the blob and found other bytes
        assert any(s.method == "GET" and s.path == path for s in liar.seen)
        assert origin.metric("shoal_origin_seed_requests_total", result="source_refused") >= 1

        # the liar asks a node that has nothing: the origin does not vouch, so the blob can only
        # come from the liar itself, whose bytes fail the digest; no byte of the real blob leaves
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size)
        try:
            status, body = http_get(f"{second.url}{path}?ns={liar.host}", timeout=60)
        except http.client.IncompleteRead as exc:  # the liar's own bytes, cut when they failed the digest
            body = exc.partial
        assert "sha256:" + hashlib.sha256(body).hexdigest() != blob.digest and data[:4096] not in body
        assert second.metric("shoal_agent_fallbacks_total", reason="origin_refused") == 1
        assert second.metric("shoal_agent_downloads_total", source="peers", result="ok") == 0

        # the honest second name: the origin fetches the blob from it once, checks it and vouches
        before = registry.settle()
        for _ in range(2):
            status, body = http_get(f"{second.url}{path}?ns={ALIAS}", timeout=60)
            assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        # a client streaming the download has its last byte (checked against the digest) just
        # before the download is counted: wait for the count, then check it is the one download
        wait_for(lambda: second.metric("shoal_agent_downloads_total", source="peers", result="ok") >= 1,
                 what="the second node to cache the blob")
        assert second.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1
        gets = [p for p in registry.settle()[len(before):] if p.digest == blob.digest and p.method == "GET"]
        assert [p.actor for p in gets] == [stack.seeder_user]  # the origin's one check, no node's
        # and the liar is still refused by the node that now caches the blob
        status, _ = http_get(f"{second.url}{path}?ns={liar.host}", timeout=60)
        assert status == 404
        # the first node asks the origin too (an admission, with the puller's credential) before
        # it serves its cached copy for the alias, and keeps the answer with the blob
        status, body = http_get(f"{first.url}{path}?ns={ALIAS}", timeout=60)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        assert first.metric("shoal_agent_provenance_checks_total", result="confirmed") == 1
        # with the origin away, what was confirmed is still served; what was not, nobody can
        # confirm: a 503 (containerd goes on to the registry itself), never the cached bytes
        origin.stop()
        status, body = http_get(f"{first.url}{path}?ns={ALIAS}", timeout=60)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        status, body = http_get(f"{second.url}{path}?ns={registry.host}", timeout=60)
        assert status == 503 and data[:4096] not in body
        assert second.metric("shoal_agent_provenance_checks_total", result="unavailable") == 1
    finally:
        liar.close()
