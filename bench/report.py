"""The results as a Markdown table (printed and written to results.md) and PNG plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

MIB = 1 << 20


def _mb(v: float) -> str:
    return f"{v / 1e6:,.0f} MB/s"


def _medians(rollouts: list[dict[str, Any]]) -> dict[tuple[str, int, int], float]:
    """Median time until every host is done, per (system, image size, N), over repeated runs."""
    runs: dict[tuple[str, int, int], list[float]] = {}
    for r in rollouts:
        runs.setdefault((r["system"], r["image_bytes"], r["hosts"]), []).append(r["total_seconds"])
    return {k: statistics.median(v) for k, v in runs.items()}


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] >> 30} GiB, Linux {m['kernel']}, "
             f"Python {m['python']}, libtorrent {m['libtorrent']}, {m['registry']}; {m['date']}.",
             f"Command: `{results['command']}`", ""]
    if "rollout" in results:
        cap = results["cap_bytes"]
        lines += [f"### Cold rollout (per-host NIC cap B = {cap / 1e6:g} MB/s, tc tbf, both directions)", "",
                  "| image | N | system | run | all done (s) | p50 (s) | p99 (s) | ideal S/B (s) | x ideal | "
                  "registry egress (x image) | errors | IP | CPU idle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["rollout"]:
            idle = r.get("cpu_idle_percent", -1)
            lines.append(f"| {r['image_bytes'] >> 20} MiB | {r['hosts']} | {r['system']} | {r.get('run', 1)} | "
                         f"{r['total_seconds']} | "
                         f"{r['p50_seconds']} | {r['p99_seconds']} | {r['ideal_seconds']} | {r['ratio_to_ideal']} | "
                         f"{r['egress_ratio']} | {len(r['errors'])} | v{r.get('ip_version', 4)} | "
                         f"{f'{idle:g} %' if idle >= 0 else '-'} |")
        lines.append("")
        summary = []
        medians = _medians(results["rollout"])
        for (system, size, hosts), total in sorted(medians.items()):
            if system != "shoal":
                continue
            line = (f"{size >> 20} MiB N={hosts}: shoal median {total:g} s = {total / (size / cap):.2f}x ideal")
            for base in ("direct", "central"):
                other = medians.get((base, size, hosts))
                if other:
                    line += f"; {other / total:.1f}x faster than {base}"
            summary.append(line)
        lines += [f"- {s}" for s in summary] + [""]
    if "hits" in results:
        h = results["hits"]
        lines += ["### Cache hits (loopback, wrk)", "",
                  "| server | large blob throughput | small blob p50 (ms) | small blob p99 (ms) |",
                  "|---|---|---|---|"]
        for k in ("agent", "nginx", "central"):
            lines.append(f"| {k} | {_mb(h['throughput'][k])} | {h['small_p50_ms'][k]:.3f} | "
                         f"{h['small_p99_ms'][k]:.3f} |")
        lines += ["", f"- agent / nginx sendfile: {h['agent_vs_nginx']}; agent / central cache: "
                      f"{h['agent_vs_central']}",
                  f"- manifest latency p50: registry {h['manifest_p50_ms']['registry']:.3f} ms, through the agent "
                  f"{h['manifest_p50_ms']['agent']:.3f} ms (added {h['manifest_added_p50_ms']:.3f} ms; p99 added "
                  f"{h['manifest_added_p99_ms']:.3f} ms)",
                  f"- agent under this load: peak RSS {h['agent_peak_rss_bytes'] >> 20} MiB; CPU "
                  f"{h['agent_cpu_seconds_per_gib']} s per GiB of cached blob served", ""]
    if "tracker" in results:
        t = results["tracker"]
        lines += [f"### Trackers (wrk, 1 thread, {t['connections']} connections, announces varying peer id and port)",
                  "", "| tracker | announces/s | p50 (ms) | p99 (ms) | errors |", "|---|---|---|---|---|"]
        for k in ("shoal", "opentracker"):
            lines.append(f"| {k} | {t[k]['requests_per_second']:,.0f} | {t[k]['p50_ms']:.3f} | {t[k]['p99_ms']:.3f} | "
                         f"{t[k]['errors']} |")
        lines.append("")
    if "uncapped" in results:
        u = results["uncapped"]
        lines += ["### Uncapped swarm on loopback and footprint", "",
                  f"- {u['agents']} agents pulling one {u['blob_bytes'] >> 20} MiB blob through the swarm: "
                  f"{_mb(u['swarm_aggregate_bytes_per_second'])} aggregate ({u['swarm_seconds']} s)",
                  f"- {u['agents']} plain HTTP clients pulling it from the registry: "
                  f"{_mb(u['http_aggregate_bytes_per_second'])} aggregate ({u['http_seconds']} s)",
                  f"- agents while they download and seed: peak RSS {u['agent_peak_rss_bytes'] >> 20} MiB; CPU "
                  f"{u['agent_cpu_seconds_per_gib']} s per GiB downloaded (swarm + HTTP to the client)"]
        pair = u.get("libtorrent_pair")
        if pair:
            lines.append(f"- libtorrent alone (one seeder session to one downloader session, shoal's settings, "
                         f"no agent): {_mb(pair['bytes_per_second'])} ({pair['seconds']} s), "
                         f"{pair['cpu_seconds_per_gib']} CPU-s per GiB for both sessions together")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "rollout" in results:
        sizes = sorted({r["image_bytes"] for r in results["rollout"]})
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            rows = [r for r in results["rollout"] if r["image_bytes"] == size]
            for system in ("direct", "central", "shoal"):
                medians = _medians(rows)
                pts = sorted((hosts, total) for (sys_, _s, hosts), total in medians.items() if sys_ == system)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
            ideal = rows[0]["ideal_seconds"]
            ax.axhline(ideal, linestyle="--", color="grey", label="ideal S/B")
            ax.set_title(f"cold rollout, {size >> 20} MiB image")
            ax.set_xlabel("hosts (N)")
            ax.set_ylabel("seconds until every host is done")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "rollout.png", dpi=100)
        plt.close(fig)
    if "hits" in results:
        h = results["hits"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = ["agent", "nginx", "central"]
        ax.bar(names, [h["throughput"][n] / 1e6 for n in names])
        ax.set_ylabel("MB/s (cached large blob)")
        ax.set_title("cache hits")
        fig.tight_layout()
        fig.savefig(out / "hits.png", dpi=100)
        plt.close(fig)
