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

import contextlib
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import services
from bench.netns import SUBNET, Host, Topology
from bench.sampler import LOW_IDLE, Sampler, cpu_jiffies
from shoal import netaddr, protocol
from shoal.cluster import Cluster, make_keys, merged, source_path

REGISTRY_IP, CACHE_IP = f"{SUBNET}.0.2", f"{SUBNET}.0.3"


def settled_idle(window: float = 1.0, windows: int = 12, within: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep) -> float:
    """The machine's CPU idle % once N started agents have settled: one-second windows until two
    in a row agree within `within` points (at most `windows`), the mean of those two. One 2-s
    window right after start-up once read 49 % idle at N = 64, where the steady state is 90-96 %
    (RESULTS §29)."""
    last = -100.0
    for _ in range(windows):
        idle0, total0 = cpu_jiffies()
        sleep(window)  # a measurement window, not a wait on a condition
        idle1, total1 = cpu_jiffies()
        idle = 100 * (idle1 - idle0) / max(total1 - total0, 1)
        if abs(idle - last) <= within:
            return round((idle + last) / 2, 1)
        last = idle
    return round(last, 1)


@dataclass
class RolloutResult:
    system: str
    hosts: int
    image_bytes: int
    cap_bytes: int
    total_seconds: float  # from the common start (the first wave's) to the last host done
    p50_seconds: float  # per-host times: from the client's first request to its last byte
    p99_seconds: float
    registry_egress_bytes: int
    errors: list[str]
    from_agents_bytes: int = 0  # shoal only: payload the agents got from each other
    from_seeder_bytes: int = 0  # ... and from the origin seeder (the agents' own split, an estimate)
    stall_escapes: int = 0  # shoal only: downloads that asked the tracker for the origin (no piece for a while)
    seeder_drops: int = 0  # shoal only: peers the origin's seeder dropped (shoal/slowpeers.py): 0 for honest hosts
    ip_version: int = 4  # the addresses shoal ran on
    cpu_idle_percent: float = -1.0  # the machine's, from the common start to the last host done
    scenario: str = "create"  # or "rolling" (bench/matrix.py)
    layers: int = 4
    fetch_bytes: int = 0  # what each host had to fetch (the image, or a new version's new blobs)
    p999_seconds: float = 0.0
    max_seconds: float = 0.0
    cpu_low_share: float = 0.0  # share of one-second samples with under 20 % idle
    registry_remote_bytes: int = 0  # registry egress that left its host (not to the origin beside it)
    registry_host_sent_bytes: int = 0  # the registry host's NIC, bytes sent (headers included)
    seeder_upload_bytes: int = 0  # shoal: registry host sent - registry_remote_bytes
    hosts_sent_bytes: int = 0  # the client hosts' NICs together (shoal: what the peers uploaded)
    hosts_received_bytes: int = 0
    waves: int = 1
    wave_hosts: int = 0  # hosts per wave
    wave_starts: list[float] = field(default_factory=list)  # seconds into the timeline
    host_seconds: list[float] = field(default_factory=list)
    timeline: dict[str, Any] = field(default_factory=dict)
    cpu_idle_before_percent: float = -1.0  # everything started and settled, no pull: the idle cost
    startup_seconds: float = 0.0  # the system's start-up before this session's first pull (all agents ready)
    # the machine's, from the first host done to the last: every host finishing at once (its
    # agent's commit, its client's last bytes) can leave this near 0 in a row whose whole-run
    # figure reads link-bound, and then the last hosts' times include waiting for a CPU
    # (bench/RESULTS.md section 31)
    finish_idle_percent: float = -1.0

    @property
    def unit_bytes(self) -> int:
        """What one host needs: the multiples (x S/B, x image) are of this."""
        return self.fetch_bytes or self.image_bytes

    @property
    def ideal_seconds(self) -> float:
        return self.unit_bytes / self.cap_bytes

    @property
    def cpu_bound(self) -> bool:
        return 0 <= self.cpu_idle_percent < LOW_IDLE

    def row(self) -> dict[str, Any]:
        ideal, unit = self.ideal_seconds, self.unit_bytes
        # waves one after the other: at best each takes one host's ideal
        return {**asdict(self), "ideal_seconds": round(ideal, 2), "cpu_bound": self.cpu_bound,
                "all_ideal_seconds": round(self.waves * ideal, 2),
                "ratio_to_ideal": round(self.total_seconds / (self.waves * ideal), 2),
                **{f"{q}_x": round(getattr(self, f"{q}_seconds") / ideal, 2) for q in ("p50", "p99", "p999", "max")},
                "egress_ratio": round(self.registry_egress_bytes / unit, 3),
                "seeder_ratio": round(self.seeder_upload_bytes / unit, 3),
                "peers_ratio": round(self.hosts_sent_bytes / unit, 3),
                # what crossed the hosts' NICs against what they needed: above 1, bytes sent twice
                "received_ratio": round(self.hosts_received_bytes / (self.hosts * unit), 3),
                # rolling update: the hosts after the first wave join a swarm that has the blob
                "joined_max_x": round(max(self.host_seconds[self.wave_hosts:] or [0.0]) / ideal, 2)
                if self.waves > 1 else None}


@dataclass(frozen=True)
class Pull:
    """One measured pull of `ref` by every host of a session, `wave` hosts at a time (0: all at once)."""

    ref: str
    image_bytes: int
    fetch_bytes: int  # what each host fetches (image_bytes less the blobs in `skip`)
    skip: tuple[str, ...] = ()  # digests every host already has
    wave: int = 0
    scenario: str = "create"
    layers: int = 4


def _scrape(host: Host, base_url: str) -> list[str]:
    """The lines of a shoal component's /metrics, fetched from inside `host`."""
    return subprocess.run(host.cmd("curl", "-g", "-s", protocol.METRICS.url(base_url)), capture_output=True,
                          text=True, timeout=10).stdout.splitlines()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 64 hosts p99 and p99.9 are the slowest host, as they are."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Rollout:
    def __init__(self, work: Path, topo: Topology, cap: int, max_hosts: int, *,
                 origin_config: dict[str, Any] | None = None, agent_config: dict[str, Any] | None = None,
                 log_level: str = "warning", sample_interval: float = 0.5) -> None:
        self.work, self.topo, self.cap = work, topo, cap
        # Overrides merged into the generated configs, for tuning experiments.
        self.origin_config = origin_config or {}
        self.agent_config = agent_config or {}
        self.log_level = log_level
        self.sample_interval = sample_interval
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
        """A cold rollout: every host pulls `image` at once."""
        return self.session(system, hosts, [Pull(image, image_bytes, image_bytes)])[0]

    def session(self, system: str, hosts: int, pulls: list[Pull], label: str = "") -> list[RolloutResult]:
        """Start `system` fresh (empty caches), measure each of `pulls` in turn on the same hosts
        (a rolling update follows the create it updates), stop it and delete its caches."""
        name = label or pulls[0].ref.replace("/", "_").replace(":", "_")
        run_dir = self.work / f"{system}-{hosts}-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        nodes = self.nodes[:hosts]
        started: list[services.Service] = []
        results = []
        t0 = time.monotonic()
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
            startup = round(time.monotonic() - t0, 1)
            before = settled_idle()
            for n, pull in enumerate(pulls):
                results.append(self._pull(system, run_dir / f"pull{n}", nodes, endpoints, pull))
                results[-1].startup_seconds, results[-1].cpu_idle_before_percent = startup, before
        finally:
            for service in reversed(started):
                service.stop()
            # The caches of a finished run go (logs and client results stay): a full matrix
            # would otherwise keep N copies of every image on disk, about 40 GiB, and a full disk
            # turns later runs into fallbacks and errors.
            for data in run_dir.iterdir():
                if data.is_dir() and not data.name.startswith("pull"):
                    shutil.rmtree(data, ignore_errors=True)
        return results

    def _clients(self, pull_dir: Path, nodes: list[Host], endpoints: list[str],
                 pull: Pull) -> list[tuple[Path, subprocess.Popen[bytes]]]:
        """One client per host, loaded and waiting for its start time on stdin."""
        clients = []
        skip = ["--skip", ",".join(pull.skip)] if pull.skip else []
        for node, endpoint in zip(nodes, endpoints, strict=True):
            out = pull_dir / f"client-{node.name}.json"
            with open(pull_dir / f"client-{node.name}.log", "ab") as log:
                clients.append((out, subprocess.Popen(
                    node.cmd(sys.executable, "-m", "bench.client", "--endpoint", endpoint, "--image", pull.ref,
                             "--go-stdin", "--out", str(out), *skip),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    env={**os.environ, "PYTHONPATH": source_path(services.ROOT)})))
        # 64 Pythons loading aiohttp take seconds on two cores: start when the last is ready,
        # not at a guessed instant some would miss
        deadline = time.monotonic() + 120 + 2 * len(nodes)
        waiting = {proc.stdout.fileno(): proc for _, proc in clients if proc.stdout}
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting), [], [], 1.0)
            for fd in ready:
                waiting.pop(fd).stdout.readline()  # type: ignore[union-attr]  # "ready" or EOF
        if waiting:
            for _, proc in clients:
                proc.kill()
                proc.wait()
            raise TimeoutError(f"{len(waiting)} clients not ready")
        return clients

    def _pull(self, system: str, pull_dir: Path, nodes: list[Host], endpoints: list[str],
              pull: Pull) -> RolloutResult:
        pull_dir.mkdir(parents=True)
        local = {REGISTRY_IP, *([self.registry_host.ip6] if self.registry_host.ip6 else []), "127.0.0.1", "::1"}
        egress_before = services.registry_bytes(self.registry.log, local)
        peers_before = self._agent_counts(nodes) if system == "shoal" else (0, 0, 0)
        drops_before = self._seeder_drops() if system == "shoal" else 0
        clients = self._clients(pull_dir, nodes, endpoints, pull)
        size = pull.wave or len(nodes)
        waves = [clients[i:i + size] for i in range(0, len(clients), size)]
        watched = [self.registry_host.name, self.cache_host.name, *(n.name for n in nodes)]
        go_at = 0.0
        wave_starts: list[float] = []
        with Sampler(watched, self.sample_interval) as sampler:
            for wave in waves:
                start = time.time() + 0.2
                go_at = go_at or start
                wave_starts.append(round(start - sampler.timeline.t0, 3))
                for _, proc in wave:
                    assert proc.stdin is not None
                    with contextlib.suppress(OSError):  # a client that died reports "no result"
                        proc.stdin.write(f"{start}\n".encode())
                        proc.stdin.close()
                for _, proc in wave:  # the next wave starts when this one is done
                    proc.wait(7200)
        time.sleep(1.5)  # the registry logs a response after it is sent
        egress = [a - b for a, b in zip(services.registry_bytes(self.registry.log, local), egress_before,
                                        strict=True)]
        agents, seeder, escapes, drops = 0, 0, 0, 0
        if system == "shoal":
            agents, seeder, escapes = (a - b for a, b in zip(self._agent_counts(nodes), peers_before, strict=True))
            drops = self._seeder_drops() - drops_before
        timeline = sampler.timeline
        host_sent = timeline.delta(self.registry_host.name)[0]
        hosts_sent = sum(timeline.delta(n.name)[0] for n in nodes)
        hosts_received = sum(timeline.delta(n.name)[1] for n in nodes)
        durations: list[float] = []
        errors: list[str] = []
        finished: list[float] = []
        for out, proc in clients:
            if proc.stdout:
                proc.stdout.close()
            doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {
                "errors": ["no result"], "started": go_at, "finished": time.time()}
            errors += [str(e) for e in doc["errors"]]
            durations.append(round(float(doc["finished"]) - float(doc["started"]), 3))
            finished.append(float(doc["finished"]))
        return RolloutResult(
            system, len(nodes), pull.image_bytes, self.cap, round(max(finished) - go_at, 2),
            round(statistics.median(durations), 2), round(percentile(durations, 0.99), 2),
            egress[0], errors, agents, seeder, stall_escapes=escapes, seeder_drops=drops,
            ip_version=6 if self.ipv6 and system == "shoal" else 4,
            cpu_idle_percent=timeline.idle_percent(), scenario=pull.scenario, layers=pull.layers,
            fetch_bytes=pull.fetch_bytes, p999_seconds=round(percentile(durations, 0.999), 2),
            max_seconds=round(max(durations), 2), cpu_low_share=timeline.low_idle_share(),
            registry_remote_bytes=egress[1], registry_host_sent_bytes=host_sent,
            seeder_upload_bytes=max(0, host_sent - egress[1]) if system == "shoal" else 0,
            hosts_sent_bytes=hosts_sent, hosts_received_bytes=hosts_received,
            waves=len(waves), wave_hosts=size, wave_starts=wave_starts, host_seconds=durations,
            timeline=timeline.to_json(), finish_idle_percent=timeline.idle_between(min(finished), max(finished)))

    def zone_of(self, i: int, hosts: int) -> str:
        """The zone of the i-th of `hosts` hosts: the hosts split into `zones` equal runs."""
        return f"z{i * self.zones // hosts}"

    def _agent_counts(self, nodes: list[Host]) -> tuple[int, int, int]:
        """Summed over the agents: swarm payload from agents, from the seeder; stall escapes."""
        agents = seeder = escapes = 0
        for node in nodes:
            for line in _scrape(node, self.agent_url):
                if line.startswith('shoal_agent_swarm_download_bytes_total{peer="agent"}'):
                    agents += int(float(line.split()[-1]))
                if line.startswith('shoal_agent_swarm_download_bytes_total{peer="seeder"}'):
                    seeder += int(float(line.split()[-1]))
                if line.startswith("shoal_agent_swarm_stall_escapes_total "):
                    escapes += int(float(line.split()[-1]))
        return agents, seeder, escapes

    def _seeder_drops(self) -> int:
        """Peers the origin's seeder dropped so far, for holding a slot without reading or for
        sending it pieces."""
        origin = f"http://{netaddr.hostport(self.addr(self.registry_host), 6970)}"
        for line in _scrape(self.registry_host, origin):
            if line.startswith("shoal_origin_swarm_slow_peers_dropped_total "):
                return int(float(line.split()[-1]))
        raise RuntimeError(f"no seeder drop count in {origin}'s metrics")

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
        for agent in agents:  # 64 agents loading libtorrent at once take a while on two cores
            agent.wait(protocol.READYZ.url(self.agent_url), (200,), timeout=60 + 3 * len(agents))
        time.sleep(1.0)  # swarm tokens
        return [tracker, origin, *agents]
