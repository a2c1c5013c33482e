"""Cold rollout: N capped hosts pull one image at once, through each system.

Hosts are network namespaces whose NICs are capped at B (tc tbf, both directions). The registry
host (10.199.0.2) is capped at B too; shoal's origin and tracker run on it, beside the registry.
The central cache (docker-registry in proxy mode) has a host of its own, capped at B.
Systems: "direct" (every host pulls from the registry), "central" (every host pulls from the
cache, which pulls from the registry once), "shoal" (every host pulls from its own agent).

On a topology with IPv6 (`--ipv6`), shoal runs on the hosts' ULA addresses only: the origin
fetches from the registry over IPv6, tracker, origin and BitTorrent listen on IPv6, and each
client pulls from its agent at [::1]. The machine's CPU idle over each run is recorded beside it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import services
from bench.netns import SUBNET, Host, Topology
from shoal import netaddr, protocol
from shoal.cluster import Cluster, make_keys, merged, source_path

REGISTRY_IP, CACHE_IP = f"{SUBNET}.0.2", f"{SUBNET}.0.3"


@dataclass
class RolloutResult:
    system: str
    hosts: int
    image_bytes: int
    cap_bytes: int
    total_seconds: float  # from the common start to the last host done
    p50_seconds: float
    p99_seconds: float
    registry_egress_bytes: int
    errors: list[str]
    from_agents_bytes: int = 0  # shoal only: payload the agents got from each other
    from_seeder_bytes: int = 0  # ... and from the origin seeder
    ip_version: int = 4  # the addresses shoal ran on
    cpu_idle_percent: float = -1.0  # the machine's, from the common start to the last host done

    @property
    def ideal_seconds(self) -> float:
        return self.image_bytes / self.cap_bytes

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "ideal_seconds": round(self.ideal_seconds, 2),
                "ratio_to_ideal": round(self.total_seconds / self.ideal_seconds, 2),
                "egress_ratio": round(self.registry_egress_bytes / self.image_bytes, 3)}


def cpu_times() -> tuple[float, float]:
    """(idle + iowait, total) jiffies of the whole machine so far."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Rollout:
    def __init__(self, work: Path, topo: Topology, cap: int, max_hosts: int, *,
                 origin_config: dict[str, Any] | None = None, agent_config: dict[str, Any] | None = None,
                 log_level: str = "warning") -> None:
        self.work, self.topo, self.cap = work, topo, cap
        # Overrides merged into the generated configs, for tuning experiments.
        self.origin_config = origin_config or {}
        self.agent_config = agent_config or {}
        self.log_level = log_level
        self.zones = 0  # agents in this many zones (bench/zones.py), host i in zone_of(i)
        self.tracker_config: dict[str, Any] = {}  # merged into the tracker's (bench/zones.py)
        self.registry_host = topo.add("registry", REGISTRY_IP, cap)
        self.cache_host = topo.add("cache", CACHE_IP, cap)
        self.nodes = [topo.add(f"h{i}", f"{SUBNET}.1.{i}", cap) for i in range(1, max_hosts + 1)]
        self.registry = services.registry(self.registry_host, work / "registry").start(
            f"http://{REGISTRY_IP}:5000/v2/")
        self.keys = make_keys(work / "keys")

    def close(self) -> None:
        self.registry.stop()

    @property
    def registry_url(self) -> str:
        return f"http://{REGISTRY_IP}:5000"

    @property
    def ipv6(self) -> bool:
        return self.topo.ipv6

    def addr(self, host: Host) -> str:
        """The address shoal uses on `host`: its ULA address on an IPv6 topology."""
        return host.ip6 or host.ip

    @property
    def agent_url(self) -> str:
        """Where each host's client reaches its agent (the host's own loopback)."""
        return "http://[::1]:5050" if self.ipv6 else "http://127.0.0.1:5050"

    def run(self, system: str, hosts: int, image: str, image_bytes: int) -> RolloutResult:
        run_dir = self.work / f"{system}-{hosts}-{image.replace('/', '_').replace(':', '_')}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        nodes = self.nodes[:hosts]
        started: list[services.Service] = []
        try:
            if system == "direct":
                endpoints = [self.registry_url] * hosts
            elif system == "central":
                cache = services.registry(self.cache_host, run_dir / "cache", proxy_of=self.registry_url)
                started.append(cache.start(f"http://{CACHE_IP}:5000/v2/"))
                endpoints = [f"http://{CACHE_IP}:5000"] * hosts
            else:
                started += self._shoal(run_dir, nodes)
                endpoints = [self.agent_url] * hosts
            egress_before = services.registry_bytes_sent(self.registry.log)
            go_at = time.time() + 3
            clients = []
            for node, endpoint in zip(nodes, endpoints, strict=True):
                out = run_dir / f"client-{node.name}.json"
                clients.append((out, node.popen([sys.executable, "-m", "bench.client", "--endpoint", endpoint,
                                                 "--image", image, "--go-at", str(go_at), "--out", str(out)],
                                                log=str(run_dir / f"client-{node.name}.log"),
                                                env={"PYTHONPATH": source_path(services.ROOT)})))
            while time.time() < go_at:
                time.sleep(0.01)
            idle0, total0 = cpu_times()
            for _, proc in clients:
                proc.wait(7200)
            idle1, total1 = cpu_times()
            time.sleep(1.5)  # the registry logs a response after it is sent
            egress = services.registry_bytes_sent(self.registry.log) - egress_before
            peer_bytes = self._peer_bytes(nodes) if system == "shoal" else (0, 0)
        finally:
            for service in reversed(started):
                service.stop()
            # The caches of a finished run go (logs and client results stay): a full matrix
            # would otherwise keep N copies of every image on disk, about 40 GiB, and a full disk
            # turns later runs into fallbacks and errors.
            for data in run_dir.iterdir():
                if data.is_dir():
                    shutil.rmtree(data, ignore_errors=True)
        durations: list[float] = []
        errors: list[str] = []
        finished: list[float] = []
        for out, _ in clients:
            doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {
                "errors": ["no result"], "started": go_at, "finished": time.time()}
            errors += [str(e) for e in doc["errors"]]
            durations.append(float(doc["finished"]) - go_at)
            finished.append(float(doc["finished"]))
        return RolloutResult(system, hosts, image_bytes, self.cap, round(max(finished) - go_at, 2),
                             round(statistics.median(durations), 2), round(percentile(durations, 0.99), 2),
                             egress, errors, *peer_bytes, ip_version=6 if self.ipv6 and system == "shoal" else 4,
                             cpu_idle_percent=round(100 * (idle1 - idle0) / max(total1 - total0, 1), 1))

    def zone_of(self, i: int, hosts: int) -> str:
        """The zone of the i-th of `hosts` hosts: the hosts split into `zones` equal runs."""
        return f"z{i * self.zones // hosts}"

    def _peer_bytes(self, nodes: list[Host]) -> tuple[int, int]:
        agents = seeder = 0
        for node in nodes:
            metrics = protocol.METRICS.url(self.agent_url)
            text = subprocess.run(node.cmd("curl", "-g", "-s", metrics), capture_output=True,
                                  text=True, timeout=10).stdout
            for line in text.splitlines():
                if line.startswith('shoal_agent_swarm_download_bytes_total{peer="agent"}'):
                    agents += int(float(line.split()[-1]))
                if line.startswith('shoal_agent_swarm_download_bytes_total{peer="seeder"}'):
                    seeder += int(float(line.split()[-1]))
        return agents, seeder

    def _shoal(self, run_dir: Path, nodes: list[Host]) -> list[services.Service]:
        reg = self.addr(self.registry_host)
        upstream = {"name": f"{REGISTRY_IP}:5000", "url": f"http://{netaddr.hostport(reg, 5000)}"}
        tracker_url, origin_url = f"http://{netaddr.hostport(reg, 6969)}", f"http://{netaddr.hostport(reg, 6970)}"
        cluster = Cluster(self.keys, [upstream], tracker_url=tracker_url, origin_url=origin_url,
                          log={"level": self.log_level})
        tracker = services.shoal(self.registry_host, "tracker", "tracker", run_dir, cluster.tracker(
            listen=netaddr.hostport(reg, 6969), **merged({"interval": "10s", "min_interval": "1s",
                                                          "log": {"level": "warning"}}, self.tracker_config),
        )).start(protocol.READYZ.url(tracker_url))
        origin = services.shoal(self.registry_host, "origin", "origin", run_dir, cluster.origin(
            listen=netaddr.hostport(reg, 6970), data_dir=run_dir / "origin",
            torrent_listen=netaddr.hostport(reg, 6881), **self.origin_config)).start(protocol.READYZ.url(origin_url))
        agents = []
        for i, node in enumerate(nodes):
            zone = {"zone": self.zone_of(i, len(nodes))} if self.zones else {}
            agents.append(services.shoal(node, "agent", f"agent-{node.name}", run_dir, cluster.agent(
                listen=self.agent_url.removeprefix("http://"), data_dir=run_dir / node.name,
                torrent_listen=netaddr.hostport(self.addr(node), 6881),
                **merged({"node": node.name, "swarm": {"first_piece_timeout": "30s", "stall_timeout": "30s"},
                          **zone}, self.agent_config))))
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.wait(protocol.READYZ.url(self.agent_url), (200,))
        time.sleep(1.0)  # swarm tokens
        return [tracker, origin, *agents]
