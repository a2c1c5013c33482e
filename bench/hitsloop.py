"""Cache hits and manifests on loopback alone (bench.hits without the rollout's network): the
registry (Debian's docker-registry, no auth) on 127.0.0.1, the agent, nginx and the central
cache as in bench.hits. Run from the tree to measure (its agent is the one started):

    python -m bench.hitsloop --seconds 10 --rounds 3

Prints, per round, small blob p50/p99 (agent, nginx, central), the agent's CPU per small-blob
request, and the manifest latency the agent adds at p50/p99 over the registry's own, with the
machine's CPU idle over the round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench import hits
from bench.sampler import cpu_jiffies
from tests.support.images import build_image, push
from tests.support.registry import Registry

MIB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hitsloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "hitsloop.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shoal-bench-hitsloop-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # nginx's worker (www-data) reads the copies under it
        registry = Registry(root / "registry", users={})
        registry.start()
        try:
            image = build_image(root / "image", tag="v1", layer_sizes=[64 * MIB, 4096], seed=79)
            push(image, registry=registry.host, repo="bench/hits")
            large = max(image.blobs.values(), key=lambda b: b.size)
            small = min(image.blobs.values(), key=lambda b: b.size)
            for r in range(args.rounds):
                idle0, total0 = cpu_jiffies()
                row = hits.run(root / f"r{r}", registry_url=registry.url, repo="bench/hits",
                               manifest_digest=image.digest, large=(large.digest, large.size),
                               small=small.digest, seconds=args.seconds).row()
                idle1, total1 = cpu_jiffies()
                row["cpu_idle"] = round((idle1 - idle0) / max(total1 - total0, 1), 3)
                rows.append(row)
                print(f"round {r + 1}: small blob p50/p99 agent {row['small_p50_ms']['agent']:.2f}/"
                      f"{row['small_p99_ms']['agent']:.2f} ms, nginx {row['small_p50_ms']['nginx']:.2f}/"
                      f"{row['small_p99_ms']['nginx']:.2f} ms, central {row['small_p50_ms']['central']:.2f} ms; "
                      f"manifest added p50/p99 {row['manifest_added_p50_ms']:.2f}/{row['manifest_added_p99_ms']:.2f} "
                      f"ms; agent CPU per small request {row['agent_cpu_ms_per_small_request']:.3f} ms; "
                      f"errors {row['errors']}; CPU idle {row['cpu_idle']:.0%}", flush=True)
        finally:
            registry.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
