"""`shoal seed` pre-seeds images at the origin; afterwards a fresh agent's pull asks the
registry for nothing but manifests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shoal import protocol
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.images import Image
from tests.support.procs import ROOT, http_get
from tests.support.registry import Registry
from tests.support.stack import Stack


def shoal_seed(stack: Stack, origin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", "seed", "--origin", origin,
                           "--token-file", str(stack.keys["operator_token"]), *args],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)


def platform_blobs(image: Image, platform: str) -> set[str]:
    doc = json.loads(image.manifests[image.platforms[platform]])
    return {doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])}


def test_seed_then_pull_fetches_only_manifests(stack: Stack, registry: Registry, images: Images,
                                               workdir: Path) -> None:
    image = images.multi()
    stack.start(agents=0)
    assert stack.origin is not None
    result = shoal_seed(stack, stack.origin.url, f"{registry.host}/private/multi:v1")
    assert result.returncode == 0, result.stderr
    assert f"done: {len(image.blobs)} blobs" in result.stdout
    assert "blobs," in result.stdout  # the progress display
    assert api.seeded(stack.origin.url, stack.operator_token) == set(image.blobs)
    # without a credential: counts, and nothing that names a blob
    status, body = http_get(protocol.STATUS.url(stack.origin.url))
    assert status == 200 and json.loads(body)["seeding"] == len(image.blobs)
    assert b"sha256:" not in body and not any(b.split(":")[1].encode() in body for b in image.blobs)
    assert http_get(protocol.SEEDED.url(stack.origin.url))[0] == 401

    agent = stack.start_agent()
    before = registry.settle()
    skopeo_copy(f"{agent.config['listen']}/private/multi:v1", workdir / "copy")
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    pulls = registry.settle()[len(before):]
    # no blob bytes from the registry: manifests, and the authorization HEAD per blob
    assert registry.blob_gets(pulls) == {}
    blob_events = [p for p in pulls if "manifest" not in p.media_type and "index" not in p.media_type]
    assert {(p.method, p.actor) for p in blob_events} == {("HEAD", "node")}
    assert {p.digest for p in blob_events} == set(image.blobs)
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(image.blobs)


def test_seed_one_platform_by_digest(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.multi()
    stack.start(agents=0)
    assert stack.origin is not None
    result = shoal_seed(stack, stack.origin.url, "--platform", "linux/arm64",
                        f"{registry.host}/private/multi@{image.digest}")
    assert result.returncode == 0, result.stderr
    assert api.seeded(stack.origin.url, stack.operator_token) == platform_blobs(image, "linux/arm64")
    assert platform_blobs(image, "linux/arm64") != set(image.blobs)


def test_a_platform_that_a_single_platform_image_is_not_is_refused(stack: Stack, registry: Registry,
                                                                    images: Images) -> None:
    """--platform on an image that is no index: its config says its platform; another one is an
    error naming both, and nothing is seeded (it was seeded whole without a word)."""
    image = images.app()  # linux/amd64 (tests/support/images.py)
    stack.start(agents=0)
    assert stack.origin is not None
    ref = f"{registry.host}/private/app:v1"
    refused = shoal_seed(stack, stack.origin.url, "--platform", "linux/arm64", ref)
    assert refused.returncode != 0
    assert "a single-platform image (linux/amd64), not linux/arm64" in refused.stdout + refused.stderr
    assert api.seeded(stack.origin.url, stack.operator_token) == set()
    taken = shoal_seed(stack, stack.origin.url, "--platform", "linux/amd64", ref)
    assert taken.returncode == 0, taken.stderr
    assert api.seeded(stack.origin.url, stack.operator_token) == {b for b in image.blobs if image.blobs[b].size}


def test_seed_reports_errors(stack: Stack, registry: Registry, images: Images) -> None:
    images.multi()
    stack.start(agents=0)
    assert stack.origin is not None
    missing = shoal_seed(stack, stack.origin.url, f"{registry.host}/private/multi:nosuchtag")
    assert missing.returncode == 1
    assert "manifest unknown" in missing.stdout + missing.stderr
    foreign = shoal_seed(stack, stack.origin.url, "elsewhere.example.com/app:v1")
    assert foreign.returncode == 1
    assert "not an upstream of this origin" in foreign.stderr
    bad = shoal_seed(stack, stack.origin.url, "not a reference")
    assert bad.returncode == 1
    unreachable = shoal_seed(stack, "http://127.0.0.1:9", f"{registry.host}/private/multi:v1")
    assert unreachable.returncode == 1
    assert "cannot reach the origin" in unreachable.stderr
