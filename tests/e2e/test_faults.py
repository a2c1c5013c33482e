"""Faults with real processes: a malicious peer, the tracker or a peer dying mid-swarm, a stalled
peer, corrupted cache files, a full disk, a registry answering 429/5xx, restarts while seeding, and
SIGKILL at random points. In every case: no client gets bytes that do not hash to the digest, no
client waits beyond the bound, the processes stay up, and the metrics count what happened."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from shoal import metainfo
from shoal.store import FREE_SPACE_RESERVE
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.evilpeer import EvilPeer
from tests.support.faults import CuttableProxy, FlakyRegistry
from tests.support.images import Blob
from tests.support.peerprobe import Identity, node_identity
from tests.support.procs import Component, free_port, http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

BOUND = 60  # seconds any client here may wait
MIB = 1 << 20


def fetch_blob(agent: Component, blob: Blob, *, timeout: float = BOUND) -> tuple[int, bytes]:
    url = f"http://{agent.config['listen']}/v2/private/app/blobs/{blob.digest}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def assert_blob(agent: Component, blob: Blob) -> None:
    started = time.monotonic()
    status, body = fetch_blob(agent, blob)
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    assert time.monotonic() - started < BOUND


def seed(stack: Stack, registry: Registry, blob: Blob) -> metainfo.Metainfo:
    return metainfo.parse(stack.admit(blob.digest)[0].metainfo)


def admitted(stack: Stack, node: str, blob: Blob) -> tuple[str, Identity]:
    """A swarm token and an identity (certificate and key) for a blob's swarm, as a node the
    origin admitted to it gets them."""
    admission, key = stack.admit(blob.digest, node=node)
    return admission.grant.token, node_identity(key, admission.grant.certificate)


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def big_blob(images: Images) -> Blob:
    return max(images.app().blobs.values(), key=lambda b: b.size)


def test_malicious_peer_is_detected_banned_and_the_blob_completes(stack: Stack, registry: Registry,
                                                                   images: Images) -> None:
    blob = big_blob(images)
    stack.start_tracker()
    stack.start_origin(torrent={"upload_rate_limit": "8MiB"})  # the honest seeder is slow
    meta = seed(stack, registry, blob)
    token, identity = admitted(stack, "evil", blob)
    evil = EvilPeer(meta, ip="127.0.0.9", port=free_port("127.0.0.9"), identity=identity)
    try:
        answer = evil.announce(meta.announce, token)
        assert b"failure" not in answer
        agent = stack.start_agent()
        assert_blob(agent, blob)
        assert evil.blocks_sent > 0  # it was asked, and it lied
        failures = agent.metric("shoal_agent_swarm_hash_failures_total")
        banned = agent.metric("shoal_agent_swarm_banned_peers_total")
        assert failures + banned > 0
        wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
                 what="the download to be recorded")
        assert agent.metric("shoal_agent_integrity_failures_total") == 0  # caught per piece, never whole
    finally:
        evil.close()


class Fetch(threading.Thread):
    """A blob GET in the background (status and body hash when it ends)."""

    def __init__(self, agent: Component, blob: Blob) -> None:
        super().__init__(daemon=True)
        self.agent, self.blob = agent, blob
        self.status = 0
        self.digest = ""
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.status, body = fetch_blob(self.agent, self.blob)
            self.digest = "sha256:" + hashlib.sha256(body).hexdigest()
        except (OSError, http.client.HTTPException):
            self.status = -1  # refused, or cut in the middle (IncompleteRead)
        self.seconds = time.monotonic() - started

    def check(self) -> None:
        self.join(BOUND + 5)
        assert not self.is_alive(), "the client waited beyond the bound"
        assert self.status == 200
        assert self.digest == self.blob.digest
        assert self.seconds < BOUND


def has_token(agent: Component) -> bool:
    return agent.metric("shoal_agent_swarm_token_expiry_timestamp_seconds") > 0


def in_flight(agent: Component) -> int:
    return int(api.status(agent.url)["downloads_in_flight"])


def test_tracker_killed_during_a_swarm(stack: Stack, registry: Registry, images: Images) -> None:
    blob = big_blob(images)
    tracker = stack.start_tracker()
    # (no first copy: the pieces must flow from the origin's seeder, a peer, when the tracker goes)
    stack.start_origin(torrent={"upload_rate_limit": "16MiB"}, first_copy=False)
    seed(stack, registry, blob)
    agent = stack.start_agent()
    fetch = Fetch(agent, blob)
    fetch.start()
    wait_for(lambda: agent.metric("shoal_agent_swarm_received_payload_bytes_total") > 4 * MIB,
             what="pieces flowing from the origin")
    tracker.stop(kill=True)
    fetch.check()
    assert agent.running()
    # the peers it had kept serving it: no fallback was needed
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1)
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1
    assert agent.metric("shoal_agent_swarm_download_bytes_total", peer="seeder") >= blob.size * 0.95
    # and the tracker really was gone while it did: its announces failed
    wait_for(lambda: agent.metric("shoal_agent_swarm_announce_failures_total") > 0, what="a failed announce")


@pytest.fixture
def two_nodes(stack: Stack, registry: Registry, images: Images) -> tuple[Component, Component, Blob]:
    """Node A has the big blob cached and seeds it; node B is about to pull it. The origin seeder
    is very slow (a 256 KiB piece takes it 4 s, longer than B's stall_timeout), so B gets nearly
    all of the blob from A, and nothing in time from the origin once A is gone."""
    blob = big_blob(images)
    stack.start_tracker()
    # (no first copy: at this pace its pieces, one every 4 s, would keep A from ever stalling)
    stack.start_origin(torrent={"upload_rate_limit": "64KiB"}, first_copy=False)
    seed(stack, registry, blob)
    # A gives up on the slow seeder at once, takes the blob from the registry and seeds it, at a
    # pace that leaves time to kill or stop it in the middle of B's download
    a = stack.start_agent(swarm={"first_piece_timeout": "1s"}, torrent={"upload_rate_limit": "16MiB"})
    assert_blob(a, blob)
    wait_for(lambda: a.metric("shoal_agent_downloads_total", result="ok") == 1)
    b = stack.start_agent(swarm={"stall_timeout": "2s"})
    return a, b, blob


def test_peer_killed_mid_transfer(two_nodes: tuple[Component, Component, Blob]) -> None:
    a, b, blob = two_nodes
    fetch = Fetch(b, blob)
    fetch.start()
    wait_for(lambda: in_flight(b) == 1, what="the download to start")
    wait_for(lambda: b.metric("shoal_agent_swarm_received_payload_bytes_total") > 4 * MIB,
             what="pieces flowing from A")  # (the slow origin seeder alone sends 64 KiB/s)
    a.stop(kill=True)
    fetch.check()
    assert b.running()
    wait_for(lambda: b.metric("shoal_agent_downloads_total", result="ok") == 1)
    assert b.metric("shoal_agent_fallbacks_total", reason="stalled") == 1  # then the registry


def test_stalled_peer(two_nodes: tuple[Component, Component, Blob]) -> None:
    a, b, blob = two_nodes
    fetch = Fetch(b, blob)
    fetch.start()
    wait_for(lambda: in_flight(b) == 1, what="the download to start")
    wait_for(lambda: b.metric("shoal_agent_swarm_received_payload_bytes_total") > 4 * MIB,
             what="pieces flowing from A")  # (the slow origin seeder alone sends 64 KiB/s)
    a.signal(signal.SIGSTOP)
    try:
        fetch.check()
    finally:
        a.signal(signal.SIGCONT)
    assert a.running()
    assert b.running()
    wait_for(lambda: b.metric("shoal_agent_downloads_total", result="ok") == 1)
    assert b.metric("shoal_agent_fallbacks_total", reason="stalled") == 1
    assert_blob(a, blob)  # A is fine once it runs again


def test_restart_while_seeding(stack: Stack, registry: Registry, images: Images) -> None:
    """A node seeds its cache again after a restart, once the origin renewed its grants; a new
    node (admitted by the origin, whose own seeder is all but silent) gets the blob from it."""
    blob = big_blob(images)
    stack.start_tracker()
    origin = stack.start_origin()
    a = stack.start_agent()
    assert_blob(a, blob)
    wait_for(lambda: a.metric("shoal_agent_downloads_total", result="ok") == 1)
    a.stop()
    origin.stop()
    origin.config["torrent"]["upload_rate_limit"] = "1KiB"  # from now on, A is the swarm's seeder
    origin.start()
    a.start()  # seeds its cache again, with renewed grants
    b = stack.start_agent()
    for node in (a, b):
        wait_for(functools.partial(has_token, node))
    assert_blob(b, blob)
    wait_for(lambda: b.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1)
    assert b.metric("shoal_agent_swarm_download_bytes_total", peer="agent") >= blob.size * 0.95


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_corrupted_cache_file_is_detected_evicted_and_fetched_again(stack: Stack, images: Images,
                                                                    damage: str) -> None:
    blob = big_blob(images)
    stack.start(agents=1)
    agent = stack.agents[0]
    assert_blob(agent, blob)
    path = stack.workdir / "agent0" / "cache" / "blobs" / "sha256" / blob.hex[:2] / blob.hex
    # in the cache, not only there: the client may have had every byte (a relay) before the
    # download was adopted, and a change before the adoption is caught there instead
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1)
    with open(path, "r+b") as f:
        if damage == "bit flip":
            f.seek(blob.size // 2)
            byte = f.read(1)
            f.seek(blob.size // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        else:
            f.truncate(blob.size // 3)
    assert_blob(agent, blob)  # never the damaged bytes: evicted, fetched again
    assert agent.metric("shoal_agent_cache_corrupt_blobs_total") == 1
    assert agent.metric("shoal_agent_cache_hits_total") == 0
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 2)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.hex


def test_scrubber_finds_silent_corruption(stack: Stack, images: Images) -> None:
    blob = big_blob(images)
    stack.start(agents=1, cache={"scrub_interval": "1s"})
    agent = stack.agents[0]
    assert_blob(agent, blob)
    path = stack.workdir / "agent0" / "cache" / "blobs" / "sha256" / blob.hex[:2] / blob.hex
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1)  # (adopted: see above)
    with open(path, "r+b") as f:
        f.write(b"\x00" * 16)
    wait_for(lambda: agent.metric("shoal_agent_cache_corrupt_blobs_total") == 1, what="the scrubber")
    assert not path.exists()
    assert_blob(agent, blob)


def partials(cache: Path) -> list[Path]:
    return list((cache / "downloads").iterdir())


def test_disk_full(stack: Stack, registry: Registry, images: Images) -> None:
    """The disk, not only the budget, limits the cache: a blob larger than the filesystem is refused
    at once; a blob that fits only if older ones go evicts them; a write that fails mid-download
    (the disk filled by someone else) ends the response short, keeps nothing partial, and the
    next try works. A registry-only agent behind a proxy that can hold a transfer in the middle."""
    image = images.app()
    big = big_blob(images)
    mid, small, *tiny = sorted((b for b in image.blobs.values() if b is not big), key=lambda b: -b.size)
    assert mid.size > 4 * MIB and small.size > MIB
    cache = stack.workdir / "agent0" / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(cache)], check=True)
    proxy = CuttableProxy("127.0.0.1", registry.port)
    filler = cache / "filler"
    try:
        agent = stack.start_agent(upstreams=[{**stack.upstream(stack.node_user, stack.node_password),
                                              "url": proxy.url}])
        # 1. larger than the whole filesystem: refused before a byte is written
        status, body = fetch_blob(agent, big)
        assert status == 503
        assert b"UNAVAILABLE" in body and b"disk space" in body
        assert agent.metric("shoal_agent_downloads_total", result="failed") == 1
        assert partials(cache) == []
        # 2. fits only if what is cached goes: the older blobs are evicted for it
        for blob in (small, *tiny):
            assert_blob(agent, blob)
        wait_for(lambda: agent.metric("shoal_agent_cache_blobs") == 1 + len(tiny))
        free = shutil.disk_usage(cache).free
        room = mid.size + FREE_SPACE_RESERVE - small.size // 2  # short of what `mid` needs by half of `small`
        assert free > room
        with open(filler, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * (free - room))
        assert_blob(agent, mid)
        assert agent.metric("shoal_agent_cache_evictions_total") >= 1
        assert not (cache / "blobs" / "sha256" / small.hex[:2] / small.hex).exists()
        filler.unlink()
        # 3. the disk fills up in the middle of a download
        proxy.hold_after(small.size // 4)
        fetch = Fetch(agent, small)
        fetch.start()
        wait_for(proxy.held, what="the transfer held in the middle")
        wait_for(lambda: any(p.stat().st_size > 0 for p in partials(cache)), what="a partial download")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], check=False, capture_output=True)
        assert shutil.disk_usage(cache).free < small.size
        proxy.release()
        fetch.join(BOUND + 5)
        assert not fetch.is_alive(), "the client waited beyond the bound"
        assert fetch.status != 200 or fetch.digest != small.digest  # a cut response, never a whole one
        wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="failed") == 2)
        assert "failed writing to disk" in agent.log()
        assert partials(cache) == [], "partial downloads left behind"
        assert agent.running()
        filler.unlink()
        for blob in image.blobs.values():  # room again: everything that fits works
            if blob is not big:
                assert_blob(agent, blob)
        for path in (cache / "blobs" / "sha256").rglob("*"):
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    finally:
        proxy.release()
        stack.close()
        proxy.cut()
        subprocess.run(["umount", "-l", str(cache)], check=False)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_registry_429_and_5xx(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    small = next(b for b in image.blobs.values() if b.size < MIB)
    flaky = FlakyRegistry(registry.host)
    try:
        stack.start_tracker()
        stack.start_origin()
        agent = stack.start_agent(upstreams=[{**stack.upstream(stack.node_user, stack.node_password),
                                              "url": flaky.url}])
        flaky.fail_next(2, 429, {"Retry-After": "1"})
        assert_blob(agent, small)  # retried after the registry's Retry-After
        assert agent.metric("shoal_agent_registry_retries_total") >= 2
        flaky.fail_next(100, 503)  # the registry is broken for longer than the retry budget
        started = time.monotonic()
        status, _ = fetch_blob(agent, next(b for b in image.blobs.values() if b is not small))
        assert status == 503
        assert time.monotonic() - started < 20
        flaky.fail_next(3, 429, {"Retry-After": "120"})  # too long to wait: the client is told
        answer = http_get(f"http://{agent.config['listen']}/v2/private/app/manifests/v1",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert answer[0] == 429
        assert agent.running()
    finally:
        flaky.close()


KILL_ROUNDS = int(os.environ.get("SHOAL_KILL_ROUNDS", "4"))


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_sigkill_at_random_points(stack: Stack, images: Images) -> None:
    """Repeatedly: clients pulling, the agent killed with SIGKILL at a random moment, restarted.
    Afterwards every cached blob hashes to its digest, every complete response was right, and
    every response that started (a status line reached the client) is in the collected journal.
    SHOAL_KILL_ROUNDS sets the number of rounds (4 here; 50 or more for a long run)."""
    image = images.app()
    blobs = list(image.blobs.values())
    stack.start(agents=1)
    agent = stack.agents[0]
    rng = random.Random(7)
    started_requests: set[str] = set()
    for round_no in range(KILL_ROUNDS):
        cache = stack.workdir / "agent0" / "cache"
        results: list[tuple[str, int, int | None, bytes, Blob]] = []

        def pull(ua: str, blob: Blob, results: list[tuple[str, int, int | None, bytes, Blob]] = results) -> None:
            host, port = agent.config["listen"].rsplit(":", 1)
            try:
                sock = socket.create_connection((host, int(port)), timeout=BOUND)
                sock.sendall(f"GET /v2/private/app/blobs/{blob.digest} HTTP/1.1\r\nHost: x\r\n"
                             f"User-Agent: {ua}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                with sock:
                    while chunk := sock.recv(1 << 20):
                        data += chunk
            except OSError:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 "):
                results.append((ua, int(head[9:12]), content_length(head), body, blob))

        threads = [threading.Thread(target=pull, args=(f"killtest-{round_no}-{i}", rng.choice(blobs)),
                                    daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 1.5))
        agent.stop(kill=True)
        for t in threads:
            t.join(BOUND)
            assert not t.is_alive()
        for ua, status, length, body, blob in results:
            started_requests.add(ua)
            if status == 200:
                # a response cut by the kill is short; a complete one is exactly the blob
                assert length == blob.size
                assert len(body) <= length
                if len(body) == length:
                    assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest, "a complete wrong body"
            elif status == 206:
                raise AssertionError("no Range was asked for")
        for path in (cache / "blobs" / "sha256").rglob("*"):
            if path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, "a cached blob is damaged"
        agent.start()
        for blob in rng.sample(blobs, 2):  # what the restarted agent serves is whole
            assert_blob(agent, blob)
    assert started_requests, "no response ever started: the kills came too early to test anything"
    events = []
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        assert stack.origin is not None
        events = api.audit_events(stack.origin.url, stack.operator_token)
        if started_requests <= {e["user_agent"] for e in events}:
            break
        time.sleep(0.5)
    journaled = {e["user_agent"] for e in events}
    assert started_requests <= journaled, f"responses missing from the journal: {started_requests - journaled}"
    # Exactly once: every request is one event, however often its records were shipped again
    # after a kill (a record re-sent under a new event id would show up twice here).
    per_request = collections.Counter(e["user_agent"] for e in events if e["user_agent"] in started_requests)
    assert set(per_request.values()) == {1}, f"requests journaled more than once: {per_request.most_common(3)}"


def test_tracker_restarted_without_persistence(stack: Stack, registry: Registry, images: Images) -> None:
    blob = big_blob(images)
    tracker = stack.start_tracker()  # in memory: a restart forgets every registration
    stack.start_origin()
    seed(stack, registry, blob)
    tracker.stop()
    tracker.start()
    agent = stack.start_agent()
    assert_blob(agent, blob)
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1)
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1  # no fallback
    assert agent.metric("shoal_agent_fallbacks_total") == 0


def test_journal_cannot_be_written(stack: Stack, images: Images) -> None:
    """No response without its journal record: with the journal's disk full, the agent answers 503."""
    image = images.app()
    journal = stack.workdir / "agent0" / "journal"
    journal.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(journal)], check=True)
    try:
        stack.start(agents=1)
        agent = stack.agents[0]
        small = next(b for b in image.blobs.values() if b.size < MIB)
        assert_blob(agent, small)
        filler = journal / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1000"], capture_output=True)
        # the segment's last page may still take a few records; then the disk is really full
        answers = [fetch_blob(agent, small) for _ in range(40)]
        refused = [body for status, body in answers if status == 503]
        assert refused, "the agent kept serving without journaling"
        assert all(b"journal" in body for body in refused)
        first = next(i for i, (status, _) in enumerate(answers) if status == 503)
        assert all(status == 503 for status, _ in answers[first:])  # never again unrecorded
        assert all("sha256:" + hashlib.sha256(body).hexdigest() == small.digest
                   for status, body in answers if status == 200)
        assert agent.running()
        filler.unlink()
        assert_blob(agent, small)
    finally:
        stack.close()
        subprocess.run(["umount", "-l", str(journal)], check=False)
