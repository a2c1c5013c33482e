"""Three origins, replication 2 (shoal/rendezvous.py, origin/replicas.py): the owner of a layer
killed before or during a rollout, the layer still arrives from the swarm (the other owner seeds
it), the registry sends it at most twice, and pre-seeded images stay seeded."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest

from shoal import bencode, metainfo, protocol, rendezvous
from tests.e2e.conftest import USERS, Images
from tests.support import api
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.images import Blob, Image
from tests.support.procs import ROOT, Component, http_get, wait_for
from tests.support.registry import Pull, Registry
from tests.support.stack import Stack

MIB = 1 << 20
THRESHOLD = 1 << 20


@pytest.fixture
def trio(tmp_path: Path, registry: Registry) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", registry, node_user=("node", USERS["node"]), seeder_user=("seeder", USERS["seeder"]),
              origins=3, origin_replication=2)
    s.start_tracker()
    for i in range(3):
        # capped as a real origin's NIC is: a rollout takes long enough to kill an owner during it
        s.start_origin(i, torrent={"upload_rate_limit": "8MiB"})
    yield s
    s.close()


def biggest(image: Image) -> Blob:
    return max(image.blobs.values(), key=lambda b: b.size)


def owners(stack: Stack, blob: Blob) -> list[Component]:
    return [stack.origins[name] for name in rendezvous.owners(stack.origin_names, blob.hex, 2)]


def pull_all(agents: list[Component], repo: str, image: Image, workdir: Path, tag: str) -> None:
    def pull(agent: Component) -> int:
        dest = workdir / f"{tag}-{agent.name}"
        skopeo_copy(f"{agent.config['listen']}/{repo}:v1", dest)
        return verify_dir(dest, image)  # every blob hashed against its digest

    with ThreadPoolExecutor(len(agents)) as pool:
        assert list(pool.map(pull, agents)) == [len(image.blobs)] * len(agents)


def assert_from_the_swarm(stack: Stack, agents: list[Component], image: Image) -> None:
    """Every large blob came from peers, none from the registry; the journal (at whichever origin
    each node shipped it: the killed one, started again, holds what it took before it died) says
    `peers` for the biggest layer."""
    large = len(image.large_blobs(THRESHOLD))
    for origin in stack.origins.values():
        if not origin.running():
            origin.start()
    live = list(stack.origins.values())
    for agent in agents:
        assert agent.metric("shoal_agent_fallbacks_total") == 0, agent.log()[-3000:]
        assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == large

        def shipped(agent: Component = agent) -> bool:
            # (a record's start and end phases may reach different collectors when the node's
            # own one dies in between; with separate audit stores each keeps what it got)
            events = [e for o in live for e in api.audit_events(o.url, stack.operator_token,
                                                                node=str(agent.config["node"]))]
            layer = [e for e in events if e.get("digest") == biggest(image).digest and e.get("kind") == "blobs"]
            assert all(e["source"] == "peers" for e in layer), layer
            return bool(layer)

        wait_for(shipped, timeout=30, what=f"{agent.name}'s journal")


def info_hash(stack: Stack, origin: Component, blob: Blob) -> bytes:
    return metainfo.parse((stack.workdir / origin.name / "meta" / f"{blob.hex}.torrent").read_bytes()).info_hash


def seeders(stack: Stack, info_hash: bytes) -> int:
    """How many seeders the tracker lists for a torrent (BEP 48 scrape, with the node token)."""
    assert stack.tracker is not None
    tracker_hash = info_hash[:20]
    status, body = http_get(protocol.SCRAPE.url(stack.tracker.url) + f"?info_hash={quote_from_bytes(tracker_hash)}",
                            headers={"Authorization": f"Bearer {stack.node_token}"})
    doc = bencode.decode(body)
    assert status == 200 and isinstance(doc, dict)
    files = doc[b"files"]
    assert isinstance(files, dict)
    entry = files.get(tracker_hash, {})
    assert isinstance(entry, dict)
    complete = entry.get(b"complete", 0)
    assert isinstance(complete, int)
    return complete


def egress(pulls: list[Pull], registry: Registry) -> dict[str, int]:
    return registry.blob_gets(pulls)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_owner_killed_before_the_rollout(trio: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    repo = "private/owners-before"
    image = images.get(repo, layers=[24 * MIB + 11, 6 * MIB, 200_000], seed=151)
    layer = biggest(image)
    first, second = owners(trio, layer)
    first.stop(kill=True)
    agents = [trio.start_agent() for _ in range(3)]
    before = registry.settle()
    pull_all(agents, repo, image, workdir, "before")
    pulls = registry.settle()[len(before):]
    gets = egress(pulls, registry)
    # the second owner fetched the layer once; the dead first owner could not be asked to
    assert gets.get(layer.digest) == 1, gets
    for blob in image.large_blobs(THRESHOLD):
        assert gets.get(blob.digest, 0) <= 2, (blob.digest, gets)
    assert layer.digest in api.seeded(second.url, trio.operator_token)
    assert_from_the_swarm(trio, agents, image)
    assert sum(a.metric("shoal_agent_origin_failovers_total") for a in agents) >= len(agents)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_owner_killed_during_the_rollout(trio: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    repo = "private/owners-during"
    image = images.get(repo, layers=[24 * MIB + 13, 200_000], seed=152)
    layer = biggest(image)
    first, second = owners(trio, layer)
    before = registry.settle()
    # the first node: the first owner admits it and has the second owner seed the layer too
    pioneer = trio.start_agent()
    pull_all([pioneer], repo, image, workdir, "pioneer")
    wait_for(lambda: layer.digest in api.seeded(second.url, trio.operator_token), timeout=60,
             what="the second owner seeds the layer")
    pioneer.stop()  # the owners are the only seeders left
    agents = [trio.start_agent(extra_n) for extra_n in range(1, 4)]
    with ThreadPoolExecutor(1) as pool:
        rollout = pool.submit(pull_all, agents, repo, image, workdir, "during")
        # kill the first owner once the layer is on its way to the nodes
        wait_for(lambda: rollout.done() or sum(a.metric("shoal_agent_swarm_download_bytes_total")
                                               for a in agents) > 0, timeout=60, what="the rollout under way")
        first.stop(kill=True)
        rollout.result(timeout=180)
    # a node that joins after the owner died is admitted by the other owner, to its swarm
    latecomer = trio.start_agent(4)
    pull_all([latecomer], repo, image, workdir, "late")
    assert latecomer.metric("shoal_agent_origin_failovers_total") >= 1
    agents.append(latecomer)
    pulls = registry.settle()[len(before):]
    gets = egress(pulls, registry)
    assert gets.get(layer.digest, 0) <= 2, gets  # one fetch per owner, never by a node
    assert {p.actor for p in pulls if p.digest == layer.digest and p.method == "GET"} == {"seeder"}
    assert_from_the_swarm(trio, agents, image)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_preseeded_images_stay_seeded_when_an_owner_dies(trio: Stack, registry: Registry, images: Images,
                                                         workdir: Path) -> None:
    repo = "private/owners-seeded"
    image = images.get(repo, layers=[12 * MIB + 17, 3 * MIB, 200_000], seed=153)
    layer = biggest(image)
    first, second = owners(trio, layer)
    # submitted at the origin that owns the layer least (a job is carried out by each blob's owners)
    elsewhere = next(o for o in trio.origins.values() if o not in (first, second))
    before = registry.settle()
    # `shoal seed` given an origin that is down first: the next one takes the job and reports it
    seeded = subprocess.run([sys.executable, "-m", "shoal.cli", "seed", "--origin", "http://127.0.0.1:9",
                             "--origin", elsewhere.url, "--token-file", str(trio.keys["operator_token"]),
                             f"{registry.host}/{repo}:v1"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert seeded.returncode == 0, seeded.stderr
    assert "http://127.0.0.1:9: " in seeded.stderr and f"trying {elsewhere.url}" in seeded.stderr
    assert f"done: {len(image.blobs)} blobs" in seeded.stdout
    for digest in image.blobs:
        names = rendezvous.owners(trio.origin_names, digest.split(":")[1], 2)
        for name, origin in trio.origins.items():
            assert (digest in api.seeded(origin.url, trio.operator_token)) == (name in names), (digest, name)
    gets = egress(registry.settle()[len(before):], registry)
    assert gets == dict.fromkeys(image.blobs, 2), gets  # each owner fetched each of its blobs once
    # both owners registered each blob's torrent (the same one: registered once at the tracker)
    # and seed it in one swarm
    assert trio.tracker is not None
    assert trio.tracker.metric("shoal_tracker_torrents") == len(image.blobs)
    assert info_hash(trio, first, layer) == info_hash(trio, second, layer)
    wait_for(lambda: seeders(trio, info_hash(trio, first, layer)) == 2, timeout=30, what="both owners listed")

    first.stop(kill=True)
    agent = trio.start_agent()
    before = registry.settle()
    skopeo_copy(f"{agent.config['listen']}/{repo}:v1", workdir / "copy")
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    pulls = registry.settle()[len(before):]
    assert registry.blob_gets(pulls) == {}  # manifests and authorization HEADs only
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(image.blobs)
    assert agent.metric("shoal_agent_fallbacks_total") == 0
