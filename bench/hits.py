"""Cache hits: the agent serving a cached blob against nginx (sendfile) serving the same file and
the central cache (docker-registry proxy mode) serving a hit; and the latency the agent adds to
a manifest request over asking the registry directly. All on loopback, one load generator (wrk)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import services
from bench.footprint import PeakRss
from bench.loadgen import WrkResult, wrk
from shoal import protocol
from shoal.cluster import command, source_path
from tests.support.clients import sha256_path
from tests.support.procs import free_port, proc_stats

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GIB = 1 << 30


@dataclass
class HitsResult:
    large_blob_bytes: int
    throughput: dict[str, float]  # bytes/s, large blob, by server
    small_p50_ms: dict[str, float]
    small_p99_ms: dict[str, float]
    manifest_p50_ms: dict[str, float]  # registry direct vs through the agent
    manifest_p99_ms: dict[str, float]
    errors: int
    agent_peak_rss_bytes: int  # while wrk loads it (cached large blob, small blob, manifests)
    agent_cpu_seconds_per_gib: float  # serving the cached large blob
    agent_cpu_ms_per_small_request: float = 0.0  # the agent's CPU (all threads) per small-blob request

    def row(self) -> dict[str, Any]:
        return {**asdict(self),
                "agent_vs_nginx": round(self.throughput["agent"] / self.throughput["nginx"], 3),
                "agent_vs_central": round(self.throughput["agent"] / self.throughput["central"], 3),
                "manifest_added_p50_ms": round(self.manifest_p50_ms["agent"] - self.manifest_p50_ms["registry"], 3),
                "manifest_added_p99_ms": round(self.manifest_p99_ms["agent"] - self.manifest_p99_ms["registry"], 3)}


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"exited before {url} answered")
        if services.http_ok(url):
            return
        time.sleep(0.1)
    raise TimeoutError(url)


def run(work: Path, *, registry_url: str, repo: str, manifest_digest: str, large: tuple[str, int],
        small: str, seconds: int) -> HitsResult:
    """`registry_url` serves the image on loopback (no auth); `large` is (digest, size)."""
    work.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(work / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(args, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": source_path(services.ROOT)})
        procs.append(proc)
        return proc

    try:
        central_port, agent_port, nginx_port = free_port(), free_port(), free_port()
        central_cfg = work / "central.yml"
        central_cfg.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn"}, "http": {"addr": f"127.0.0.1:{central_port}"},
            "storage": {"filesystem": {"rootdirectory": str(work / "central")}},
            "proxy": {"remoteurl": registry_url}}))
        central = spawn(["docker-registry", "serve", str(central_cfg)], "central")
        agent_cfg = work / "agent.yaml"
        agent_cfg.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{agent_port}", "data_dir": str(work / "agent"),
            "upstreams": [{"name": registry_url.split("//")[1], "url": registry_url}],
            "log": {"level": "warning"}}))
        agent = spawn(command("agent", agent_cfg), "agent")
        _wait(f"http://127.0.0.1:{central_port}/v2/", central)
        _wait(protocol.READYZ.url(f"http://127.0.0.1:{agent_port}"), agent)
        urls = {
            "agent": f"http://127.0.0.1:{agent_port}/v2/{repo}/blobs/",
            "central": f"http://127.0.0.1:{central_port}/v2/{repo}/blobs/",
        }
        for base in urls.values():  # warm both caches, checking what they serve
            for digest in (large[0], small):
                subprocess.run(["curl", "-sf", "-o", str(work / "warm"), base + digest], check=True, timeout=300)
                if "sha256:" + sha256_path(work / "warm") != digest:
                    raise RuntimeError(f"{base}{digest} does not hash to its digest")
        time.sleep(1)
        large_file = work / "agent" / "cache" / "blobs" / "sha256" / large[0][7:9] / large[0][7:]
        small_file = work / "agent" / "cache" / "blobs" / "sha256" / small[7:9] / small[7:]
        (work / "www").mkdir(exist_ok=True)
        for f, name in ((large_file, "large"), (small_file, "small")):
            target = work / "www" / name
            target.unlink(missing_ok=True)
            # a copy, not a link: the agent's data directory is its user's only (0700), and
            # nginx's worker runs as another user
            shutil.copyfile(f, target)
        nginx_conf = work / "nginx.conf"
        nginx_conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{nginx_port};
        root {work}/www;
        location / {{ default_type application/octet-stream; }}
    }}
}}
""")
        nginx = spawn(["nginx", "-c", str(nginx_conf), "-p", str(work)], "nginx")
        _wait(f"http://127.0.0.1:{nginx_port}/small", nginx)

        large_urls = {"agent": urls["agent"] + large[0], "nginx": f"http://127.0.0.1:{nginx_port}/large",
                      "central": urls["central"] + large[0]}
        small_urls = {"agent": urls["agent"] + small, "nginx": f"http://127.0.0.1:{nginx_port}/small",
                      "central": urls["central"] + small}
        with PeakRss([agent.pid]) as peak:
            cpu_before = proc_stats(agent.pid)[1]
            big: dict[str, WrkResult] = {"agent": wrk(large_urls["agent"], threads=2, connections=4,
                                                      seconds=seconds)}
            cpu_per_gib = (proc_stats(agent.pid)[1] - cpu_before) / (big["agent"].bytes_per_second * seconds / GIB)
            big |= {k: wrk(u, threads=2, connections=4, seconds=seconds) for k, u in large_urls.items()
                    if k != "agent"}
            cpu_before = proc_stats(agent.pid)[1]
            tiny: dict[str, WrkResult] = {"agent": wrk(small_urls["agent"], threads=1, connections=8,
                                                       seconds=seconds)}
            small_requests = max(tiny["agent"].requests_per_second * seconds, 1)
            cpu_per_small = (proc_stats(agent.pid)[1] - cpu_before) / small_requests
            tiny |= {k: wrk(u, threads=1, connections=8, seconds=seconds) for k, u in small_urls.items()
                     if k != "agent"}
            manifest_urls = {"registry": f"{registry_url}/v2/{repo}/manifests/{manifest_digest}",
                             "agent": f"http://127.0.0.1:{agent_port}/v2/{repo}/manifests/{manifest_digest}"}
            manifest = {k: wrk(u, threads=1, connections=1, seconds=seconds, headers={"Accept": MANIFEST})
                        for k, u in manifest_urls.items()}
        errors = sum(r.errors for group in (big, tiny, manifest) for r in group.values())
        return HitsResult(large[1], {k: r.bytes_per_second for k, r in big.items()},
                          {k: r.p50_ms for k, r in tiny.items()}, {k: r.p99_ms for k, r in tiny.items()},
                          {k: r.p50_ms for k, r in manifest.items()}, {k: r.p99_ms for k, r in manifest.items()},
                          errors, peak.bytes, round(cpu_per_gib, 3), round(cpu_per_small * 1000, 3))
    finally:
        services.stop_all(procs)
