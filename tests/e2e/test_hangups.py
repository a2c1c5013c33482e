"""Clients hanging up mid-blob are routine: no ERROR line, the blob is released (so eviction can
take it), the journal says `aborted`, and the next client gets the whole blob."""

from __future__ import annotations

import hashlib
import socket
import struct

from tests.e2e.conftest import Images
from tests.e2e.test_journal import wait_collected
from tests.support.procs import Component, http_get, wait_for
from tests.support.stack import Stack

MIB = 1 << 20


def hang_up_after(agent: Component, path: str, nbytes: int) -> bytes:
    """GET `path`, read `nbytes` of the answer, then reset the connection (as a killed client)."""
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        while len(received) < nbytes:
            chunk = sock.recv(1 << 16)
            assert chunk, "the agent closed the connection first"
            received += chunk
        # RST instead of FIN: the agent's next write fails at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return received


def test_client_hanging_up_mid_blob_is_routine(stack: Stack, images: Images) -> None:
    image = images.app()
    big = max(image.blobs.values(), key=lambda b: b.size)
    stack.start(agents=1)
    agent = stack.agents[0]
    path = f"/v2/private/app/blobs/{big.digest}"
    # 1. in flight (streamed from verified pieces), 2. cached (sendfile), 3. a range of it
    assert hang_up_after(agent, path, 2 * MIB).startswith(b"HTTP/1.1 200")
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1, timeout=120,
             what="the download to finish without its client")
    assert hang_up_after(agent, path, 2 * MIB).startswith(b"HTTP/1.1 200")
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-40000000\r\n\r\n".encode())
    assert sock.recv(1 << 16).startswith(b"HTTP/1.1 206")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    wait_for(lambda: agent.metric("shoal_agent_requests_total", status="client_gone") >= 3, timeout=30,
             what="the agent to notice three hang-ups")
    wait_for(lambda: agent.metric("shoal_agent_cache_in_use_bytes") == 0, timeout=30,
             what="every pin to be released")
    # the blob is whole for the next client
    status, body = http_get(f"{agent.url}{path}", timeout=60)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == big.digest
    events = wait_collected(stack, 4)
    mine = [e for e in events if e["digest"] == big.digest]
    assert sorted(str(e["outcome"]) for e in mine) == ["aborted", "aborted", "aborted", "complete"]
    log = agent.log()
    assert " ERROR " not in log and "Traceback" not in log and "Exception ignored" not in log, log[-3000:]
    assert log.count("client went away during GET") == 3
