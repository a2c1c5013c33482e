"""One registry's yes does not unlock another registry's blobs (issue 12, part 7). The cache and
the swarm are keyed by digest; a registry that says yes to a digest it does not hold (a lying or
intercepted one) must not be served another registry's private blob from either. The agent serves
a blob for a registry only if it came from it, or if that registry sends a random sample of its
bytes matching what was verified here."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

from tests.e2e.conftest import Images
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.procs import http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack


def test_a_lying_registry_gets_nothing_from_the_cache_or_the_swarm_and_an_honest_one_proves_it(
        stack: Stack, registry: Registry, images: Images) -> None:
    blob = min(images.app().large_blobs(1 << 20), key=lambda b: b.size)  # large: it goes through the swarm
    liar = FakeServer("127.0.0.40")
    try:
        path = f"/v2/private/app/blobs/{blob.digest}"
        # "yes, I have it" to the HEAD, and bytes of its own making to any GET
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size + 1000)
        liar.routes[("GET", path)] = Canned(206, {"Content-Range": f"bytes 0-63/{blob.size}"}, os.urandom(64))
        liar.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
        upstreams = [stack.upstream(stack.node_user, stack.node_password),
                     {"name": liar.host, "url": liar.url},
                     # the same registry under a second name: an honest upstream that holds the blob
                     {**stack.upstream(stack.node_user, stack.node_password), "name": "mirror.example:5000"}]
        stack.start_tracker()
        stack.start_origin()
        first = stack.start_agent(upstreams=upstreams)
        second = stack.start_agent(upstreams=upstreams)

        # first pulls it from its registry (through the swarm: the origin seeds it from there)
        status, body = http_get(f"{first.url}{path}?ns={registry.host}", timeout=60)
        assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        # the liar asks the node that has it cached: refused, no byte of it; a HEAD is answered
        # as for a blob not here (the liar's own size), so it does not even learn that it is cached
        head = urllib.request.Request(f"{first.url}{path}?ns={liar.host}", method="HEAD")
        with urllib.request.urlopen(head, timeout=60) as resp:
            assert resp.status == 200 and int(resp.headers["Content-Length"]) == blob.size + 1000
        assert first.metric("shoal_agent_cache_hits_total") == 0
        status, body = http_get(f"{first.url}{path}?ns={liar.host}", timeout=60)
        assert status == 404, body[:200]
        assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        assert first.metric("shoal_agent_provenance_checks_total", result="refused") == 1
        # the liar asks a node that has nothing (claiming the true size now, so that the swarm
        # carries the blob): it comes from the swarm, and is not served
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size)
        wait_for(lambda: first.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
                 what="the first node to seed the blob")
        status, body = http_get(f"{second.url}{path}?ns={liar.host}", timeout=60)
        assert status == 404, body[:200]
        assert second.metric("shoal_agent_provenance_checks_total", result="refused") == 1
        sampled = [s for s in liar.seen if s.method == "GET" and s.path.startswith(path)]
        assert len(sampled) == 2 and all(s.headers.get("Range", "").startswith("bytes=") for s in sampled)
        # the honest second name proves it holds the blob once per node; the proof is remembered
        before = registry.settle()
        for _ in range(2):
            status, body = http_get(f"{second.url}{path}?ns=mirror.example:5000", timeout=60)
            assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        assert second.metric("shoal_agent_provenance_checks_total", result="proved") == 1
        samples = registry.samples(registry.settle()[len(before):])
        assert samples == {blob.digest: 1}  # in the registry's own audit, marked as a sample
        # and the liar is still refused on the node that now caches the blob
        status, _ = http_get(f"{second.url}{path}?ns={liar.host}", timeout=60)
        assert status == 404
    finally:
        liar.close()
