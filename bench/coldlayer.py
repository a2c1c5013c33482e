"""One node, one big cold layer (issue 16 part 4): time to the first body byte and to the last,
through an agent whose origin has never seen the blob, against the registry itself; then a
second agent fetching it from the first and the origin. Run from this tree:

    python -m bench.coldlayer --tree /path/to/old/worktree --tree . --size 1GiB --rounds 3

Each round, for each tree in turn: the registry (Debian's docker-registry, htpasswd, on
loopback; one for the whole run) holds an image of one `--size` layer. A GET straight from the
registry (alice's login) is timed first, then a tracker, an origin and two agents (node mode) of
that tree start fresh; agent 1 GETs the layer (cold: the origin fetches it from the registry),
then agent 2 (the origin and agent 1 seed it). Every body is hashed against its digest. CPU idle
of the machine is recorded beside each fetch (bench.sampler's /proc/stat reader), and, from the
request until the agent has the blob in its cache (its file in blobs/: the commit's hash done),
the time and the CPU seconds of that agent and of the origin (/proc/PID/stat, all threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.admission import USERS, cluster, get
from bench.sampler import cpu_jiffies
from shoal.config import parse_size
from shoal.registry import Credentials
from tests.support.images import build_image, push
from tests.support.procs import proc_stats, wait_for
from tests.support.registry import Registry


@dataclass
class Fetch:
    tree: str
    round: int
    path: str  # "registry", "cold agent" (the origin fetches), "second agent" (from the swarm)
    first_byte: float
    total: float
    cpu_idle: float  # share of the machine's CPU idle during the fetch
    cached: float = 0.0  # from the request until the blob is in the agent's cache (s)
    agent_cpu: float = 0.0  # the agent's CPU seconds over that time
    origin_cpu: float = 0.0  # the origin's


def timed(listen: str, path: str, authorization: str | None, digest: str) -> tuple[float, float, float]:
    idle0, total0 = cpu_jiffies()
    first, total = get(listen, path, authorization, digest)
    idle1, total1 = cpu_jiffies()
    return first, total, (idle1 - idle0) / max(total1 - total0, 1)


def cpu_seconds(pid: int) -> float:
    return proc_stats(pid)[1]


def run_tree(tree: Path, round_no: int, registry: Registry, digest: str, work: Path) -> list[Fetch]:
    alice = Credentials("alice", USERS["alice"]).basic()
    path = f"/v2/bench/app/blobs/{digest}"
    first, total, idle = timed(registry.host, path, alice, digest)
    fetches = [Fetch(str(tree), round_no, "registry", round(first, 4), round(total, 4), round(idle, 3), total)]
    hexd = digest.removeprefix("sha256:")
    pids: dict[str, int] = {}
    with cluster(tree, registry, work, ("node", "node"), pids) as agents:
        for n, (label, listen) in enumerate((("cold agent", agents[0]), ("second agent", agents[1]))):
            started = time.perf_counter()
            agent0, origin0 = cpu_seconds(pids[f"agent{n}"]), cpu_seconds(pids["origin"])
            first, total, idle = timed(listen, path, None, digest)
            cached_file = work / f"agent{n}" / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
            wait_for(cached_file.exists, timeout=300, what=f"{label}: the blob in the cache")
            cached = time.perf_counter() - started
            fetches.append(Fetch(str(tree), round_no, label, round(first, 4), round(total, 4), round(idle, 3),
                                 round(cached, 3), round(cpu_seconds(pids[f"agent{n}"]) - agent0, 2),
                                 round(cpu_seconds(pids["origin"]) - origin0, 2)))
    return fetches


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coldlayer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=None, help="a source tree to measure (repeatable)")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "coldlayer.json"))
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in (args.tree or ["."])]
    size = parse_size(args.size, "--size")
    with tempfile.TemporaryDirectory(prefix="shoal-bench-coldlayer-") as tmp:
        root = Path(tmp)
        registry = Registry(root / "registry", users=USERS)
        registry.start()
        try:
            image = build_image(root / "image", tag="v1", layer_sizes=[size], seed=78)
            push(image, registry=registry.host, repo="bench/app", user="alice", password=USERS["alice"])
            digest = max(image.blobs.values(), key=lambda b: b.size).digest
            fetches: list[Fetch] = []
            for r in range(args.rounds):
                for i, tree in enumerate(trees):
                    fetches += run_tree(tree, r, registry, digest, root / f"r{r}t{i}")
        finally:
            registry.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(f) for f in fetches], indent=1))
    print(f"{'tree':32} {'path':13} {'n':>2} {'first byte p50 (max)':>21} {'whole p50 (max)':>16} {'MB/s':>6} "
          f"{'CPU idle':>8} {'cached p50':>10} {'agent CPU-s':>11} {'origin CPU-s':>12}")
    for tree in trees:
        for label in ("registry", "cold agent", "second agent"):
            rows = [f for f in fetches if f.tree == str(tree) and f.path == label]
            firsts, totals = [f.first_byte for f in rows], [f.total for f in rows]
            print(f"{str(tree)[-32:]:32} {label:13} {len(rows):2} {statistics.median(firsts):13.3f} s "
                  f"({max(firsts):.2f}) {statistics.median(totals):8.2f} s ({max(totals):.1f}) "
                  f"{size / statistics.median(totals) / 1e6:6.0f} {statistics.median(f.cpu_idle for f in rows):8.0%} "
                  f"{statistics.median(f.cached for f in rows):8.2f} s "
                  f"{statistics.median(f.agent_cpu for f in rows):11.2f} "
                  f"{statistics.median(f.origin_cpu for f in rows):12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
