"""CPU per byte alone: the uncapped swarm (bench/uncapped.py) and the libtorrent pair
(bench/ltpair.py) on one blob, without the namespaces and rollouts of `python -m bench`.

    flock /tmp/bench16.lock python bench/cpu.py --size 256MiB --runs 3 [--trees old=DIR,new=DIR]

The agents, tracker and origin run from PYTHONPATH (`<tree>:<tree>/.mypy-path` picks a source
tree); with --trees each run goes through the trees in turn (a worktree of another commit
measures that commit), the image built and pushed once. Prints one JSON line per run and tree,
with the machine's CPU idle over it (from /proc/stat)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench import ltpair, uncapped
from bench.sampler import cpu_jiffies
from shoal.config import parse_size
from tests.support.images import build_image, push
from tests.support.registry import Registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="256MiB", help="the blob's size (one layer)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--skip-pair", action="store_true", help="the uncapped swarm only")
    parser.add_argument("--trees", default="", help="NAME=DIR,...: source trees to alternate (default: PYTHONPATH)")
    args = parser.parse_args()
    size = parse_size(args.size, "--size")
    work = Path(tempfile.mkdtemp(prefix="shoal-cpu-"))
    registry = Registry(work / "registry", users={})
    try:
        registry.start()
        image = build_image(work / "image", tag="v1", layer_sizes=[size], seed=7)
        push(image, registry=registry.host, repo="bench/cpu")
        blob = max(image.blobs.values(), key=lambda b: b.size)
        trees = [t.split("=", 1) for t in args.trees.split(",") if t] or [["", ""]]
        for run in range(args.runs):
            for name, tree in trees:
                if tree:
                    os.environ["PYTHONPATH"] = f"{tree}:{tree}/.mypy-path"  # the services' code
                idle0, all0 = cpu_jiffies()
                u = uncapped.run(work / f"uncapped-{run}", registry_host=registry.host, repo="bench/cpu",
                                 blob=(blob.digest, blob.size), agents=args.agents)
                idle1, all1 = cpu_jiffies()
                row = {"run": run + 1, "tree": name, "uncapped": asdict(u),
                       "uncapped_cpu_idle_pct": round(100 * (idle1 - idle0) / max(all1 - all0, 1), 1)}
                print(json.dumps(row), flush=True)
                shutil.rmtree(work / f"uncapped-{run}", ignore_errors=True)
            if not args.skip_pair:
                idle1, all1 = cpu_jiffies()
                pair = ltpair.run(work / "ltpair", blob=blob.path, digest=blob.digest)
                idle2, all2 = cpu_jiffies()
                print(json.dumps({"run": run + 1, "pair": asdict(pair),
                                  "pair_cpu_idle_pct": round(100 * (idle2 - idle1) / max(all2 - all1, 1), 1)}),
                      flush=True)
    finally:
        registry.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
