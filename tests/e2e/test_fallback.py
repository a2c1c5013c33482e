"""When the swarm cannot deliver, the agent fetches from the registry itself, within a bound."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import Images
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.procs import http_get
from tests.support.registry import Registry
from tests.support.stack import Stack

THRESHOLD = 1 << 20
# The client must finish within this; the agent's own deadlines are 5 s here.
BOUND = 60


def test_tracker_stopped(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    assert stack.tracker is not None
    stack.tracker.stop()
    agent = stack.agents[0]
    before = registry.settle()
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    pulls = registry.settle()[len(before):]
    for blob in image.large_blobs(THRESHOLD):
        assert {p.actor for p in pulls if p.digest == blob.digest and p.method == "GET"} == {"node"}
    assert agent.metric("shoal_agent_fallbacks_total", reason="tracker_unreachable") == len(image.blobs)
    assert agent.metric("shoal_agent_downloads_total", source="origin", result="ok") == len(image.blobs)


def test_origin_stopped_before_seeding(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    assert stack.origin is not None
    stack.origin.stop()
    agent = stack.agents[0]
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    assert agent.metric("shoal_agent_fallbacks_total", reason="origin_unreachable") == len(
        image.large_blobs(THRESHOLD))


def test_seeder_killed_after_registering(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    """The tracker knows the torrents, but nobody seeds them: the agent joins an empty swarm,
    gives up after first_piece_timeout and fetches from the registry."""
    image = images.app()
    stack.start(agents=0)
    assert stack.origin is not None and stack.tracker is not None
    for blob in image.large_blobs(THRESHOLD):
        status, _ = _seed(stack.origin.url, registry.host, blob.digest)
        assert status == 200
    stack.origin.stop(kill=True)
    agent = stack.start_agent()
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    assert agent.metric("shoal_agent_fallbacks_total", reason="no_first_piece") == len(image.large_blobs(THRESHOLD))
    status, body = http_get(f"{stack.tracker.url}/v1/status")
    assert status == 200 and json.loads(body)["torrents"] == len(image.large_blobs(THRESHOLD))


def _seed(origin: str, ns: str, digest: str) -> tuple[int, bytes]:
    import urllib.request

    req = urllib.request.Request(f"{origin}/v1/blobs/{digest}/seed", method="POST",
                                 data=json.dumps({"ns": ns, "repository": "private/app"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return int(resp.status), resp.read()
