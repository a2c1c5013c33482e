"""IPv6 (issue 15): the registry, tracker, origin and two agents all on ::1 (each on a port of its
own), the large layer moving agent to agent over BitTorrent on IPv6, found through the tracker's
`peers6`; and a dual-stack tracker on [::] answering IPv4 and IPv6 peers at once, each in its own
kind of peer list.

The pulls speak the distribution API directly (tests/support/ocihttp.py): skopeo 1.9 and
containerd 1.6 refuse an image reference whose host is an IPv6 literal. containerd pulling
through an agent on [::1] (hosts.toml) is in test_hosts_toml.py."""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

import pytest

from shoal import bencode, metainfo
from tests.e2e.conftest import MIB, USERS
from tests.support import ocihttp
from tests.support.images import Image, build_image
from tests.support.procs import free_port, has_ipv6_loopback
from tests.support.registry import Registry
from tests.support.stack import Stack

THRESHOLD = 1 << 20


pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


@pytest.fixture(scope="module")
def registry6(e2e_root: Path) -> Iterator[Registry]:
    reg = Registry(e2e_root / "registry6", users=USERS, ip="::1")
    reg.start()
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def image6(e2e_root: Path, registry6: Registry) -> Image:
    image = build_image(e2e_root / "images6" / "v6app", tag="v1", layer_sizes=[40 * MIB + 77, 3 * MIB, 200_000],
                        seed=615)
    ocihttp.push(image, base=registry6.url, repo="private/v6app", auth=("alice", USERS["alice"]))
    return image


@pytest.fixture
def stack6(tmp_path: Path, registry6: Registry) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", registry6, node_user=("node", USERS["node"]),
              seeder_user=("seeder", USERS["seeder"]), ip="::1")
    yield s
    s.close()


def test_a_pull_on_ipv6_moves_the_large_layer_between_agents(stack6: Stack, registry6: Registry,
                                                               image6: Image, tmp_path: Path) -> None:
    stack = stack6
    assert registry6.url.startswith("http://[::1]:")
    tracker = stack.start_tracker()
    # the seeder's upload is capped, so the agents must fetch from each other to finish
    origin = stack.start_origin(torrent={"upload_rate_limit": "8MiB"})
    agents = [stack.start_agent() for _ in range(2)]
    for c in (tracker, origin, *agents):
        assert c.url.startswith("http://[::1]:"), c.url
    assert origin.config["tracker"].startswith("http://[::1]:")
    before = registry6.settle()

    def pull(n: int) -> dict[str, int]:
        return ocihttp.pull(agents[n].url, "private/v6app", "v1", tmp_path / f"copy{n}")

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(pull, range(2)))
    expected = {d: b.size for d, b in image6.blobs.items()}
    assert got == [expected, expected]  # every body hashed to its digest inside pull()

    pulls = registry6.settle()[len(before):]
    gets = registry6.blob_gets(pulls)
    large = image6.large_blobs(THRESHOLD)
    for blob in large:
        assert gets.get(blob.digest) == 1, f"{blob.digest} left the registry {gets.get(blob.digest)} times"
        fetched = [p for p in pulls if p.digest == blob.digest and p.method == "GET"]
        assert {p.actor for p in fetched} == {"seeder"}
        # the registry saw the origin come over IPv6 (distribution records the socket address)
        assert all(p.addr.startswith("[::1]:") for p in fetched), [p.addr for p in fetched]
    # The only way to find a peer was the tracker's peers6 (every peer is on ::1, and a
    # compact answer lists v6 peers nowhere else): libtorrent read it and connected.
    from_agents = sum(a.metric("shoal_agent_swarm_download_bytes_total", peer="agent") for a in agents)
    assert from_agents > 0, "no bytes moved between the agents"
    for a in agents:
        assert a.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(large)
        assert a.metric("shoal_agent_fallbacks_total") == 0
    # the tracker lists each of them under ::1, never a v4-mapped or claimed address; a leecher
    # gets both agents, not the origin (two nodes seed the blob: origin_spare)
    doc = announce(tracker_announce(stack, large[0].digest), stack, large[0].digest, source="::1", compact=False)
    listed = doc[b"peers"]
    assert isinstance(listed, list) and len(listed) == 2 and doc[b"complete"] == 3
    assert {p[b"ip"] for p in listed if isinstance(p, dict)} == {b"::1"}


def tracker_announce(stack: Stack, digest: str) -> str:
    """The announce URL the origin wrote into the blob's torrent."""
    raw = (stack.workdir / "origin" / "meta" / f"{digest.removeprefix('sha256:')}.torrent").read_bytes()
    return metainfo.parse(raw).announce


def announce(url: str, stack: Stack, digest: str, *, source: str, port: int = 6999, compact: bool = True,
             left: int = 1) -> dict[bytes, bencode.Value]:
    """A real announce from `source` (the address the tracker must record) with a swarm token
    the origin granted for `digest`."""
    admission, _ = stack.admit(digest, node=f"peer-{port}", repository="private/v6app")
    meta = metainfo.parse(admission.metainfo)
    parts = urlsplit(url)
    query = (f"info_hash={quote_from_bytes(meta.tracker_hash)}&peer_id={quote_from_bytes(b'-V60001-' + os.urandom(12))}"
             f"&port={port}&uploaded=0&downloaded=0&left={left}&compact={int(compact)}&event=started"
             f"&token={admission.grant.token}&ip=203.0.113.9&ipv6=2001:db8::9")
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", f"{parts.path}?{query}")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, body[:300]
    doc = bencode.decode(body)
    assert isinstance(doc, dict) and b"failure reason" not in doc, doc
    return doc


def compact_peers(raw: bencode.Value, size: int) -> set[tuple[str, int]]:
    assert isinstance(raw, bytes) and len(raw) % size == 0
    family = socket.AF_INET if size == 6 else socket.AF_INET6
    return {(socket.inet_ntop(family, raw[i:i + size - 2]), int.from_bytes(raw[i + size - 2:i + size], "big"))
            for i in range(0, len(raw), size)}


def test_a_dual_stack_tracker_answers_ipv4_and_ipv6_peers(stack6: Stack, image6: Image) -> None:
    """The tracker listens on [::] (one IPv6 socket that also takes IPv4, v4-mapped). The origin
    seeder announces over IPv6; a peer announces over IPv4 and another over IPv6, each with a
    swarm token the origin granted: each peer is recorded under its own source address (the v4
    one as 127.0.0.2, not ::ffff:127.0.0.2; the claimed ip=/ipv6= nowhere), v4 peers come back
    in `peers` and v6 peers in `peers6`, and the non-compact list holds both."""
    stack = stack6
    port = urlsplit(stack.cluster.tracker_url).port  # where the others reach the tracker: [::1]
    tracker = stack.start_tracker(listen=f"[::]:{port}")
    stack.start_origin()
    digest = image6.large_blobs(THRESHOLD)[0].digest
    # the origin seeds the blob once an admission asked for it; its announce URL is [::1]
    stack.admit(digest, repository="private/v6app")
    url6 = tracker_announce(stack, digest)
    assert url6.startswith("http://[::1]:")
    url4 = url6.replace("[::1]", "127.0.0.1")
    v4_port, v6_port = free_port("127.0.0.2"), free_port("::1")

    first = announce(url4, stack, digest, source="127.0.0.2", port=v4_port)
    # the origin seeder (::1, over IPv6) is the only other peer: in peers6, none in peers
    assert compact_peers(first.get(b"peers", b""), 6) == set()
    seeders6 = compact_peers(first[b"peers6"], 18)
    assert {ip for ip, _ in seeders6} == {"::1"}

    second = announce(url6, stack, digest, source="::1", port=v6_port)
    assert compact_peers(second[b"peers"], 6) == {("127.0.0.2", v4_port)}
    assert {ip for ip, _ in compact_peers(second[b"peers6"], 18)} == {"::1"}

    third = announce(url4, stack, digest, source="127.0.0.2", port=v4_port, compact=False)
    listed = third[b"peers"]
    assert isinstance(listed, list)
    entries = {(p[b"ip"], p[b"port"]) for p in listed if isinstance(p, dict)}
    assert (b"::1", v6_port) in entries and all(ip == b"::1" for ip, _ in entries), entries
    all_listed = announce(url6, stack, digest, source="::1", port=v6_port, compact=False)[b"peers"]
    assert isinstance(all_listed, list)
    ips = {p[b"ip"] for p in all_listed if isinstance(p, dict)}
    assert ips == {b"127.0.0.2", b"::1"}, ips  # never ::ffff:127.0.0.2, 203.0.113.9 or 2001:db8::9
    assert tracker.metric("shoal_tracker_announces_total", result="ok") >= 4
