"""A real redis-server (Debian's) on loopback with a password and append-only persistence."""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.procs import free_port


class RedisServer:
    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: run ./bin/test, which installs the Debian packages")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.password_file = directory / "password"
        self.password_file.write_text(self.password)
        self.password_file.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def settings(self, prefix: str) -> dict[str, object]:
        """The `redis` section of a tracker's configuration."""
        return {"address": self.address, "password": {"file": str(self.password_file)}, "prefix": prefix}

    def start(self) -> RedisServer:
        conf = self.dir / "redis.conf"
        # appendfsync always: what a restart keeps is everything acknowledged (the tests restart it)
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\nprotected-mode yes\nrequirepass {self.password}\n"
                        f"dir {self.dir}\nappendonly yes\nappendfsync always\nsave \"\"\n"
                        "daemonize no\nlogfile \"\"\nloglevel warning\n")
        conf.chmod(0o600)
        self.proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=(self.dir / "redis.log").open("ab"))
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-500:]}")
            if self.command("PING") == b"+PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def command(self, *args: str) -> bytes | None:
        """One command over RESP with AUTH first; the first line of its answer (None: no answer)."""
        def bulk(*words: str) -> bytes:
            return f"*{len(words)}\r\n".encode() + b"".join(
                f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in words)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(bulk("AUTH", self.password) + bulk(*args))
                data = b""
                while data.count(b"\r\n") < 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        lines = data.split(b"\r\n")
        return lines[1] if len(lines) > 2 else None

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
