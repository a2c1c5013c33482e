"""The machine's limit: N agents on loopback (no caps) pulling one large blob through the swarm,
against N plain HTTP clients pulling the same blob straight from the registry. Aggregate
throughput = N * size / time until the last one is done. Also records the agents' footprint."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import services
from bench.footprint import PeakRss
from shoal import peercerts, protocol
from shoal.cluster import Cluster, command, make_keys
from tests.support import api
from tests.support.clients import sha256_path
from tests.support.procs import free_port, proc_stats


@dataclass
class UncappedResult:
    agents: int
    blob_bytes: int
    swarm_seconds: float
    http_seconds: float
    swarm_aggregate_bytes_per_second: float
    http_aggregate_bytes_per_second: float
    agent_peak_rss_bytes: int
    agent_cpu_seconds_per_gib: float
    errors: list[str]


def _curl_all(urls: list[str], outdir: Path, digest: str) -> tuple[float, list[str]]:
    """Time N concurrent downloads; afterwards (outside the timing) each file must hash to `digest`."""
    started = time.monotonic()
    files = [outdir / f"download-{i}" for i in range(len(urls))]
    procs = [subprocess.Popen(["curl", "-sf", "-o", str(f), "-w", "%{http_code}", u], stdout=subprocess.PIPE)
             for f, u in zip(files, urls, strict=True)]
    errors = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if out.decode() != "200":
            errors.append(f"HTTP client got {out.decode()}")
    seconds = time.monotonic() - started
    for f in files:
        if not f.exists() or "sha256:" + sha256_path(f) != digest:
            errors.append(f"{f.name} does not hash to {digest}")
        f.unlink(missing_ok=True)
    return seconds, errors


def run(work: Path, *, registry_host: str, repo: str, blob: tuple[str, int], agents: int = 4,
        libtorrent: dict[str, Any] | None = None) -> UncappedResult:
    digest, size = blob
    work.mkdir(parents=True, exist_ok=True)
    upstream = {"name": registry_host, "url": f"http://{registry_host}"}
    tport, oport = free_port(), free_port()
    cluster = Cluster(make_keys(work / "keys"), [upstream], tracker_url=f"http://127.0.0.1:{tport}",
                      origin_url=f"http://127.0.0.1:{oport}", log={"level": "warning"})
    tracker = services.Service(None, "tracker", command("tracker", work / "t.yaml"), work)
    (work / "t.yaml").write_text(yaml.safe_dump(cluster.tracker(listen=f"127.0.0.1:{tport}", interval="10s",
                                                                min_interval="1s")))
    origin = services.Service(None, "origin", command("origin", work / "o.yaml"), work)
    (work / "o.yaml").write_text(yaml.safe_dump(cluster.origin(
        listen=f"127.0.0.1:{oport}", data_dir=work / "origin", torrent_listen=f"127.0.0.1:{free_port()}",
        torrent={"libtorrent": libtorrent or {}})))
    started_services = [tracker.start(protocol.READYZ.url(f"http://127.0.0.1:{tport}"))]
    started_services.append(origin.start(protocol.READYZ.url(f"http://127.0.0.1:{oport}")))
    nodes = []
    try:
        for i in range(agents):
            ip = f"127.0.0.{i + 2}"
            port = free_port(ip)
            cfg = work / f"a{i}.yaml"
            cfg.write_text(yaml.safe_dump(cluster.agent(
                listen=f"{ip}:{port}", data_dir=work / f"a{i}", torrent_listen=f"{ip}:{free_port(ip)}",
                node=f"n{i}", torrent={"libtorrent": libtorrent or {}},
                swarm={"first_piece_timeout": "60s", "stall_timeout": "60s"})))
            service = services.Service(None, f"agent{i}", command("agent", cfg), work)
            service.start(protocol.READYZ.url(f"http://{ip}:{port}"))
            started_services.append(service)
            nodes.append((service, f"http://{ip}:{port}/v2/{repo}/blobs/{digest}"))
        # the origin has the blob already (pre-seeded), so this measures the swarm itself
        # (an admission for a node of the bench's own: the registry is open, so anonymous will do)
        origin_url, node_token = f"http://127.0.0.1:{oport}", cluster.keys["node_token"].read_text()
        key = peercerts.NodeKey.generate()
        api.grants(origin_url, node_token, "bench", key)
        api.admission(origin_url, node_token, str(digest), "bench", key, registry_host, repo)
        time.sleep(2)  # swarm tokens, announces
        cpu_before = sum(proc_stats(s.pid)[1] for s, _ in nodes)
        with PeakRss([s.pid for s, _ in nodes]) as peak:
            swarm_seconds, errors = _curl_all([u for _, u in nodes], work, digest)
        cpu = sum(proc_stats(s.pid)[1] for s, _ in nodes) - cpu_before
        http_seconds, http_errors = _curl_all([f"http://{registry_host}/v2/{repo}/blobs/{digest}"] * agents, work,
                                             digest)
        gib_served = agents * size / (1 << 30)
        return UncappedResult(agents, size, round(swarm_seconds, 3), round(http_seconds, 3),
                              agents * size / swarm_seconds, agents * size / http_seconds, peak.bytes,
                              round(cpu / gib_served, 3), errors + http_errors)
    finally:
        for service in reversed(started_services):
            service.stop()
