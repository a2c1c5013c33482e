"""Four agents on four loopback addresses pull one image at once: every blob verified, each large
blob left the registry once (to the origin seeder), and agents traded pieces with each other. A
node pulling long after the first still finds every seeder listed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest

from shoal import announcing, bencode, metainfo, protocol
from tests.e2e.conftest import Images
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.procs import http_get
from tests.support.registry import Registry
from tests.support.stack import Stack

THRESHOLD = 1 << 20


def test_four_agents_pull_at_once(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    image = images.app()
    stack.start_tracker()
    # The seeder's upload is capped (as a real origin's NIC is), so the agents must also fetch
    # from each other to finish: the test proves peer-to-peer transfer, not just fan-out.
    stack.start_origin(torrent={"upload_rate_limit": "24MiB"})
    agents = [stack.start_agent() for _ in range(4)]
    assert len({a.config["listen"].split(":")[0] for a in agents}) == 4
    before = registry.settle()

    def pull(n: int) -> int:
        dest = workdir / f"copy{n}"
        skopeo_copy(f"{agents[n].config['listen']}/private/app:v1", dest)
        return verify_dir(dest, image)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(pull, range(4))) == [len(image.blobs)] * 4

    pulls = registry.settle()[len(before):]
    gets = registry.blob_gets(pulls)
    for blob in image.large_blobs(THRESHOLD):
        assert gets.get(blob.digest) == 1, f"{blob.digest} left the registry {gets.get(blob.digest)} times"
        who = {p.actor for p in pulls if p.digest == blob.digest and p.method == "GET"}
        assert who == {"seeder"}
    for blob in image.blobs.values():
        if blob.size < THRESHOLD:  # small blobs go straight to the registry, once per node at most
            assert gets.get(blob.digest, 0) <= 4
    from_agents = sum(a.metric("shoal_agent_swarm_download_bytes_total", peer="agent") for a in agents)
    from_seeder = sum(a.metric("shoal_agent_swarm_download_bytes_total", peer="seeder") for a in agents)
    large = sum(b.size for b in image.large_blobs(THRESHOLD))
    assert from_agents > 0, "no bytes moved between agents"
    # per-peer accounting is sampled at each piece, so allow a little slack; the first node to ask
    # for a blob has a head start relayed by the origin while it fetches it (origin/relay.py),
    # and every piece leaves the origin once more as a first copy (origin/firstcopy.py)
    relayed = sum(a.metric("shoal_agent_relay_bytes_total") for a in agents)
    first_copies = sum(a.metric("shoal_agent_first_copy_bytes_total") for a in agents)
    # (at most once each: the first node's relay may have brought it a blob whole, on loopback,
    # and the others all of it from that node before the round ended)
    assert first_copies <= large
    assert from_agents + from_seeder + relayed + first_copies >= 4 * large * 0.95
    for a in agents:
        assert a.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(image.large_blobs(THRESHOLD))
        assert a.metric("shoal_agent_fallbacks_total") == 0
        assert a.metric("shoal_agent_served_bytes_total", source="peers") >= large


def seeders(stack: Stack, digest: str) -> int:
    """How many seeders the tracker lists for a blob's torrent right now (BEP 48 scrape)."""
    assert stack.tracker is not None
    # (the torrent as the origin keeps it: asking for an admission would be a registry request)
    info_hash = metainfo.parse((stack.workdir / "origin" / "meta" / f"{digest.removeprefix('sha256:')}.torrent")
                               .read_bytes()).tracker_hash
    status, body = http_get(protocol.SCRAPE.url(stack.tracker.url) + f"?info_hash={quote_from_bytes(info_hash)}",
                            headers={"Authorization": f"Bearer {stack.node_token}"})
    doc = bencode.decode(body)
    assert status == 200 and isinstance(doc, dict)
    files = doc[b"files"]
    assert isinstance(files, dict)
    entry = files[info_hash]
    assert isinstance(entry, dict)
    complete = entry[b"complete"]
    assert isinstance(complete, int)
    return complete


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_seeders_stay_listed_long_after_a_pull(stack: Stack, registry: Registry, images: Images,
                                               workdir: Path) -> None:
    """A node pulling long after another (or after `shoal seed`) still gets every large blob from
    the swarm: the origin and the first node keep announcing at the tracker's interval, so the
    tracker never forgets them (with libtorrent's 300 s announce floor it did after peer_ttl)."""
    image = images.app()
    interval = 2
    ttl = announcing.default_peer_ttl(interval)
    stack.start_tracker(interval=f"{interval}s")
    stack.start_origin()
    first = stack.start_agent()
    skopeo_copy(f"{first.config['listen']}/private/app:v1", workdir / "first")
    verify_dir(workdir / "first", image)
    large = image.large_blobs(THRESHOLD)
    pulled = time.monotonic()
    # wait out the peer TTL (and then some); both seeders stay listed the whole time
    while time.monotonic() - pulled < ttl + 2 * interval:
        for blob in large:
            assert seeders(stack, blob.digest) == 2, f"a seeder of {blob.digest} dropped out of the tracker"
        time.sleep(0.5)
    assert stack.tracker is not None
    assert stack.tracker.metric("shoal_tracker_torrents_without_seeders") == 0
    before = registry.settle()
    second = stack.start_agent()
    skopeo_copy(f"{second.config['listen']}/private/app:v1", workdir / "second")
    verify_dir(workdir / "second", image)
    gets = registry.blob_gets(registry.settle()[len(before):])
    assert all(gets.get(b.digest, 0) == 0 for b in large), gets  # no large blob from the registry
    assert second.metric("shoal_agent_fallbacks_total") == 0
    assert second.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(large)
