"""The soak: a cluster run as clusters run, for as long as you ask (issue 10).

    python -m bench.soak --minutes 30          # the workload of issue 10 (defaults below)
    python -m bench.soak --minutes 5 --interval 2 --layers 24 --images 12 --layer-sizes 1MiB-6MiB

Tracker, origin and agents (real processes on 127.0.0.x, production timing unless --interval) with
a small cache budget, so eviction never stops; 60 images of 133 distinct 1-40 MiB layers pushed to
a docker-registry with htpasswd auth; 4-8 clients (redrawn every minute) pulling random images
through random agents with containerd's three blobs at once, Range requests, clients hanging up
mid-blob, and every agent pulling the same new image at once. Every byte a client gets is
checked. Writes bench/out/soak/soak.json (plan, verdict, time series, requests), soak.md and
soak.png; exits 1 if a target is missed. No root needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shoal.config import parse_size
from tests.support import soak, soakcheck
from tests.support.registry import Registry

MIB = 1 << 20
USERS = {"alice": "alicepw", "seeder": "seederpw", "node": "nodepw"}


def _pair(text: str, convert: Any) -> tuple[Any, Any]:
    low, _, high = text.partition("-")
    return convert(low), convert(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="duration of the load (default 30)")
    parser.add_argument("--clients", default="4-8", help="concurrent clients, MIN-MAX (default 4-8)")
    parser.add_argument("--think", default="0-4", help="client pause between actions, seconds, MIN-MAX (default 0-4)")
    parser.add_argument("--images", type=int, default=60, help="images pushed (default 60)")
    parser.add_argument("--layers", type=int, default=133, help="distinct layers among the images (default 133)")
    parser.add_argument("--layer-sizes", default="1MiB-40MiB", help="layer sizes, MIN-MAX (default 1MiB-40MiB)")
    parser.add_argument("--cache-budget", default="300MiB", help="each agent's cache.max_bytes (default 300MiB)")
    parser.add_argument("--agents", type=int, default=2, help="agents, each on its own 127.0.0.x (default 2)")
    parser.add_argument("--interval", type=int, default=30, help="the tracker's announce interval, s (default 30)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the content and the workload (default 1)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "soak"),
                        help="where soak.json, soak.md and soak.png go (default bench/out/soak)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs, caches)")
    args = parser.parse_args(argv)
    layer_min, layer_max = _pair(args.layer_sizes, lambda v: parse_size(v, "--layer-sizes"))
    plan = soak.Plan(seconds=args.minutes * 60, images=args.images, layers=args.layers, min_layer=layer_min,
                     max_layer=layer_max, cache_budget=parse_size(args.cache_budget, "--cache-budget"),
                     agents=args.agents, clients=_pair(args.clients, int), think=_pair(args.think, float),
                     tracker_interval=args.interval, sample_every=args.sample_every, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="shoal-soak-", dir="/tmp"))
    registry = Registry(work / "registry", users=USERS)
    registry.start()
    try:
        print(f"soak: building and pushing {plan.images} images ({plan.layers} layers) ...", flush=True)
        run = soak.start(plan, work, registry, pusher=("alice", USERS["alice"]), node_user=("node", USERS["node"]),
                         seeder_user=("seeder", USERS["seeder"]))
        try:
            print(f"soak: {args.minutes:g} minutes of load on {plan.agents} agents ...", flush=True)
            soak.drive(run)
            verdict = soakcheck.judge(run)
        finally:
            run.stack.close()
        if args.keep:
            print(f"soak: logs, configs and caches kept in {work}")
    finally:
        registry.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"command": " ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])]),
           "plan": asdict(plan), "targets": [asdict(t) for t in verdict.targets], "summary": verdict.summary,
           "samples": run.samples, "requests": [asdict(r) for r in run.requests],
           "blob_sizes": {d: run.sizes[d] for d in run.requested}}
    (out / "soak.json").write_text(json.dumps(doc, default=str))
    report = markdown(doc)
    (out / "soak.md").write_text(report)
    plot(doc, out / "soak.png")
    print(report)
    return 0 if verdict.met else 1


def markdown(doc: dict[str, Any]) -> str:
    plan, s = doc["plan"], doc["summary"]
    lines = [f"Command: `{doc['command']}`", "",
             f"{plan['seconds'] / 60:g} minutes, {plan['agents']} agents with {plan['cache_budget'] >> 20} MiB "
             f"caches, {plan['images']} images / {plan['layers']} layers of {plan['min_layer'] >> 20}-"
             f"{plan['max_layer'] >> 20} MiB, {plan['clients'][0]}-{plan['clients'][1]} clients, tracker interval "
             f"{plan['tracker_interval']} s. CPU idle: mean {s['cpu_idle_percent']['mean']} %, "
             f"min {s['cpu_idle_percent']['min']} %.", "",
             "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {t['name']} | {'yes' if t['met'] else '**no**'} | {t['measured']} |" for t in doc["targets"]]
    served, unseeded = s["served_bytes"], s["tracker_torrents_without_seeders"]
    lines += ["", f"Requests: {s['requests']}; {s['client_bytes'] / 1e9:.1f} GB to clients "
              f"(agents served {served['cache'] / 1e9:.1f} GB from cache, {served['peers'] / 1e9:.1f} GB from the "
              f"swarm, {served['registry'] / 1e9:.2f} GB from the registry); {s['distinct_blobs']} distinct blobs; "
              f"{int(s['evictions'])} evictions; tracker torrents without a seeder: max "
              f"{unseeded['max']:g}, mean {unseeded['mean']}.",
              "", "| latency (s) | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for kind, p in s["latency_seconds"].items():
        if p:
            lines.append(f"| {kind} | {p['n']} | {p['p50']:.3f} | {p['p90']:.3f} | {p['p99']:.3f} | {p['max']:.3f} |")
    peaks = [f"{k.removesuffix('_peak')} {v / MIB:.0f} MiB" for k, v in s.items() if k.endswith(".rss_peak")]
    lines += ["", "Peak RSS: " + ", ".join(peaks) + ".",
              "ERROR lines: " + (json.dumps(s["error_lines"]) if s["error_lines"] else "none") + ".",
              "WARNING lines: " + (json.dumps(s["warning_lines"]) if s["warning_lines"] else "none") + "."]
    if s["client_errors"]:
        lines += ["", "Client errors (first 20):", *[f"- {e}" for e in s["client_errors"]]]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (scripts/ensure-venv --bench): no plot", file=sys.stderr)
        return
    samples, plan = doc["samples"], doc["plan"]
    names = ["tracker", "origin", *[f"agent{n}" for n in range(plan["agents"])]]
    agents = names[2:]
    minutes = [s["t"] / 60 for s in samples]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [s.get(key, float("nan")) / scale for s in samples]

    # registry bytes (agents' and origin's counters) against the distinct bytes asked for so far
    first_asked: dict[str, float] = {}
    for r in sorted(doc["requests"], key=lambda r: r["t"]):
        first_asked.setdefault(r["digest"], r["t"])
    sizes = doc["blob_sizes"]
    distinct = [sum(sizes[d] for d, t in first_asked.items() if d in sizes and t <= s["t"]) / MIB for s in samples]
    registry = [(sum(s.get(f"{a}.registry_bytes_total", 0.0) for a in agents)
                 + s.get("origin.registry_bytes_total", 0.0)) / MIB for s in samples]
    # blob latency per window
    window = max(plan["seconds"] / 30, 10.0)
    buckets: dict[int, list[float]] = {}
    for r in doc["requests"]:
        if r["kind"] == "blob" and r["ok"]:
            buckets.setdefault(int(r["t"] // window), []).append(r["seconds"])
    at = sorted(buckets)

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    fig, axes = plt.subplots(5, 2, figsize=(13, 17), sharex=True)
    panels = [
        ("RSS (MiB)", [(n, series(f"{n}.rss", MIB)) for n in names]),
        ("open file descriptors", [(n, series(f"{n}.fds")) for n in names]),
        ("threads", [(n, series(f"{n}.threads")) for n in names]),
        ("cache (MiB; budget dashed)", [(a, series(f"{a}.cache_bytes", MIB)) for a in agents]),
        ("data directories (MiB)", [(n, series(f"{n}.data_dir_bytes", MIB)) for n in ("origin", *agents)]),
        ("journal on disk / unshipped (KiB)",
         [(f"{a} disk", series(f"{a}.journal_disk_bytes", 1024)) for a in agents]
         + [(f"{a} unshipped", series(f"{a}.journal_unshipped_bytes", 1024)) for a in agents]),
        ("fallbacks (cumulative) / torrents without seeders",
         [(f"{a} fallbacks", series(f"{a}.fallbacks")) for a in agents]
         + [("tracker: torrents without seeders", series("tracker.torrents_without_seeders"))]),
        ("CPU idle (%)", [("machine", series("cpu_idle"))]),
        ("registry blob bytes vs distinct bytes asked for (MiB)",
         [("from the registry (agents + origin)", registry), ("distinct blobs asked for", distinct)]),
    ]
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for label, values in lines:
            ax.plot(minutes, values, label=label)
        if title.startswith("cache"):
            ax.axhline(plan["cache_budget"] / MIB, linestyle="--", color="grey")
        ax.set_title(title)
        ax.legend(fontsize=7)
    lat = axes.flat[len(panels)]
    for p, label in ((0.5, "p50"), (0.99, "p99")):
        lat.plot([(b + 0.5) * window / 60 for b in at], [pct(buckets[b], p) for b in at], label=label)
    lat.set_title(f"blob request latency (s) per {window:g} s window")
    lat.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.suptitle(f"shoal soak: {plan['seconds'] / 60:g} min, {plan['agents']} agents, "
                 f"{plan['cache_budget'] >> 20} MiB caches, tracker interval {plan['tracker_interval']} s")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
