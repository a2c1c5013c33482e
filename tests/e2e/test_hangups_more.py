"""More ways a client hangs up (before the first byte of a blob the agent is still fetching,
during a manifest, with FIN rather than RST, mid-body through sendfile): each is routine, at most
one INFO/WARNING line, never an ERROR or a traceback in the agent's log."""

from __future__ import annotations

import socket
import struct

from tests.e2e.conftest import Images
from tests.support.procs import Component, wait_for
from tests.support.stack import Stack

MIB = 1 << 20


def request_then_hang_up(agent: Component, path: str, *, read: int = 0, reset: bool = True,
                         method: str = "GET") -> None:
    host, port = agent.config["listen"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    try:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < read:
            chunk = sock.recv(1 << 16)
            assert chunk, "the agent closed the connection first"
            received += len(chunk)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def test_every_kind_of_hang_up_is_quiet(stack: Stack, images: Images) -> None:
    image = images.app()
    blobs = sorted(image.blobs.values(), key=lambda b: b.size)
    big, mid = blobs[-1], blobs[-2]
    stack.start(agents=1)
    agent = stack.agents[0]
    base = "/v2/private/app"
    # before the first byte: the agent is still fetching the blob (in flight)
    request_then_hang_up(agent, f"{base}/blobs/{big.digest}")
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") >= 1, timeout=120,
             what="the download to finish without its client")
    # a manifest, asked for and dropped at once
    request_then_hang_up(agent, f"{base}/manifests/v1")
    request_then_hang_up(agent, f"{base}/manifests/v1", method="HEAD")
    # mid-body with FIN (a client that exits), cached (sendfile) and in flight
    request_then_hang_up(agent, f"{base}/blobs/{big.digest}", read=MIB, reset=False)
    request_then_hang_up(agent, f"{base}/blobs/{mid.digest}", read=MIB // 2, reset=False)
    request_then_hang_up(agent, f"{base}/blobs/{mid.digest}", read=MIB // 2)
    wait_for(lambda: agent.metric("shoal_agent_cache_in_use_bytes") == 0, timeout=60,
             what="every pin to be released")
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") >= 2, timeout=120,
             what="the second download")
    log = agent.log()
    assert " ERROR " not in log and "Traceback" not in log and "Exception ignored" not in log, log[-5000:]
    gone = [line for line in log.splitlines() if "went away" in line or "hung up" in line]
    assert all(" INFO " in line or " WARNING " in line for line in gone), gone
