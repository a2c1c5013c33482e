"""Spegel's matrix, measured the way Kraken and Dragonfly report (issue 16): `python -m bench.matrix`
(as root: it creates network namespaces).

Images of 10 MB, 100 MB and 1 GB *scaled to the cap*: an image of nominal size S is built as
S x (B / 20 MB/s), so S/B stays 0.5 s, 5 s and 50 s whatever cap B a host count needs. Each in 1
layer and in 4 equal layers. N = 16, 32, 64 hosts, each N with its own cap (default 80 MB/s
aggregate: 5, 2.5 and 1.25 MB/s), low enough that two cores keep up with the emulated links
(each row says whether they did: CPU idle, and "CPU-bound" under 20 %).

The agents' small-blob threshold (1 MiB: smaller blobs come from the registry, not the swarm)
is scaled the same way, so the same layers go through the swarm at every N.

Scenarios: "create" — every host pulls v1 at once, cold. "rolling" — after that create, v2 (for 4
layers the bottom 3 are v1's and the top one is new; for 1 layer nothing is shared) rolls out to
20 % of the hosts at a time (rounded up), each wave starting when the previous one is done; a host
fetches only the blobs it does not have (as containerd does), and its ideal is those bytes / B.

Writes results.json (every row with its per-host times and NIC/CPU timeline), results.md (the
table) and one timeline PNG per run into --out (default bench/out-matrix).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import machine
from bench.netns import Topology
from bench.report import plot_timeline, rollout_table, targets, timeline_name
from bench.rollout import REGISTRY_IP, Pull, Rollout
from shoal.cluster import merged
from shoal.config import parse_size
from tests.support.images import Image, build_image, push

REFERENCE_CAP = 20_000_000  # the cap at which an image has its nominal size
AGGREGATE = 80_000_000  # N x B that two cores keep link-bound (checked by the CPU idle column)
SMALL_BLOB = 1 << 20  # the agents' default swarm threshold
NOMINAL = {"10MB": 10_000_000, "100MB": 100_000_000, "1GB": 1_000_000_000}


def images(work: Path, size: int, layers: int, seed: int) -> tuple[Image, Image]:
    """v1 and v2 of one image: v2 keeps v1's layers but the top one (all of them with 1 layer)."""
    sizes = [size // layers] * layers
    seeds = [seed * 1000 + i for i in range(layers)]
    v1 = build_image(work / "v1", tag="v1", layer_sizes=sizes, seed=seed, layer_seeds=seeds)
    v2 = build_image(work / "v2", tag="v2", layer_sizes=sizes, seed=seed + 1,
                     layer_seeds=[*seeds[:-1], seed * 1000 + 500])
    return v1, v2


def caps_for(hosts: list[int], spec: str) -> dict[int, int]:
    caps = {n: AGGREGATE // n for n in hosts}
    for item in filter(None, spec.split(",")):
        n, _, value = item.partition("=")
        caps[int(n)] = parse_size(value, "--caps")
    return caps


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out-matrix"))
    parser.add_argument("--hosts", default="16,32,64", help="comma-separated N values (default 16,32,64)")
    parser.add_argument("--caps", default="", help="per-N caps overriding 80 MB/s / N, e.g. 16=4MB,64=1MB")
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help="nominal sizes among 10MB,100MB,1GB")
    parser.add_argument("--layers", default="1,4", help="comma-separated layer counts (default 1,4)")
    parser.add_argument("--scenarios", default="create,rolling", help="create, rolling or both")
    parser.add_argument("--systems", default="shoal", help="comma-separated among shoal,direct,central")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between NIC/CPU samples")
    parser.add_argument("--origin-config", type=json.loads, default={}, help="JSON merged into the origin's config")
    parser.add_argument("--agent-config", type=json.loads, default={}, help="JSON merged into every agent's config")
    parser.add_argument("--tracker-config", type=json.loads, default={},
                        help='JSON merged into the tracker\'s config, e.g. {"origin_spare": 0}')
    parser.add_argument("--no-scale-threshold", dest="scale_threshold", action="store_false",
                        help="keep the agents' 1 MiB small-blob threshold (default: scaled with the images)")
    parser.add_argument("--log-level", default="warning", help="log level of shoal's services")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("python -m bench.matrix: needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    hosts = [int(h) for h in args.hosts.split(",")]
    caps = caps_for(hosts, args.caps)
    sizes = [NOMINAL.get(s.upper()) or parse_size(s, "--sizes") for s in args.sizes.split(",")]
    layer_counts = [int(n) for n in args.layers.split(",")]
    scenarios = set(args.scenarios.split(","))
    if not scenarios <= {"create", "rolling"}:
        parser.error("--scenarios: create, rolling")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench.matrix", *sys.argv[1:]]),
                               "caps": caps, "scale_threshold": args.scale_threshold, "rollout": []}
    print(f"machine: {results['machine']}", flush=True)
    started = time.monotonic()
    for n in hosts:
        cap = caps[n]
        # a topology per N: every NIC at that N's cap
        with Topology() as topo:
            # The swarm's small-blob threshold scales with the image: unscaled, the 10 MB image's
            # 2.5 MB layers go through the swarm; scaled to 1.25 MB/s they are 156 KB, and under
            # the default 1 MiB they would all come from the registry (N x the image)
            threshold = {"swarm": {"threshold": SMALL_BLOB * cap // REFERENCE_CAP}} if args.scale_threshold else {}
            rollout = Rollout(work / f"n{n}", topo, cap, n, origin_config=args.origin_config,
                              agent_config=merged(threshold, args.agent_config), log_level=args.log_level,
                              sample_interval=args.interval)
            rollout.tracker_config = args.tracker_config
            try:
                for nominal in sizes:
                    size = nominal * cap // REFERENCE_CAP
                    for layers in layer_counts:
                        repo = f"bench/m{round(nominal / 1e6)}l{layers}"
                        v1, v2 = images(work / f"n{n}" / repo.replace("/", "_"), size, layers,
                                        seed=len(results["rollout"]) + 100 * layers)
                        topo.uncap("registry")  # pushing at 1.25 MB/s would take longer than the run
                        try:
                            push(v1, registry=f"{REGISTRY_IP}:5000", repo=repo)
                            push(v2, registry=f"{REGISTRY_IP}:5000", repo=repo)
                        finally:
                            topo.recap("registry")
                        shutil.rmtree(v1.layout, ignore_errors=True)
                        shutil.rmtree(v2.layout, ignore_errors=True)
                        had = set(v1.blobs)
                        new = [d for d in v2.blobs if d not in had]
                        pulls = [Pull(f"{repo}:v1", v1.total_blob_bytes, v1.total_blob_bytes, layers=layers)]
                        if "rolling" in scenarios:
                            pulls.append(Pull(f"{repo}:v2", v2.total_blob_bytes,
                                              sum(v2.blobs[d].size for d in new),
                                              skip=tuple(d for d in v2.blobs if d in had),
                                              wave=math.ceil(n / 5), scenario="rolling", layers=layers))
                        for run in range(args.repeat):
                            for system in args.systems.split(","):
                                label = f"{repo.replace('/', '_')}-run{run + 1}"
                                rows = rollout.session(system, n, pulls, label=label)
                                for r in rows:
                                    if r.scenario not in scenarios:
                                        continue
                                    row = {**r.row(), "run": run + 1, "nominal_bytes": nominal}
                                    results["rollout"].append(row)
                                    plot_timeline(row, out / timeline_name(row))
                                    print(f"{r.scenario} {system} N={n} B={cap / 1e6:g}MB/s {size / 1e6:g} MB "
                                          f"x{layers} run {run + 1}: all done {r.total_seconds}s "
                                          f"({row['ratio_to_ideal']}x S/B), p50/p99/max x S/B {row['p50_x']}/"
                                          f"{row['p99_x']}/{row['max_x']}, registry {row['egress_ratio']}x, "
                                          f"seeder {row['seeder_ratio']}x, peers {row['peers_ratio']}x, "
                                          f"stall escapes {r.stall_escapes}, seeder drops {r.seeder_drops}, errors "
                                          f"{len(r.errors)}, CPU idle {r.cpu_idle_percent} % "
                                          f"({r.finish_idle_percent} % while hosts finished, before the pull "
                                          f"{r.cpu_idle_before_percent} %, start-up {r.startup_seconds} s)"
                                          f"{' (CPU-bound)' if r.cpu_bound else ''}", flush=True)
                                (out / "results.json").write_text(json.dumps(results))
            finally:
                rollout.close()
    results["seconds"] = round(time.monotonic() - started)
    (out / "results.json").write_text(json.dumps(results))
    m = results["machine"]
    report = "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] >> 30} GiB, Linux {m['kernel']}, "
        f"libtorrent {m['libtorrent']}, {m['registry']}; {m['date']}; {results['seconds']} s in all.",
        f"Command: `{results['command']}`", "",
        "### Spegel's matrix (caps per N: " + ", ".join(f"N={k}: {v / 1e6:g} MB/s" for k, v in caps.items())
        + "; images scaled to the cap)", "", *rollout_table(results["rollout"]), *targets(results["rollout"]), ""])
    (out / "results.md").write_text(report)
    print(report)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
