"""`shoal up`'s readiness wait counts a /readyz answer only from the child it started: another
process answering on that port (a second shoal) once made it print its banner."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shoal import protocol
from shoal.cli import preflight, up
from tests.support.procs import free_port

READY_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == sys.argv[2] else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[str]:
    """Someone else answering /readyz with 200 on a port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_another_process_answering_readyz_is_not_our_child(impostor: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not preflight.owns_listener(child.pid, impostor)
        assert up._wait_ready(impostor, child, lambda: False, timeout=1.0) is False
    finally:
        child.kill()
        child.wait()


def test_our_child_answering_readyz_is_ready() -> None:
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", READY_SERVER, str(port), protocol.READYZ.path()])
    try:
        assert up._wait_ready(f"127.0.0.1:{port}", child, lambda: False, timeout=30.0) is True
        assert preflight.owns_listener(child.pid, f"127.0.0.1:{port}")
    finally:
        child.kill()
        child.wait()


def test_a_child_that_exits_is_not_ready(impostor: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    child.wait()
    assert up._wait_ready(impostor, child, lambda: False, timeout=5.0) is False
