"""When the swarm cannot deliver, the agent fetches from the registry itself, within a bound."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from pathlib import Path

import pytest

from shoal import protocol
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.faults import CuttableProxy
from tests.support.procs import http_get
from tests.support.registry import Registry
from tests.support.stack import Stack

THRESHOLD = 1 << 20
# The client must finish within this; the agent's own deadlines are 5 s here.
BOUND = 60


def test_tracker_stopped(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    image = images.app()
    # seeded while the tracker ran (a cold blob would come whole or in part from the origin's relay,
    # as the origin fetches it: origin/relay.py), and no first copy (origin/firstcopy.py: a lone
    # node takes every piece of it from the origin, tracker or not): the swarm is the only path
    stack.start_tracker()
    stack.start_origin(first_copy=False)
    stack.start_agent()
    assert stack.tracker is not None
    for blob in image.large_blobs(THRESHOLD):
        _seed(stack, blob.digest)
    stack.tracker.stop()
    agent = stack.agents[0]
    before = registry.settle()
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    pulls = registry.settle()[len(before):]
    for blob in image.large_blobs(THRESHOLD):
        # the origin admitted the node; the node, finding no tracker to learn of peers from,
        # fetched it at once
        assert {p.actor for p in pulls if p.digest == blob.digest and p.method == "GET"} == {"node"}
    assert agent.metric("shoal_agent_fallbacks_total", reason="tracker_unreachable") == len(
        image.large_blobs(THRESHOLD))
    assert agent.metric("shoal_agent_fallbacks_total", reason="no_first_piece") == 0
    assert agent.metric("shoal_agent_downloads_total", source="registry", result="ok") == len(image.blobs)
    # the journal says why, and the origin's status page counts it (one response per large blob)
    large = {b.digest for b in image.large_blobs(THRESHOLD)}
    events = stack.journal(agent, minimum=len(image.blobs))
    assert {e["digest"]: e["fallback"] for e in events
            if e["digest"] in large and e["kind"] == "blobs" and e["method"] == "GET"} == \
        dict.fromkeys(large, "tracker_unreachable")
    assert all(e["fallback"] is None for e in events if e["digest"] not in large)
    assert stack.origin is not None
    status, body = http_get(stack.origin.url + protocol.PAGE_OVERVIEW.path(),
                            headers={"Authorization": f"Bearer {stack.operator_token}"})
    assert status == 200
    assert json.loads(body)["fallbacks"] == {"tracker_unreachable": len(large)}


def test_origin_stopped_before_seeding(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    assert stack.origin is not None
    stack.origin.stop()
    agent = stack.agents[0]
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    # every blob asks for an admission (small ones: in case the origin seeds them)
    assert agent.metric("shoal_agent_fallbacks_total", reason="origin_unreachable") == len(image.blobs)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_a_swarm_that_delivers_nothing(stack: Stack, registry: Registry, images: Images, workdir: Path) -> None:
    """The origin admits the node and the tracker lists the seeder, which sends (almost) nothing:
    the agent gives up after first_piece_timeout and fetches from the registry."""
    image = images.app()
    stack.start_tracker()
    # first copies off: their pace lets a one-piece blob's first piece out at once (the seeder's
    # path is the one under test)
    stack.start_origin(torrent={"upload_rate_limit": "1KiB"}, first_copy=False)
    assert stack.origin is not None and stack.tracker is not None
    for blob in image.large_blobs(THRESHOLD):
        _seed(stack, blob.digest)
    agent = stack.start_agent()
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "copy", timeout=BOUND)
    assert verify_dir(workdir / "copy", image) == len(image.blobs)
    assert agent.metric("shoal_agent_fallbacks_total", reason="no_first_piece") == len(image.large_blobs(THRESHOLD))
    assert agent.metric("shoal_agent_fallbacks_total") == len(image.large_blobs(THRESHOLD))  # small ones: unseeded
    assert api.status(stack.tracker.url)["torrents"] == len(image.large_blobs(THRESHOLD))


def _seed(stack: Stack, digest: str) -> None:
    stack.admit(digest)  # ApiError unless admitted, and so seeded


def test_failure_mid_response_cuts_the_connection(stack: Stack, registry: Registry, images: Images) -> None:
    """Seeder killed and registry unreachable while a blob streams: the client gets a short,
    correct prefix and a cut connection, never a complete (or padded) body."""
    image = images.app()
    big = max(image.blobs.values(), key=lambda b: b.size)
    proxy = CuttableProxy("127.0.0.1", registry.port)  # the agent's only way to the registry
    stack.start_tracker()
    origin = stack.start_origin(torrent={"upload_rate_limit": "4MiB"})
    _seed(stack, big.digest)
    upstream = {**stack.upstream(stack.node_user, stack.node_password), "url": proxy.url}
    agent = stack.start_agent(upstreams=[upstream], swarm={"stall_timeout": "2s"})
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"GET /v2/private/app/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = bytearray()
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    data = bytearray(body)
    while len(data) < 1 << 20:  # the first piece arrived: now take the swarm and the registry away
        data += sock.recv(65536)
    origin.stop(kill=True)
    proxy.cut()
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(1 << 20):
            data += chunk
    sock.close()
    assert len(data) < big.size
    assert bytes(data) == big.path.read_bytes()[: len(data)]
    assert agent.metric("shoal_agent_requests_total", kind="blobs", status="aborted") == 1
    assert agent.metric("shoal_agent_downloads_total", result="failed") == 1


def test_seeder_killed_mid_transfer(stack: Stack, registry: Registry, images: Images) -> None:
    """The swarm stalls mid-blob (its only seeder died): the agent finishes the blob from the
    registry and the client, which already had part of it, gets the whole correct blob."""
    image = images.app()
    big = max(image.blobs.values(), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin(torrent={"upload_rate_limit": "4MiB"})
    _seed(stack, big.digest)
    agent = stack.start_agent(swarm={"stall_timeout": "2s"})
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=BOUND)
    sock.sendall(f"GET /v2/private/app/blobs/{big.digest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    received = bytearray()
    while len(received) < 1 << 20:
        received += sock.recv(65536)
    origin.stop(kill=True)
    while chunk := sock.recv(1 << 20):
        received += chunk
    sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == big.size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == big.digest
    assert agent.metric("shoal_agent_fallbacks_total", reason="stalled") == 1
    assert agent.metric("shoal_agent_downloads_total", source="registry", result="ok") == 1
