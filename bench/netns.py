"""Emulated hosts: one network namespace per host on a shared bridge, each NIC capped with tc.

Every host gets a veth pair: `eth0` inside its namespace, the other end on the bridge `shb0` in
the root namespace. A token bucket (tbf) on both ends caps the host's upload (eth0 egress) and
download (bridge-side egress) at B, as a physical NIC of B would. Loopback inside a namespace is
not capped, so a client and the agent on the same host talk at memory speed, as on a real node.

With `ipv6=True` every host also gets a ULA address (fd00:88::/64, `Host.ip6`) on the same NIC
and the bridge fd00:88::1, so a rollout can run over IPv6 through the same caps (issue 15).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

BRIDGE = "shb0"
PREFIX = "shb-"
# Not 10.88: podman's default network is 10.88.0.0/16, and where a cni-podman0 bridge holds that
# route (even link-down) the root namespace cannot reach the hosts. SHOAL_BENCH_SUBNET moves them.
SUBNET = os.environ.get("SHOAL_BENCH_SUBNET", "10.199")
SUBNET6 = "fd00:88::"  # a ULA /64 (fd00::/8): never routed off the machine


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    cap_bytes: int | None  # bytes per second each way, None: uncapped
    ip6: str | None = None  # the host's ULA address when the topology has IPv6

    @property
    def netns(self) -> str:
        return PREFIX + self.name

    def cmd(self, *args: str) -> list[str]:
        """A command line that runs inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def popen(self, args: Sequence[str], *, log: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(self.cmd(*args), stdout=out, stderr=out, env={**os.environ, **(env or {})})
        out.close()
        return proc

    def tx_bytes(self) -> int:
        """Bytes this host sent on its NIC so far."""
        stats = sh(*self.cmd("cat", "/sys/class/net/eth0/statistics/tx_bytes")).stdout
        return int(stats.strip())


def _tbf(dev: str, rate: int, ns: str | None = None) -> None:
    # 10 ms worth, at least 256 KiB: enough for the kernel timer at 20 MB/s and above. At the low
    # caps that keep 64 hosts link-bound (1.25 MB/s) 256 KiB would be 200 ms of free line rate,
    # 40 % of the smallest scaled image (bench/matrix.py); there the bucket holds 50 ms, at least
    # 64 KiB (one GSO segment; tbf splits larger ones).
    burst = max(min(256 << 10, rate // 20), rate // 100, 64 << 10)
    base = ["ip", "netns", "exec", ns] if ns else []
    sh(*base, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate * 8}bit",
       "burst", str(burst), "latency", "100ms")


def _outer_links() -> list[str]:
    """The root namespace's links named like a host's outer veth end."""
    lines = sh("ip", "-o", "link", "show", check=False).stdout.splitlines()
    names = (line.split(": ")[1].split("@")[0] for line in lines if ": " in line)
    return [n for n in names if n.startswith(PREFIX)]


def ip6_of(ip: str) -> str:
    """The ULA address beside an IPv4 one: 10.88.1.4 -> fd00:88::1:4 (the last two octets)."""
    a, b = ip.split(".")[2:]
    return str(ipaddress.ip_address(f"{SUBNET6}{int(a):x}:{int(b):x}"))  # compressed: fd00:88::2


class Topology:
    def __init__(self, *, ipv6: bool = False) -> None:
        self.hosts: dict[str, Host] = {}
        self.ipv6 = ipv6

    def __enter__(self) -> Topology:
        self.teardown()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.0.1/16", "dev", BRIDGE)
        if self.ipv6:
            # nodad: usable at once (duplicate address detection would hold it a second or two)
            sh("ip", "-6", "addr", "add", f"{ip6_of(f'{SUBNET}.0.1')}/64", "dev", BRIDGE, "nodad")
        sh("ip", "link", "set", BRIDGE, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def add(self, name: str, ip: str, cap_bytes: int | None) -> Host:
        host = Host(name, ip, cap_bytes, ip6_of(ip) if self.ipv6 else None)
        outer = (PREFIX + name)[:15]
        sh("ip", "netns", "add", host.netns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        sh("ip", "link", "set", outer, "master", BRIDGE)
        sh("ip", "link", "set", outer, "up")
        sh(*host.cmd("ip", "addr", "add", f"{ip}/16", "dev", "eth0"))
        if host.ip6:
            sh(*host.cmd("ip", "-6", "addr", "add", f"{host.ip6}/64", "dev", "eth0", "nodad"))
        sh(*host.cmd("ip", "link", "set", "eth0", "up"))
        sh(*host.cmd("ip", "link", "set", "lo", "up"))
        if cap_bytes:
            _tbf("eth0", cap_bytes, host.netns)
            _tbf(outer, cap_bytes)
        self.hosts[name] = host
        return host

    def uncap(self, name: str) -> None:
        host = self.hosts[name]
        sh(*host.cmd("tc", "qdisc", "del", "dev", "eth0", "root"), check=False)
        sh("tc", "qdisc", "del", "dev", (PREFIX + name)[:15], "root", check=False)

    def recap(self, name: str) -> None:
        """Cap `name` again at the rate it was added with (after `uncap`)."""
        host = self.hosts[name]
        if host.cap_bytes:
            _tbf("eth0", host.cap_bytes, host.netns)
            _tbf((PREFIX + name)[:15], host.cap_bytes)

    def teardown(self) -> None:
        for ns in sh("ip", "netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith(PREFIX):
                for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
                sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        # A namespace goes only once the processes killed in it have exited, and its veth's
        # outer end with it: a run started right after a killed one failed to add `shb-h2`
        # ("File exists"). Deleting the outer ends removes both ends at once.
        deadline = time.monotonic() + 30
        while (left := _outer_links()) and time.monotonic() < deadline:
            for link in left:
                sh("ip", "link", "del", link, check=False)
            time.sleep(0.1)  # (bounded: 30 s)
        self.hosts.clear()
