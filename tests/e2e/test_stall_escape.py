"""The stall escape (attack19 #5): the tracker leaves the origin's seeder out of a swarm that has
seeders of its own on two nodes (tracker/peers.py ORIGIN_SPARE). When those cannot deliver (two
colluding admitted nodes that only say they seed, seeders gone without a word, or a port a
NetworkPolicy blocks), a joiner got no piece and fell back to the registry after
first_piece_timeout. Now a download halfway there announces `stalled=1`, is handed the origin,
and completes from the swarm."""

from __future__ import annotations

import hashlib
import http.client
import threading
import urllib.parse
import urllib.request

from shoal import bencode, metainfo, protocol
from tests.e2e.conftest import Images
from tests.support.procs import free_port, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

MIB = 1 << 20
BOUND = 60.0


class Liars(threading.Thread):
    """Two admitted nodes announcing that they seed the blob, from ports where nothing listens,
    every half second (within the tracker's spare window) until stopped. Each from an address of
    its own, as nodes are (the tracker lists the announce's source address; and libtorrent, which
    keeps one entry per address, would otherwise take the origin's for another port of a liar's)."""

    def __init__(self, stack: Stack, digest: str) -> None:
        super().__init__(daemon=True)
        self.announces: list[tuple[str, str]] = []  # (source address, path and query)
        self.failures: list[bytes] = []
        assert stack.tracker is not None
        self.tracker = urllib.parse.urlsplit(stack.tracker.url)
        for node, source in (("liar-a", "127.0.0.51"), ("liar-b", "127.0.0.52")):
            admission, _ = stack.admit(digest, node=node, repository="private/escape")
            meta = metainfo.parse(admission.metainfo)
            query = urllib.parse.urlencode({
                "info_hash": meta.tracker_hash, "peer_id": b"-XX0100-" + node.encode().ljust(12, b"-"),
                "port": free_port(source), "uploaded": 0, "downloaded": meta.size, "left": 0,
                "event": "completed", "compact": 1, "token": admission.grant.token})
            self.announces.append((source, f"{protocol.ANNOUNCE.path()}?{query}"))
        self.stop = threading.Event()
        self.announce_all()

    def announce_all(self) -> None:
        for source, path in self.announces:
            assert self.tracker.hostname is not None and self.tracker.port is not None
            conn = http.client.HTTPConnection(self.tracker.hostname, self.tracker.port, timeout=10,
                                              source_address=(source, 0))
            try:
                conn.request("GET", path)
                doc = bencode.decode(conn.getresponse().read())
            finally:
                conn.close()
            if not isinstance(doc, dict) or b"failure reason" in doc:
                self.failures.append(repr(doc).encode())

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.announce_all()


def test_a_joiner_whose_swarm_seeders_cannot_serve_it_gets_the_origin(stack: Stack, registry: Registry,
                                                                        images: Images) -> None:
    image = images.get("private/escape", layers=[6 * MIB + 11], seed=57)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    # The production timeouts (the tests' stack uses 5 s): the escape comes at half of
    # first_piece_timeout, and the origin's seeder unchokes a new peer at its next choker round
    # (every 3 s, shoal.swarm SEEDER_CHOKING), so 2.5 s left did not always do.
    # First copies off: a node taking its share of one from the origin is not handed the seeder
    # anyway until it stalls (test_first_copy.py has that stall); here the swarm's liars hide it.
    stack.start_tracker()
    stack.start_origin(first_copy=False)
    stack.start_agent(swarm={"first_piece_timeout": "10s", "stall_timeout": "10s"})
    agent, tracker = stack.agents[0], stack.tracker
    assert tracker is not None
    before = registry.settle(quiet=0.5)
    liars = Liars(stack, blob.digest)  # (their admissions had the origin fetch and seed the blob)
    liars.start()
    try:
        url = f"http://{agent.config['listen']}/v2/private/escape/blobs/{blob.digest}"
        with urllib.request.urlopen(url, timeout=BOUND) as r:
            body = r.read()
    finally:
        liars.stop.set()
        liars.join(BOUND)
    assert not liars.failures
    assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    # from the swarm (the origin's seeder), after asking for it once; not from the registry (the
    # client may have every byte before the download is committed)
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") >= 1, timeout=BOUND,
             what="the download committed")
    assert agent.metric("shoal_agent_fallbacks_total") == 0
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1
    assert agent.metric("shoal_agent_swarm_stall_escapes_total") == 1
    assert tracker.metric("shoal_tracker_stalled_announces_total") >= 1
    gets = registry.blob_gets(registry.settle(quiet=0.5)[len(before):])
    assert gets.get(blob.digest) == 1  # the origin's fetch, for the liars' admissions
