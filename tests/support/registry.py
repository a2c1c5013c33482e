"""The real origin registry for tests: Debian's docker-registry (distribution 2.8) with htpasswd
auth (or none), and a notification sink that records its pull events (the origin's audit)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.procs import free_port, wait_http


class EventSink:
    """An HTTP endpoint distribution posts notification envelopes to; keeps every event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                try:
                    doc = json.loads(body)
                    with sink._lock:
                        sink.events.extend(doc.get("events", []))
                except ValueError:
                    pass
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.port = free_port("127.0.0.1")
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Pull:
    method: str
    repository: str
    digest: str
    media_type: str
    actor: str
    user_agent: str
    addr: str = ""


class Registry:
    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None, auth_yaml: str | None = None,
                 ip: str = "127.0.0.1", endpoints: list[str] | None = None) -> None:
        """htpasswd auth for `users`, or the given `auth:` block (e.g. a token server's); `ip`
        is the listen address (`::1` for the IPv6 tests); `endpoints`: more notification
        endpoints, each one YAML flow mapping (set before start())."""
        self.workdir = workdir
        self.users = users if users is not None else {"alice": "alicepw"}
        self.auth_yaml = auth_yaml
        self.ip = ip
        self.port = free_port(ip)
        self.sink = EventSink()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "registry.log"
        self.endpoints = list(endpoints or [])

    @property
    def host(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        auth = self.auth_yaml or ""
        if self.users and self.auth_yaml is None:
            self.set_users(self.users)
            auth = f"auth:\n  htpasswd: {{realm: basic-realm, path: {self.workdir / 'htpasswd'}}}\n"
        config = self.workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: info, formatter: text}\n"
            f"storage:\n  filesystem: {{rootdirectory: {self.workdir / 'data'}}}\n  delete: {{enabled: true}}\n"
            f"http: {{addr: '{self.host}'}}\n"
            f"{auth}"
            "notifications:\n  endpoints:\n"
            f"    - {{name: audit, url: '{self.sink.url}', timeout: 2s, threshold: 3, backoff: 200ms}}\n"
            + "".join(f"    - {e}\n" for e in self.endpoints)
        )
        self._spawn(config)

    def _spawn(self, config: Path) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
        log.close()
        wait_http(f"{self.url}/v2/", ok=(200, 401), timeout=20, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self._spawn(self.workdir / "config.yml")

    def set_users(self, users: dict[str, str]) -> None:
        """Rewrite the htpasswd file (distribution reads it at start: restart to apply)."""
        self.users = users
        htpasswd = self.workdir / "htpasswd"
        htpasswd.unlink(missing_ok=True)
        for user, password in users.items():
            subprocess.run(["htpasswd", "-Bi" if htpasswd.exists() else "-Bci", str(htpasswd), user],
                           input=password.encode(), check=True, capture_output=True)

    def close(self) -> None:
        self.stop()
        self.sink.close()

    # ----- audit events ---------------------------------------------------------------------

    def pulls(self) -> list[Pull]:
        out = []
        for e in self.sink.snapshot():
            if e.get("action") != "pull":
                continue
            target, request = e.get("target", {}), e.get("request", {})
            out.append(Pull(request.get("method", ""), target.get("repository", ""), target.get("digest", ""),
                            target.get("mediaType", ""), e.get("actor", {}).get("name", ""),
                            request.get("useragent", ""), request.get("addr", "")))
        return out

    def settle(self, quiet: float = 1.0, timeout: float = 15.0) -> list[Pull]:
        """Wait until no new event arrived for `quiet` seconds (notifications are async)."""
        deadline = time.monotonic() + timeout
        count, since = len(self.sink.snapshot()), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = len(self.sink.snapshot())
            if now != count:
                count, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return self.pulls()

    def blob_gets(self, pulls: list[Pull] | None = None) -> dict[str, int]:
        """How many times the registry served each blob with a GET."""
        counts: dict[str, int] = {}
        for p in pulls if pulls is not None else self.pulls():
            if p.method == "GET" and "manifest" not in p.media_type and "index" not in p.media_type:
                counts[p.digest] = counts.get(p.digest, 0) + 1
        return counts


def pulls_since(before: list[Pull], after: list[Pull]) -> Iterator[Pull]:
    return iter(after[len(before):])
