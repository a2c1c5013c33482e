"""A scriptable HTTP server standing in for a misbehaving (or malicious) registry, object store
or token realm: each (method, path) answers what the test says, and every request is recorded."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.procs import free_port


@dataclass
class Canned:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    declared_length: int | None = None  # Content-Length to claim (defaults to len(body))


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeServer:
    def __init__(self, ip: str = "127.0.0.1") -> None:
        self.ip = ip
        self.port = free_port(ip)
        self.routes: dict[tuple[str, str], Canned] = {}
        self.require_basic = False  # answer 401 (Basic challenge) to requests without Authorization
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server._answer(self)

            def do_HEAD(self) -> None:
                server._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((ip, self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def host(self) -> str:
        return f"{self.ip}:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.seen.append(Seen(h.command, h.path, dict(h.headers.items())))
        path = h.path.split("?", 1)[0]
        if self.require_basic and "Authorization" not in h.headers:
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="fake"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        canned = self.routes.get((h.command, path)) or self.routes.get(("*", path)) or Canned(
            404, {"Content-Type": "application/json"},
            b'{"errors":[{"code":"NAME_UNKNOWN","message":"not here","detail":null}]}')
        h.send_response(canned.status)
        length = canned.declared_length if canned.declared_length is not None else len(canned.body)
        for key, value in {"Content-Length": str(length), **canned.headers}.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(canned.body)
