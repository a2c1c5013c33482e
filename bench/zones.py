"""Bytes across zone boundaries (issue 15): N emulated hosts in two zones pull one image at once
through shoal, with zones stated (the tracker hands out same-zone peers first) and without.
Run as root from this tree:

    python -m bench.zones --hosts 16 --size 128MiB --cap 8MB

Hosts are bench/netns.py's namespaces (NICs capped at `--cap`); hosts h1..h8 are zone z0 (with
the registry host, where the origin seeder and the tracker run), h9..h16 zone z1. Inside every
host namespace an iptables INPUT rule per other-zone address counts the IP bytes the host
received across the boundary. Reported per run: each zone's bytes in from the other zone as a
multiple of the image (target with zones: about 1 for the zone without the origin), the rollout
time against S/B, registry egress, and the machine's CPU idle.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.netns import Host, Topology, sh
from bench.rollout import REGISTRY_IP, Rollout
from bench.sampler import cpu_jiffies
from shoal.config import parse_size
from tests.support.images import build_image, push


def count_from(host: Host, sources: list[str]) -> None:
    """Count, in the host's namespace, the bytes it receives from each of `sources` (from zero)."""
    sh(*host.cmd("iptables", "-F", "INPUT"))
    for ip in sources:
        sh(*host.cmd("iptables", "-A", "INPUT", "-s", ip, "-j", "ACCEPT"))


def counted(host: Host) -> int:
    out = sh(*host.cmd("iptables", "-L", "INPUT", "-v", "-x", "-n")).stdout
    return sum(int(line.split()[1]) for line in out.splitlines()[2:] if line.strip())


def run(work: Path, topo: Topology, *, hosts: int, size: int, cap: int, rounds: int, gateways: int,
        modes: tuple[bool, ...]) -> list[dict[str, object]]:
    rollout = Rollout(work / "rollout", topo, cap, hosts)
    rollout.tracker_config = {"zone_gateways": gateways}
    rows: list[dict[str, object]] = []
    try:
        image = build_image(work / "image", tag="v1", layer_sizes=[size // 4] * 4, seed=151)
        push(image, registry=f"{REGISTRY_IP}:5000", repo="bench/zones")
        nodes = rollout.nodes[:hosts]
        for round_ in range(rounds):
            for zoned in modes:
                rollout.zones = 2 if zoned else 0
                zone = {n.name: f"z{i * 2 // hosts}" for i, n in enumerate(nodes)}
                for node in nodes:
                    others = [m.ip for m in nodes if zone[m.name] != zone[node.name]]
                    count_from(node, others + ([REGISTRY_IP] if zone[node.name] != "z0" else []))
                idle0, total0 = cpu_jiffies()
                result = rollout.run("shoal", hosts, "bench/zones:v1", image.total_blob_bytes)
                idle1, total1 = cpu_jiffies()
                cross = {z: sum(counted(n) for n in nodes if zone[n.name] == z) for z in ("z0", "z1")}
                rows.append({
                    "zones": zoned, "zone_gateways": gateways if zoned else None, "round": round_ + 1,
                    "hosts": hosts, "image_bytes": image.total_blob_bytes,
                    "cap_bytes": cap, "total_seconds": result.total_seconds,
                    "ratio_to_ideal": round(result.total_seconds / result.ideal_seconds, 2),
                    "registry_egress_ratio": round(result.registry_egress_bytes / image.total_blob_bytes, 3),
                    "cross_in_z0_images": round(cross["z0"] / image.total_blob_bytes, 2),
                    "cross_in_z1_images": round(cross["z1"] / image.total_blob_bytes, 2),
                    "errors": len(result.errors),
                    "cpu_idle_percent": round(100 * (idle1 - idle0) / max(total1 - total0, 1), 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    finally:
        rollout.close()
        for node in rollout.nodes:
            sh(*node.cmd("iptables", "-F", "INPUT"), check=False)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zones", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--size", default="128MiB")
    parser.add_argument("--cap", default="8MB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gateways", type=int, default=2, help="the tracker's zone_gateways")
    parser.add_argument("--zoned-only", action="store_true", help="skip the runs without zones")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "zones.json"))
    args = parser.parse_args()
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        print("python -m bench.zones: needs root (network namespaces, tc, iptables)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="shoal-bench-zones-") as tmp, Topology() as topo:
        rows = run(Path(tmp), topo, hosts=args.hosts, size=parse_size(args.size, "--size"),
                   cap=parse_size(args.cap, "--cap"), rounds=args.rounds, gateways=args.gateways,
                   modes=(True,) if args.zoned_only else (True, False))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'zones':6} {'round':>5} {'z0 in':>7} {'z1 in':>7} {'time/S/B':>9} {'egress':>7} {'CPU idle':>9}")
    for r in rows:
        print(f"{'on' if r['zones'] else 'off':6} {r['round']:>5} {r['cross_in_z0_images']:>6}x "
              f"{r['cross_in_z1_images']:>6}x {r['ratio_to_ideal']:>8}x {r['registry_egress_ratio']:>6}x "
              f"{r['cpu_idle_percent']:>8}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
