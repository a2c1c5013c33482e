"""A shoal deployment for one test: tracker, origin and agents as separate processes, each agent
on its own loopback address (127.0.0.2, .3, ...) like separate nodes; or, with `ip="::1"`,
everything on IPv6's one loopback address with a port of its own."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from shoal import peercerts, protocol
from shoal.cluster import Cluster, make_keys, merged
from shoal.registry import Credentials
from tests.support import api
from tests.support.procs import Component, free_port
from tests.support.registry import Registry


class Stack:
    def __init__(self, workdir: Path, registry: Registry, *, node_user: tuple[str, str],
                 seeder_user: tuple[str, str], origins: int = 1, origin_replication: int | None = None,
                 ip: str | None = None) -> None:
        """`origins` > 1: that many origins (origin0, origin1, ...) by rendezvous hashing, each
        with its own data_dir (workdir/origin0, ...), started by start_origin(i)."""
        self.workdir = workdir
        # None: 127.0.0.1 for tracker and origin, 127.0.0.(n+2) for agent n. An IPv6 address:
        # every component on it (IPv6 has one loopback address, so nodes share it and libtorrent
        # must accept several connections from one address).
        self.ip = ip
        workdir.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.keys = make_keys(workdir / "keys")
        self.token_file = self.keys["registration_token"]
        self.node_token = self.keys["node_token"].read_text()
        # the local admin operator make_keys creates (audit queries, pre-seeding, seeded blobs)
        self.operator_token = self.keys["operator_token"].read_text()
        self.node_password = workdir / "node.password"
        self.node_password.write_text(node_user[1])
        self.seeder_password = workdir / "seeder.password"
        self.seeder_password.write_text(seeder_user[1])
        self.node_user, self.seeder_user = node_user[0], seeder_user[0]
        base_ip = ip or "127.0.0.1"
        tracker_port, origin_port = free_port(base_ip), free_port(base_ip)
        self.origin_ports = [origin_port] + [free_port(base_ip) for _ in range(origins - 1)]
        self.origin_names = [f"origin{i}" for i in range(origins)] if origins > 1 else []
        self._listen = {"tracker": self.hostport(base_ip, tracker_port),
                        "origin": self.hostport(base_ip, origin_port)}
        self.cluster = Cluster(self.keys, [self.upstream(self.node_user, self.node_password)],
                               tracker_url=f"http://{self._listen['tracker']}",
                               origin_url=f"http://{self._listen['origin']}", log={"level": "debug"},
                               origins=[{"name": n, "url": f"http://{self.hostport(base_ip, p)}"}
                                        for n, p in zip(self.origin_names, self.origin_ports, strict=False)])
        self.origin_replication = origin_replication
        self.components: list[Component] = []
        self.tracker: Component | None = None
        self.origin: Component | None = None
        # several origins: by name (self.origin is the first one started)
        self.origins: dict[str, Component] = {}
        self.agents: list[Component] = []
        self._keys: dict[str, peercerts.NodeKey] = {}  # of the nodes admit() enrolled

    @staticmethod
    def hostport(ip: str, port: int) -> str:
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def _torrent(self, ip: str) -> dict[str, Any]:
        torrent: dict[str, Any] = {"listen": self.hostport(ip, free_port(ip))}
        if self.ip is not None:
            torrent["allow_multiple_connections_per_ip"] = True
        return torrent

    def upstream(self, user: str, password_file: Path) -> dict[str, Any]:
        return {"name": self.registry.host, "url": self.registry.url, "username": user,
                "password": {"file": str(password_file)}}

    def start_tracker(self, *, listen: str | None = None, name: str = "tracker", **extra: Any) -> Component:
        """The tracker; `listen` may differ from the tracker URL the others use (e.g. [::] for a
        dual-stack test). A replica on another port: another `name` too."""
        cfg = self.cluster.tracker(listen=listen or self._listen["tracker"],
                                   **merged({"interval": "5s", "min_interval": "1s"}, extra))
        tracker = Component("tracker", self.workdir, cfg, name=name).start()
        self.components.append(tracker)
        if name == "tracker":
            self.tracker = tracker
        return tracker

    def start_origin(self, i: int = 0, **extra: Any) -> Component:
        """The origin (or, with several, origin `i`)."""
        assert self.tracker is not None
        base: dict[str, Any] = {"upstreams": [self.upstream(self.seeder_user, self.seeder_password)]}
        name = None
        if self.origin_names:
            name = self.origin_names[i]
            if self.origin_replication is not None:
                base["origin_replication"] = self.origin_replication
        torrent = self._torrent(self.ip or "127.0.0.1")
        base["torrent"] = torrent
        cfg = self.cluster.origin(listen=self.hostport(self.ip or "127.0.0.1", self.origin_ports[i]),
                                  data_dir=self.workdir / (name or "origin"),
                                  torrent_listen=torrent.pop("listen"), name=name, **merged(base, extra))
        origin = Component("origin", self.workdir, cfg, name=name).start()
        self.components.append(origin)
        if name is not None:
            self.origins[name] = origin
        if self.origin is None or name is None:
            self.origin = origin
        return origin

    def agent_config(self, n: int, **extra: Any) -> dict[str, Any]:
        ip = self.ip or f"127.0.0.{n + 2}"
        torrent = self._torrent(ip)
        return self.cluster.agent(
            listen=self.hostport(ip, free_port(ip)), data_dir=self.workdir / f"agent{n}",
            torrent_listen=torrent.pop("listen"),
            with_swarm=self.tracker is not None and self.origin is not None,
            **merged({
                **({"origin_replication": self.origin_replication}
                   if self.origin_names and self.origin_replication is not None else {}),
                "torrent": torrent,
                "node": f"node{n}",
                "swarm": {"first_piece_timeout": "5s", "stall_timeout": "5s", "seed_timeout": "60s"},
                # Most tests pull without client credentials, as podman/skopeo do; the pass-through
                # tests set "challenge" themselves.
                "auth": {"unauthenticated": "node"},
            }, extra))

    def start_agent(self, n: int | None = None, **extra: Any) -> Component:
        n = len(self.agents) if n is None else n
        agent = Component("agent", self.workdir, self.agent_config(n, **extra), name=f"agent{n}").start()
        self.components.append(agent)
        self.agents.append(agent)
        return agent

    def start(self, agents: int = 1, **agent_extra: Any) -> Stack:
        self.start_tracker()
        for i in range(len(self.origin_ports)):
            self.start_origin(i)
        for _ in range(agents):
            self.start_agent(**agent_extra)
        return self

    def admit(self, digest: str, *, node: str = "tester", key: peercerts.NodeKey | None = None,
              credential: str | bool | None = True, repository: str = "private/app"
              ) -> tuple[protocol.Admission, peercerts.NodeKey]:
        """What a node gets when it is admitted to a blob's swarm (enrolling `node` with `key`,
        a fresh one by default): the metainfo, and a grant for the key. `credential` is the
        puller's (an Authorization value; None: anonymous; True: the node credentials)."""
        assert self.origin is not None
        key = key or self._keys.setdefault(node, peercerts.NodeKey.generate())
        api.grants(self.origin.url, self.node_token, node, key)
        if credential is True:
            credential = Credentials(self.node_user, self.node_password.read_text()).basic()
        assert credential is None or isinstance(credential, str)
        admission = api.admission(self.origin.url, self.node_token, digest, node, key, self.registry.host,
                                  repository, credential)
        assert admission is not None
        return admission, key

    def journal(self, agent: Component, minimum: int = 1, timeout: float = 30) -> list[dict[str, object]]:
        """The agent's pull journal as the origin's collector has it, once it holds at least
        `minimum` complete events (an event's end arrives after its start)."""
        assert self.origin is not None
        deadline = time.monotonic() + timeout
        while True:
            events = api.audit_events(self.origin.url, self.operator_token, node=str(agent.config["node"]))
            if len(events) >= minimum and all(e["outcome"] != "incomplete" for e in events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"{agent.name}'s journal has {len(events)} complete events, expected {minimum}")
            time.sleep(0.2)

    def close(self) -> None:
        # all at once: a component that had swarm connections takes up to 3 s to stop
        # (shoal.swarm.TLS_CLOSE_GRACE)
        for c in reversed(self.components):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGCONT)
                c.proc.terminate()
        for c in reversed(self.components):
            c.stop()
