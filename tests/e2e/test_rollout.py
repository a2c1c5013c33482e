"""Four agents on four loopback addresses pull one image at once: every blob verified, each large
blob left the registry once (to the origin seeder), and agents traded pieces with each other."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.conftest import Images
from tests.support.clients import skopeo_copy, verify_dir
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
    # per-peer accounting is sampled at each piece, so allow a little slack
    assert from_agents + from_seeder >= 4 * large * 0.95
    for a in agents:
        assert a.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(image.large_blobs(THRESHOLD))
        assert a.metric("shoal_agent_fallbacks_total") == 0
        assert a.metric("shoal_agent_served_bytes_total", source="peers") >= large
