"""One command for every benchmark: `python -m bench` (as root: it creates network namespaces).

Writes bench/out/results.json, bench/out/results.md (the table printed at the end) and PNG plots.
`--quick` runs a reduced matrix (256 MiB, N = 4 and 16) in a few minutes; the default runs the
whole matrix of the issue (256 MiB and 1 GiB, N = 4, 8, 16), which takes over an hour with the
baselines' N * S / B times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import hits, ltpair, trackers, uncapped
from bench.netns import Topology
from bench.report import plot, table
from bench.rollout import REGISTRY_IP, Rollout
from shoal.config import parse_size
from tests.support.images import Image, build_image, push

MIB = 1 << 20


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    registry = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.strip()
    import libtorrent as lt

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "libtorrent": lt.__version__, "registry": registry,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def build(work: Path, size: int, seed: int) -> Image:
    layer = size // 4
    return build_image(work / f"image-{size >> 20}m", tag="v1", layer_sizes=[layer] * 4, seed=seed)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    parser.add_argument("--quick", action="store_true", help="256 MiB only, N = 4 and 16")
    parser.add_argument("--cap", default="20MB", help="per-host NIC cap B, bytes per second (default 20MB)")
    parser.add_argument("--hosts", default=None, help="comma-separated N values (default 4,8,16)")
    parser.add_argument("--sizes", default=None, help="comma-separated image sizes (default 256MiB,1GiB)")
    parser.add_argument("--systems", default="direct,central,shoal")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: rollout,hits,tracker,uncapped")
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk measurement")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--origin-config", type=json.loads, default={},
                        help='JSON merged into the origin\'s config, e.g. {"torrent": {"libtorrent": {...}}}')
    parser.add_argument("--agent-config", type=json.loads, default={},
                        help='JSON merged into every agent\'s config, e.g. {"prefetch": {"enabled": false}}')
    parser.add_argument("--uncapped-agents", type=int, default=4, help="agents in the uncapped swarm (default 4)")
    parser.add_argument("--libtorrent", type=json.loads, default={},
                        help="JSON libtorrent settings for the uncapped swarm's agents and origin")
    parser.add_argument("--repeat", type=int, default=1, help="cold rollouts per (system, N, size); all reported")
    parser.add_argument("--log-level", default="warning", help="log level of shoal's services")
    parser.add_argument("--ipv6", action="store_true",
                        help="give the emulated hosts ULA addresses (fd00:88::/64) and run shoal's rollouts over IPv6")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("python -m bench: needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    # a terminated run still tears down its namespaces and processes (the finally blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    cap = parse_size(args.cap, "--cap")
    hosts = [int(h) for h in (args.hosts or ("4,16" if args.quick else "4,8,16")).split(",")]
    sizes = [parse_size(s, "--sizes") for s in (args.sizes or ("256MiB" if args.quick else "256MiB,1GiB")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]]),
                               "cap_bytes": cap}
    print(f"machine: {results['machine']}", flush=True)

    with Topology(ipv6=args.ipv6) as topo:
        rollout = Rollout(work / "rollout", topo, cap, max(hosts), origin_config=args.origin_config,
                          agent_config=args.agent_config, log_level=args.log_level)
        try:
            images = {}
            for n, size in enumerate(sizes):
                image = build(work, size, seed=100 + n)
                push(image, registry=f"{REGISTRY_IP}:5000", repo=f"bench/img{size >> 20}")
                images[size] = (image, f"bench/img{size >> 20}:v1")
            if "rollout" not in skip:
                results["rollout"] = []
                for size in sizes:
                    image, ref = images[size]
                    for n in hosts:
                        for system, run in itertools.product(args.systems.split(","), range(args.repeat)):
                            print(f"rollout: {system} N={n} {size >> 20} MiB run {run + 1} ...", end=" ", flush=True)
                            r = rollout.run(system, n, ref, image.total_blob_bytes)
                            results["rollout"].append({**r.row(), "run": run + 1})
                            print(f"{r.total_seconds}s (ideal {r.ideal_seconds:.1f}s), egress "
                                  f"{r.registry_egress_bytes >> 20} MiB, errors {len(r.errors)}, from agents "
                                  f"{r.from_agents_bytes >> 20} MiB, from seeder {r.from_seeder_bytes >> 20} MiB, "
                                  f"seeder upload {r.row()['seeder_ratio']}x, host p99 {r.row()['p99_x']}x, "
                                  f"CPU idle {r.cpu_idle_percent} %{' (CPU-bound)' if r.cpu_bound else ''}",
                                  flush=True)
                            (out / "results.json").write_text(json.dumps(results, indent=2))
            image, ref = images[sizes[0]]
            large = max(image.blobs.values(), key=lambda b: b.size)
            small = min(image.blobs.values(), key=lambda b: b.size)
            # the uncapped swarm moves the largest layer there is: a short one measures set-up
            biggest, biggest_ref = images[max(sizes)]
            largest = max(biggest.blobs.values(), key=lambda b: b.size)
            # the loopback benchmarks use the same registry from the root namespace (over the bridge,
            # uncapped on that side) and processes on 127.0.0.x
            registry_host = f"{REGISTRY_IP}:5000"
            topo.uncap("registry")
            if "hits" not in skip:
                print("cache hits ...", flush=True)
                results["hits"] = hits.run(work / "hits", registry_url=f"http://{registry_host}",
                                           repo=ref.split(":")[0], manifest_digest=image.digest,
                                           large=(large.digest, large.size), small=small.digest,
                                           seconds=args.seconds).row()
            if "tracker" not in skip:
                print("trackers ...", flush=True)
                t = trackers.run(work / "tracker", seconds=args.seconds)
                results["tracker"] = {"connections": t.connections, "shoal": asdict(t.shoal),
                                      "opentracker": asdict(t.opentracker)}
            if "uncapped" not in skip:
                print("uncapped swarm ...", flush=True)
                results["uncapped"] = asdict(uncapped.run(work / "uncapped", registry_host=registry_host,
                                                          repo=biggest_ref.split(":")[0],
                                                          blob=(largest.digest, largest.size),
                                                          agents=args.uncapped_agents, libtorrent=args.libtorrent))
                pair = ltpair.run(work / "ltpair", blob=largest.path, digest=largest.digest)
                results["uncapped"]["libtorrent_pair"] = asdict(pair)
        finally:
            rollout.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = table(results)
    (out / "results.md").write_text(report)
    plot(results, out)
    print(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
