"""The node cache: a second pull asks the registry for manifests only, a killed and restarted
agent still serves its cache, and eviction never breaks a pull in progress."""

from __future__ import annotations

import hashlib
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.e2e.conftest import Images
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.procs import wait_for
from tests.support.registry import Pull, Registry
from tests.support.stack import Stack

MIB = 1 << 20


def only_manifests(pulls: list[Pull]) -> bool:
    return bool(pulls) and all("manifest" in p.media_type or "index" in p.media_type for p in pulls)


def test_second_pull_and_restart_use_the_cache(stack: Stack, registry: Registry, images: Images,
                                               workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    agent = stack.agents[0]
    source = f"{agent.config['listen']}/private/app:v1"
    skopeo_copy(source, workdir / "first")
    verify_dir(workdir / "first", image)

    before = registry.settle()
    skopeo_copy(source, workdir / "second")
    verify_dir(workdir / "second", image)
    second = registry.settle()[len(before):]
    assert only_manifests(second), [(p.method, p.media_type, p.digest) for p in second]
    assert agent.metric("shoal_agent_cache_hits_total") == len(image.blobs)

    # SIGKILL, then start again on the same data directory
    agent.stop(kill=True)
    agent.start()
    before = registry.settle()
    skopeo_copy(source, workdir / "third")
    verify_dir(workdir / "third", image)
    third = registry.settle()[len(before):]
    assert only_manifests(third), [(p.method, p.media_type, p.digest) for p in third]
    assert agent.metric("shoal_agent_cache_hits_total") == len(image.blobs)
    assert agent.metric("shoal_agent_cache_blobs") == len(image.blobs)


class SlowReader(threading.Thread):
    """Reads a blob from the agent slowly, keeping the response (and its pin) open."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.digest = ""
        self.started_reading = threading.Event()
        self.go_on = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            with urllib.request.urlopen(self.url, timeout=120) as resp:
                h.update(resp.read(MIB))
                self.started_reading.set()
                self.go_on.wait(120)
                while chunk := resp.read(MIB):
                    h.update(chunk)
                    time.sleep(0.001)
            self.digest = "sha256:" + h.hexdigest()
        except BaseException as exc:
            self.error = exc
            self.started_reading.set()


def test_eviction_keeps_blobs_in_use(stack: Stack, images: Images, workdir: Path) -> None:
    a = images.get("private/evict-a", layers=[30 * MIB, 5 * MIB, 100_000], seed=21)
    b = images.get("private/evict-b", layers=[30 * MIB, 5 * MIB, 100_000], seed=22)
    budget = 50 * MIB  # less than the two images together
    assert a.total_blob_bytes < budget < a.total_blob_bytes + b.total_blob_bytes
    stack.start(agents=1, cache={"max_bytes": budget})
    agent = stack.agents[0]
    listen = agent.config["listen"]
    skopeo_copy(f"{listen}/private/evict-a:v1", workdir / "a")
    verify_dir(workdir / "a", a)

    big_a = max(a.blobs.values(), key=lambda blob: blob.size)
    reader = SlowReader(f"http://{listen}/v2/private/evict-a/blobs/{big_a.digest}")
    reader.start()
    assert reader.started_reading.wait(30) and reader.error is None
    # Pulling b needs room: a's blobs not in use go, and the one being read stays (it is in use,
    # so the most recently used of all); to hold the budget, b's own older blobs may go too.
    skopeo_copy(f"{listen}/private/evict-b:v1", workdir / "b")
    verify_dir(workdir / "b", b)
    assert agent.metric("shoal_agent_cache_evictions_total") >= 1
    blob_path = Path(stack.workdir / "agent0" / "cache" / "blobs" / "sha256" / big_a.hex[:2] / big_a.hex)
    assert blob_path.exists(), "the blob being served was evicted"
    wait_for(lambda: agent.metric("shoal_agent_cache_bytes") <= budget, timeout=10,
             what="the cache back within budget while a blob is in use")
    reader.go_on.set()
    reader.join(60)
    assert reader.error is None and reader.digest == big_a.digest
    assert agent.metric("shoal_agent_cache_bytes") <= budget
    assert agent.metric("shoal_agent_cache_in_use_bytes") == 0
    # whatever was evicted comes back whole
    skopeo_copy(f"{listen}/private/evict-b:v1", workdir / "b2")
    verify_dir(workdir / "b2", b)
    wait_for(lambda: agent.metric("shoal_agent_cache_bytes") <= budget, timeout=10, what="the budget held")


def test_concurrent_clients_share_one_download(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    big = max(image.blobs.values(), key=lambda blob: blob.size)
    stack.start(agents=1)
    agent = stack.agents[0]
    url = f"http://{agent.config['listen']}/v2/private/app/blobs/{big.digest}"
    before = registry.settle()

    def get(_: int) -> str:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return "sha256:" + hashlib.sha256(resp.read()).hexdigest()

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(get, range(6))) == [big.digest] * 6
    # a client may have every byte (relayed, digest checked) before the download is adopted
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") >= 1, what="the download adopted")
    assert agent.metric("shoal_agent_downloads_total", result="ok") == 1
    assert agent.metric("shoal_agent_cache_misses_total") + agent.metric("shoal_agent_cache_hits_total") == 6
    gets = registry.blob_gets(registry.settle()[len(before):])
    assert gets.get(big.digest) == 1  # once, to the origin seeder
    # one whole-blob hash for the node, whoever read what (not one per client plus the cache's)
    assert agent.metric("shoal_agent_blob_hash_bytes_total", by="download") == big.size
