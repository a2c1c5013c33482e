"""Running shoal components and other servers as real processes in tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from shoal import cluster, protocol

ROOT = Path(__file__).resolve().parents[2]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds: user + system) of a running process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / CLK_TCK


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (tests on IPv6 skip, saying so, where it cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Ports free_port has handed out in this process. The kernel may give a closed port to the next
# bind: two calls in a row once returned one port for a stack's tracker and origin, the origin
# could not listen, and the tracker answered its readiness check.
_HANDED_OUT: set[int] = set()


def free_port(ip: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and that no earlier call here returned."""
    for _ in range(200):
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no port on {ip} that was not handed out already (in 200 tries)")


def http_get(url: str, *, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_http(url: str, *, ok: tuple[int, ...] = (200,), timeout: float = 30.0,
              proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status in ok:
                return
            last = status
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {ok} within {timeout}s (last: {last})")


class Component:
    """A component ("tracker", "origin", "agent") run with `config`, its log in the work directory."""

    def __init__(self, component: str, workdir: Path, config: dict[str, Any], *, name: str | None = None) -> None:
        self.component = component
        self.name = name or component
        self.workdir = workdir
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self.config_path = workdir / f"{self.name}.yaml"

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}"

    def start(self, *, wait: bool = True) -> Component:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": cluster.source_path(ROOT)}
        self.proc = subprocess.Popen(cluster.command(self.component, self.config_path),
                                     stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()
        if wait:
            wait_http(protocol.READYZ.url(self.url), timeout=30, proc=self.proc)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> list[Sample]:
        """Every sample of /metrics, parsed by prometheus_client's own parser."""
        status, body = http_get(protocol.METRICS.url(self.url))
        assert status == 200, status
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples of `name` whose labels include `labels`."""
        return metric_sum(self.metrics(), name, **labels)


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def series(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    """The samples of `name` whose labels include `labels`."""
    return [s for s in samples if s.name == name and labels.items() <= s.labels.items()]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(s.value for s in series(samples, name, **labels))


def wait_for(condition: Callable[[], bool], *, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not met within {timeout}s")
