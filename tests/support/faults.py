"""Fault injection for tests: a TCP proxy that can be cut (one client's view of a server, e.g.
one agent's view of the registry, goes down while the server keeps running for others) or held
after some bytes (a transfer stopped in the middle, at a known point, until released)."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.procs import free_port


class CuttableProxy:
    """Forwards 127.0.0.1:<port> to a target; `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        self._budget: int | None = None  # bytes still let through towards clients; None: no hold
        self._released = threading.Condition(self._lock)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._cut:
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_client: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                while to_client and data:
                    with self._lock:
                        while self._budget == 0 and not self._cut:
                            self._released.wait()
                        n = len(data) if self._budget is None else min(len(data), self._budget)
                        if self._budget is not None:
                            self._budget -= n
                    dst.sendall(data[:n])
                    data = data[n:]
                if data:
                    dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def hold_after(self, nbytes: int) -> None:
        """Let `nbytes` more through towards clients (all connections together), then hold."""
        with self._lock:
            self._budget = nbytes
            self._released.notify_all()

    def release(self) -> None:
        with self._lock:
            self._budget = None
            self._released.notify_all()

    def held(self) -> bool:
        with self._lock:
            return self._budget == 0

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._released.notify_all()
            conns, self._conns = self._conns, []
        self._listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()


class FlakyRegistry:
    """An HTTP proxy in front of the registry that answers the next N requests with an error
    (e.g. 429 with Retry-After, or 503) before passing requests through again, and can hold a
    request until the test lets it go on."""

    def __init__(self, target: str) -> None:
        self.target = target  # host:port
        self.port = free_port()
        self.requests = 0
        self.failed = 0
        self._plan: list[tuple[int, dict[str, str]]] = []
        self._hold: tuple[str, threading.Event, threading.Event] | None = None
        self._releases: list[threading.Event] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._handle(self)

            def do_HEAD(self) -> None:
                proxy._handle(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, count: int, status: int, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._plan = [(status, headers or {})] * count

    def hold_next_get(self, marker: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next GET whose path holds `marker` until the second event is set (at most a
        minute): (set once it is held, set it to let the request go on to the registry)."""
        held, release = threading.Event(), threading.Event()
        with self._lock:
            self._hold = (marker, held, release)
            self._releases.append(release)
        return held, release

    def close(self) -> None:
        for release in self._releases:  # (a held request would keep server_close waiting)
            release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
            planned = self._plan.pop(0) if self._plan else None
            hold = self._hold if self._hold is not None and h.command == "GET" and self._hold[0] in h.path else None
            if hold is not None:
                self._hold = None
        if hold is not None:
            hold[1].set()
            hold[2].wait(60)
        if planned is not None:
            self.failed += 1
            status, headers = planned
            body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down","detail":null}]}'
            h.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                h.send_header(k, v)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
            return
        host, port = self.target.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            fwd = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(h.command, h.path, headers=fwd)
            resp = conn.getresponse()
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding"):
                    h.send_header(k, v)
            h.end_headers()
            if h.command != "HEAD":
                while chunk := resp.read(1 << 16):
                    h.wfile.write(chunk)
        finally:
            conn.close()
