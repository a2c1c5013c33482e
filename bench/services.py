"""Starting the systems under test inside emulated hosts: the registry (plain or as a pull-through
cache), shoal's tracker, origin and agents, and nginx."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.netns import Host
from shoal.cluster import command, source_path

ROOT = Path(__file__).resolve().parents[1]


class Service:
    def __init__(self, host: Host | None, name: str, args: list[str], workdir: Path) -> None:
        self.host, self.name, self.args, self.workdir = host, name, args, workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_url: str | None = None, ok: tuple[int, ...] = (200,)) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {"PYTHONPATH": source_path(ROOT)}
        if self.host is not None:
            self.proc = self.host.popen(self.args, log=str(self.log), env=env)
        else:
            out = open(self.log, "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=out)
            out.close()
        if ready_url:
            self.wait(ready_url, ok)
        return self

    def wait(self, url: str, ok: tuple[int, ...], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log}")
            try:
                # -g: an IPv6 literal's brackets are the URL's, not a curl glob
                cmd = self.host.cmd("curl", "-g", "-s", "-o", "/dev/null", "-w", "%{http_code}", url) if self.host \
                    else ["curl", "-g", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]
                code = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                if code.isdigit() and int(code) in ok:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready at {url}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop processes started in order: all asked at once, the last started first (agents before
    the origin they report to), each given 20 s, then killed."""
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def registry(host: Host, workdir: Path, *, proxy_of: str | None = None, port: int = 5000) -> Service:
    """docker-registry without auth (so it can be a proxy's upstream), or its pull-through mode.
    On a host with an IPv6 address it listens on both (inside its namespace): images are pushed
    from the root namespace over IPv4 (skopeo takes no IPv6 literal), shoal pulls over IPv6."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True}},
        "http": {"addr": f"[::]:{port}" if host.ip6 else f"{host.ip}:{port}"},
    }
    if proxy_of:
        config["proxy"] = {"remoteurl": proxy_of}
    (workdir / "config.yml").write_text(yaml.safe_dump(config))
    return Service(host, "registry" if not proxy_of else "central-cache",
                   ["docker-registry", "serve", str(workdir / "config.yml")], workdir)


def shoal(host: Host, component: str, name: str, workdir: Path, config: dict[str, Any]) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Service(host, name, command(component, path), workdir)


_REMOTE = re.compile(r'http\.request\.remoteaddr="?([^"\s]+)')


def registry_bytes(log: Path, local: set[str]) -> tuple[int, int]:
    """(all, remote) bytes of response bodies the registry wrote, from its own log: `remote` counts
    only responses to clients whose address is not in `local` (the registry's own host), i.e. the
    bytes that left the registry's host on its NIC."""
    total = remote = 0
    if not log.exists():
        return 0, 0
    for line in log.read_text(errors="replace").splitlines():
        if "response completed" in line and "http.response.written=" in line:
            value = line.split("http.response.written=", 1)[1].split()[0]
            if not value.isdigit():
                continue
            total += int(value)
            peer = _REMOTE.search(line)
            addr = peer.group(1).rsplit(":", 1)[0].strip("[]") if peer else ""
            if addr not in local:
                remote += int(value)
    return total, remote


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (bench URLs)
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False
