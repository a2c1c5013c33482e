"""How long a containerd pull takes when the agent is not there to serve it (issue 14: "mirrors
that hang containerd"). Run from this tree:

    python -m bench.hangs --rounds 5

A real containerd 1.6 (ctr images pull --hosts-dir, native snapshotter) pulls a fresh image of
`--size` (one layer plus a small one) from Debian's docker-registry (htpasswd) on loopback, with
an agent that manages the hosts directory (containerd.config_path, check_interval 1 s, the
default). Each case pulls its own image, so every blob crosses the network:

- registry: no agent ever started, no hosts.toml (the registry's own time; also "not started")
- agent: through the ready agent (cold cache)
- killed: the agent SIGKILLed (its watchdog reduces the file)
- killed-both: the agent and its watchdog SIGKILLed (the file still names the dead agent)
- hung-after: the agent SIGSTOPped; the pull starts once the watchdog has reduced the file
- hung-at-once: the pull starts 0.1 s after SIGSTOP, before the watchdog notices; the agent is
  killed `--kill-after` seconds after the hang (what a liveness probe or systemd's WatchdogSec=
  does) and the time the pull took is reported
Also the time from SIGSTOP to the reduced file, and the machine's CPU idle over each case.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

from bench.sampler import cpu_jiffies
from shoal.config import parse_size
from tests.support.clients import Containerd
from tests.support.images import build_image, push
from tests.support.procs import Component, free_port, wait_for
from tests.support.registry import Registry

USERS = {"alice": "alice-bench-pw"}
CASES = ("registry", "agent", "killed", "killed-both", "hung-after", "hung-at-once")


class Bench:
    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.registry = Registry(root / "registry", users=USERS)
        self.containerd = Containerd(root / "containerd")
        self.certs = root / "certs.d"
        self.images = 0

    def image(self) -> str:
        self.images += 1
        repo = f"bench/hangs{self.images}"
        image = build_image(self.root / "images" / repo, tag="v1", layer_sizes=[self.size, 100_000],
                            seed=9000 + self.images)
        push(image, registry=self.registry.host, repo=repo, user="alice", password=USERS["alice"])
        return f"{self.registry.host}/{repo}:v1"

    def pull(self, ref: str) -> float:
        started = time.perf_counter()
        self.containerd.ctr("images", "pull", "--hosts-dir", str(self.certs), "--snapshotter", "native",
                            "--user", f"alice:{USERS['alice']}", ref)
        return time.perf_counter() - started

    def agent(self) -> Component:
        ip = "127.0.0.2"
        config = {"listen": f"{ip}:{free_port(ip)}", "data_dir": str(self.root / f"agent{self.images}"),
                  "node": "bench", "upstreams": [{"name": self.registry.host, "url": self.registry.url}],
                  "auth": {"unauthenticated": "challenge"}, "log": {"level": "warning"},
                  "containerd": {"config_path": str(self.certs)}}
        agent = Component("agent", self.root, config, name=f"agent{self.images}").start()
        wait_for(lambda: self.mirroring(agent), timeout=30, what="hosts.toml")
        return agent

    def hosts(self) -> dict[str, object] | None:
        try:
            return tomllib.loads((self.certs / self.registry.host / "hosts.toml").read_text())
        except FileNotFoundError:
            return None

    def mirroring(self, agent: Component) -> bool:
        doc = self.hosts()
        return doc is not None and agent.url in doc.get("host", {})  # type: ignore[operator]

    def reduced(self) -> bool:
        return self.hosts() == {"server": self.registry.url}

    def case(self, name: str, kill_after: float) -> dict[str, float]:
        ref = self.image()
        out: dict[str, float] = {}
        if name == "registry":
            out["pull"] = self.pull(ref)
            return out
        agent = self.agent()
        assert agent.proc is not None
        try:
            if name == "agent":
                out["pull"] = self.pull(ref)
            elif name == "killed":
                agent.proc.kill()
                agent.proc.wait()
                out["pull"] = self.pull(ref)
            elif name == "killed-both":
                watchdogs = subprocess.run(["pgrep", "-P", str(agent.proc.pid)], capture_output=True,
                                           text=True).stdout.split()
                for pid in [str(agent.proc.pid), *watchdogs]:
                    subprocess.run(["kill", "-KILL", pid], check=False)
                agent.proc.wait()
                assert self.mirroring(agent)  # the file still names the dead agent
                out["pull"] = self.pull(ref)
            elif name == "hung-after":
                stopped = time.perf_counter()
                agent.signal(signal.SIGSTOP)
                wait_for(self.reduced, timeout=30, what="reduced")
                out["reduced_after"] = time.perf_counter() - stopped
                out["pull"] = self.pull(ref)
            elif name == "hung-at-once":
                agent.signal(signal.SIGSTOP)
                killer = threading.Timer(kill_after, agent.proc.kill)
                killer.start()
                time.sleep(0.1)  # the pull starts while the hosts.toml still names the agent
                out["pull"] = self.pull(ref)
                killer.join()
        finally:
            agent.stop(kill=True)
        return out

    def run(self, rounds: int, kill_after: float) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        self.certs.mkdir()
        self.registry.start()
        self.containerd.workdir.mkdir()
        self.containerd.start()
        try:
            for r in range(rounds):
                for name in CASES:
                    idle0, total0 = cpu_jiffies()
                    result = self.case(name, kill_after)
                    idle1, total1 = cpu_jiffies()
                    rows.append({"round": r, "case": name, **{k: round(v, 3) for k, v in result.items()},
                                 "cpu_idle_percent": round(100 * (idle1 - idle0) / max(total1 - total0, 1), 1)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            self.containerd.close()
            self.registry.close()
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hangs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="32MiB")
    parser.add_argument("--kill-after", type=float, default=10.0,
                        help="seconds from the hang to the kill in hung-at-once (a liveness probe's delay)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "hangs.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-hangs-") as tmp:
        rows = Bench(Path(tmp), parse_size(args.size, "--size")).run(args.rounds, args.kill_after)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    base = statistics.median(float(r["pull"]) for r in rows if r["case"] == "registry")  # type: ignore[arg-type]
    print(f"{'case':14} {'pull p50':>9} {'max':>7} {'vs registry':>12} {'reduced after':>14} {'CPU idle':>9}")
    for name in CASES:
        sel = [r for r in rows if r["case"] == name]
        pulls = [float(r["pull"]) for r in sel]  # type: ignore[arg-type]
        reduced = [float(r["reduced_after"]) for r in sel if "reduced_after" in r]  # type: ignore[arg-type]
        idle = statistics.mean(float(r["cpu_idle_percent"]) for r in sel)  # type: ignore[arg-type]
        p50 = statistics.median(pulls)
        print(f"{name:14} {p50:8.2f}s {max(pulls):6.2f}s {p50 - base:+11.2f}s "
              f"{(f'{statistics.median(reduced):.2f}s' if reduced else '-'):>14} {idle:8.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
