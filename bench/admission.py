"""Time to first byte of a cold blob through an agent, for one or more source trees (issue 13:
what per-blob admission adds). Run from this tree:

    python -m bench.admission --tree /path/to/old/worktree --tree . --rounds 3

Each round, for each tree in turn: the registry (Debian's docker-registry, htpasswd, on
loopback; one for the whole run) holds an image of `--blobs` layers of `--size` each. A tracker,
an origin and three agents of that tree start fresh. Agent 1 (node mode) pulls every layer, so
the origin and agent 1 seed them all. Then agent 2 and agent 3 (pass-through: the client sends
alice's Basic login, which the origin has not seen yet when agent 2 asks, and has when agent 3
asks) GET each layer once, in turn: the time from sending the request to the first body byte,
and to the last. Every body is hashed against its digest. Each component runs the tree's own
code (PYTHONPATH = the tree and its .mypy-path); configurations come from this tree, with
`tracker` set for agents (earlier versions need it; this one ignores it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from bench import services
from shoal.cluster import Cluster, make_keys, source_path
from shoal.config import parse_size
from shoal.protocol import READYZ
from shoal.registry import Credentials
from tests.support.images import build_image, push
from tests.support.procs import free_port, wait_http
from tests.support.registry import Registry

USERS = {"alice": "alice-bench-pw", "node": "node-bench-pw", "seeder": "seeder-bench-pw"}
MODULES = {"tracker": "shoal_tracker", "origin": "shoal_origin", "agent": "shoal_agent"}


@dataclass
class Fetch:
    tree: str
    round: int
    agent: str  # "uncached" (the origin has not seen the puller's credential) or "cached"
    digest: str
    first_byte: float
    total: float


def start(tree: Path, name: str, config: dict[str, object], work: Path) -> subprocess.Popen[bytes]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": source_path(tree)}
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen([sys.executable, "-m", MODULES[name.rstrip("0123456789")], "--config", str(path)],
                            stdout=log, stderr=log, env=env, cwd=tree)
    log.close()
    listen = config["listen"]
    assert isinstance(listen, str)
    wait_http(READYZ.url(f"http://{listen}"), ok=(200,), timeout=60, proc=proc)
    return proc


def get(listen: str, path: str, authorization: str | None, digest: str) -> tuple[float, float]:
    host, port = listen.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": authorization} if authorization else {})
        resp = conn.getresponse()
        first = resp.read(1)
        first_byte = time.perf_counter() - started
        body = first + resp.read()
        total = time.perf_counter() - started
    finally:
        conn.close()
    if resp.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise RuntimeError(f"GET {path}: {resp.status}, {len(body)} bytes not matching {digest}")
    return first_byte, total


@contextlib.contextmanager
def cluster(tree: Path, registry: Registry, work: Path, auths: tuple[str, ...],
            pids: dict[str, int] | None = None) -> Iterator[list[str]]:
    """A fresh tracker, origin and one agent per `auths` entry (its `unauthenticated` mode) of
    `tree`, for `registry` (the origin as "seeder", node-mode agents as "node"): the agents'
    addresses, ready and enrolled; all stopped on leaving. `pids` gets each process's pid by
    name (tracker, origin, agent0, ...)."""
    work.mkdir(parents=True)
    (work / "node.pw").write_text(USERS["node"])
    (work / "seeder.pw").write_text(USERS["seeder"])
    up = {"name": registry.host, "url": registry.url}
    tport, oport = free_port(), free_port()
    node_up = {**up, "username": "node", "password": {"file": str(work / "node.pw")}}
    keys = make_keys(work / "keys")
    cfg = Cluster(keys, [node_up], tracker_url=f"http://127.0.0.1:{tport}", origin_url=f"http://127.0.0.1:{oport}",
                  log={"level": "warning"})
    procs = []
    try:
        procs.append(start(tree, "tracker", cfg.tracker(listen=f"127.0.0.1:{tport}", interval="5s",
                                                       min_interval="1s"), work))
        procs.append(start(tree, "origin", cfg.origin(
            listen=f"127.0.0.1:{oport}", data_dir=work / "origin", torrent_listen=f"127.0.0.1:{free_port()}",
            upstreams=[{**up, "username": "seeder", "password": {"file": str(work / "seeder.pw")}}]), work))
        agents = []
        for n, auth in enumerate(auths):
            ip = f"127.0.0.{n + 2}"
            listen = f"{ip}:{free_port(ip)}"
            config = cfg.agent(listen=listen, data_dir=work / f"agent{n}", torrent_listen=f"{ip}:{free_port(ip)}",
                               node=f"node{n}", tracker=cfg.tracker_url, auth={"unauthenticated": auth})
            procs.append(start(tree, f"agent{n}", config, work))
            agents.append(listen)
        if pids is not None:
            pids.update(zip(["tracker", "origin", *(f"agent{n}" for n in range(len(auths)))],
                            (p.pid for p in procs), strict=True))
        time.sleep(1)  # enrollment (the first download also waits for it, up to metainfo_timeout)
        yield agents
    finally:
        services.stop_all(procs)


def run_tree(tree: Path, round_no: int, registry: Registry, layers: list[str], work: Path) -> list[Fetch]:
    with cluster(tree, registry, work, ("node", "challenge", "challenge")) as agents:
        for digest in layers:
            get(agents[0], f"/v2/bench/app/blobs/{digest}", None, digest)
        alice = Credentials("alice", USERS["alice"]).basic()
        fetches = []
        for digest in layers:
            for label, listen in (("uncached", agents[1]), ("cached", agents[2])):
                first, total = get(listen, f"/v2/bench/app/blobs/{digest}", alice, digest)
                fetches.append(Fetch(str(tree), round_no, label, digest, round(first, 4), round(total, 4)))
        return fetches


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=None, help="a source tree to measure (repeatable)")
    parser.add_argument("--blobs", type=int, default=8)
    parser.add_argument("--size", default="4MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "admission.json"))
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in (args.tree or ["."])]
    size = parse_size(args.size, "--size")
    with tempfile.TemporaryDirectory(prefix="shoal-bench-admission-") as tmp:
        root = Path(tmp)
        registry = Registry(root / "registry", users=USERS)
        registry.start()
        try:
            image = build_image(root / "image", tag="v1", layer_sizes=[size + i for i in range(args.blobs)], seed=77)
            push(image, registry=registry.host, repo="bench/app", user="alice", password=USERS["alice"])
            layers = [b.digest for b in image.blobs.values() if b.size >= size]
            fetches: list[Fetch] = []
            for r in range(args.rounds):
                for i, tree in enumerate(trees):
                    fetches += run_tree(tree, r, registry, layers, root / f"r{r}t{i}")
        finally:
            registry.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(f) for f in fetches], indent=1))
    print(f"{'tree':40} {'agent':9} {'n':>3} {'first byte p50':>15} {'p90':>8} {'whole p50':>10}")
    for tree in trees:
        for label in ("uncached", "cached"):
            rows = [f for f in fetches if f.tree == str(tree) and f.agent == label]
            firsts = sorted(f.first_byte for f in rows)
            p90 = firsts[min(len(firsts) - 1, int(0.9 * len(firsts)))]
            print(f"{str(tree)[-40:]:40} {label:9} {len(rows):3} {statistics.median(firsts) * 1000:12.1f} ms "
                  f"{p90 * 1000:5.1f} ms {statistics.median(f.total for f in rows) * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
