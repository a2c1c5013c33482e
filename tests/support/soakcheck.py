"""The verdict of a soak (tests/support/soak.py) against issue 10's targets, from the samples, the
clients' requests, the registry's own access log and the components' logs:

- 0 fallbacks while origin and tracker are healthy;
- registry blob bytes at most 1.05x the distinct blob bytes clients asked for;
- every agent's cache within its budget at every sample;
- RSS, file descriptors and threads flat (the last third of the run no higher than the middle
  third, within a margin: peaks for RSS and threads, medians for descriptors), the journal
  bounded (what is on disk is what is not shipped plus less than one roll) and fully shipped at
  the end;
- no ERROR line (or traceback) for normal events, and every client got the right bytes.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.soak import Run

MIB = 1 << 20
REGISTRY_RATIO_MAX = 1.05
# "Flat": the last third may exceed the middle third by this share plus a fixed margin.
GROWTH = 0.2
MARGINS = {"rss": 16 * MIB, "fds": 16, "threads": 4}
# Descriptors are compared by their median: a burst of pulls leaves up to one keep-alive
# connection per concurrent request open for aiohttp's 75 s (a suite soak saw the tracker at 20
# then 44 in one sample), while a leak raises the typical level, which the median follows.
# RSS (the allocator's high-water mark) and threads (pools that grow to a bound) by their peak.
BY_MEDIAN = frozenset({"fds"})
# A journal line being written when a sample is taken, and the shipper's last batch in flight.
JOURNAL_SLACK = 256 << 10

_ACCESS = re.compile(r'"GET /v2/\S+/blobs/sha256:[0-9a-f]{64}\S* HTTP/1\.\d" (200|206) (\d+)')
_LINE = re.compile(r"^\S+ \S+ (\w+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


@dataclass(frozen=True)
class Target:
    name: str
    met: bool
    measured: str


@dataclass
class Verdict:
    summary: dict[str, Any]
    targets: list[Target]

    @property
    def met(self) -> bool:
        return all(t.met for t in self.targets)

    def failures(self) -> list[Target]:
        return [t for t in self.targets if not t.met]


def registry_blob_bytes(access_log: Path, offset: int = 0) -> int:
    """Blob body bytes the registry sent (200 and 206), from its access log after `offset`."""
    total = 0
    with open(access_log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        m = _ACCESS.search(line)
        if m:
            total += int(m.group(2))
    return total


def _normalize(message: str) -> str:
    message = re.sub(r"[0-9a-f]{12,}", "<hex>", message)
    message = re.sub(r"\b\d+(\.\d+)?\b", "<n>", message)
    return message[:200]


def log_lines(text: str, levels: tuple[str, ...]) -> Counter[str]:
    """Lines at `levels` by normalized message (digests and numbers folded), plus tracebacks and
    "Exception ignored" lines wherever they appear."""
    found: Counter[str] = Counter()
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and m.group(2) in levels:
            found[f"{m.group(2)} {m.group(3)}: {_normalize(m.group(4))}"] += 1
        elif "ERROR" in levels and (line.startswith("Traceback") or line.startswith("Exception ignored")):
            found[_normalize(line)] += 1
    return found


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def _series(samples: list[dict[str, float]], key: str) -> list[float]:
    return [s[key] for s in samples if key in s]


def flat(values: list[float], margin: float, unit: float = 1.0, unit_name: str = "", *,
         by_median: bool = False) -> tuple[bool, str]:
    """Whether the last third of a series is no higher than its middle third (+GROWTH, +margin),
    comparing peaks, or medians with `by_median`."""
    if len(values) < 6:
        return True, "too short to judge"
    third = len(values) // 3
    stat, word = (statistics.median, "median") if by_median else (max, "peak")
    middle, last = stat(values[third:2 * third]), stat(values[2 * third:])
    return (last <= middle * (1 + GROWTH) + margin,
            f"middle third {word} {middle / unit:g}{unit_name}, last third {word} {last / unit:g}{unit_name}")


def rolls(values: list[float]) -> int:
    """How often a journal's size on disk dropped (a shipped segment rolled and deleted)."""
    return sum(1 for before, after in itertools.pairwise(values)
               if after < before * 0.75 and before - after > 64 << 10)


def judge(run: Run) -> Verdict:
    plan = run.plan
    samples = [s for s in run.samples if s["t"] <= plan.seconds + plan.sample_every]  # not the drain
    last = run.samples[-1]
    agents = [f"agent{n}" for n in range(plan.agents)]
    targets: list[Target] = []
    summary: dict[str, Any] = {}

    bad = [r for r in run.requests if not r.ok]
    by_kind = Counter(r.kind for r in run.requests)
    summary["requests"] = dict(by_kind)
    summary["client_bytes"] = sum(r.size for r in run.requests)
    summary["client_errors"] = [f"{r.kind} {r.digest[:19]} via agent{r.agent}: {r.error}" for r in bad[:20]]
    targets.append(Target("every client got the right bytes", not bad,
                          f"{len(run.requests)} requests, {len(bad)} wrong or failed"))

    fallbacks = {a: last.get(f"{a}.fallbacks", 0.0) for a in agents}
    reasons: Counter[str] = Counter()
    for key, value in last.items():
        if ".fallbacks." in key:
            reasons[key.split(".fallbacks.", 1)[1]] += int(value)
    summary["fallbacks_by_reason"] = dict(reasons)
    targets.append(Target("0 fallbacks", sum(fallbacks.values()) == 0,
                          f"{int(sum(fallbacks.values()))} ({dict(reasons) or 'none'})"))

    distinct = sum(run.sizes[d] for d in run.requested)
    registry = registry_blob_bytes(run.registry.log_path, run.registry_log_offset)
    ratio = registry / distinct if distinct else 0.0
    summary.update(distinct_bytes=distinct, registry_blob_bytes=registry, registry_ratio=round(ratio, 4),
                   distinct_blobs=len(run.requested))
    targets.append(Target(f"registry bytes <= {REGISTRY_RATIO_MAX}x distinct", ratio <= REGISTRY_RATIO_MAX,
                          f"{registry / MIB:.1f} MiB for {distinct / MIB:.1f} MiB distinct ({ratio:.3f}x)"))

    for a in agents:
        peak = max(_series(samples, f"{a}.cache_bytes"), default=0.0)
        summary[f"{a}.cache_peak_bytes"] = peak
        targets.append(Target(f"{a} cache never above its budget", peak <= plan.cache_budget,
                              f"peak {peak / MIB:.1f} MiB, budget {plan.cache_budget / MIB:.0f} MiB"))

    for name in ("tracker", "origin", *agents):
        for what, margin in MARGINS.items():
            series = _series(samples, f"{name}.{what}")
            ok, detail = flat(series, margin, *((MIB, " MiB") if what == "rss" else (1.0, "")),
                              by_median=what in BY_MEDIAN)
            summary[f"{name}.{what}_peak"] = max(series, default=0.0)
            targets.append(Target(f"{name} {what} flat", ok, detail))

    for a in agents:
        over = [s.get(f"{a}.journal_disk_bytes", 0.0) - s.get(f"{a}.journal_unshipped_bytes", 0.0) for s in samples]
        peak = max(over, default=0.0)
        written = last.get(f"{a}.journal_records_total", 0.0)
        shipped = last.get(f"{a}.journal_shipped_records_total", 0.0)
        unshipped = last.get(f"{a}.journal_unshipped_bytes", -1.0)
        summary[f"{a}.journal_peak_disk_bytes"] = max(_series(samples, f"{a}.journal_disk_bytes"), default=0.0)
        summary[f"{a}.journal_rolls"] = rolled = rolls(_series(run.samples, f"{a}.journal_disk_bytes"))
        targets.append(Target(
            f"{a} journal bounded and shipped",
            peak <= plan.journal_roll + JOURNAL_SLACK and unshipped == 0 and shipped == written,
            f"shipped records kept on disk peaked at {peak / 1024:.0f} KiB ({rolled} rolls); {int(written)} "
            f"written, {int(shipped)} shipped, {int(unshipped)} bytes unshipped at the end"))

    errors: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    for name, comp in run.components.items():
        text = comp.log()
        errors.update({f"{name} {k}": v for k, v in log_lines(text, ("ERROR", "CRITICAL")).items()})
        warnings.update({f"{name} {k}": v for k, v in log_lines(text, ("WARNING",)).items()})
    summary["error_lines"] = dict(errors.most_common(30))
    summary["warning_lines"] = dict(warnings.most_common(30))
    targets.append(Target("0 ERROR lines", not errors, f"{sum(errors.values())} lines"))

    blobs = [r for r in run.requests if r.kind == "blob" and r.ok]
    summary["latency_seconds"] = {
        "blob": percentiles([r.seconds for r in blobs]),
        "blob_first_byte": percentiles([r.ttfb for r in blobs]),
        "blob_over_16MiB": percentiles([r.seconds for r in blobs if r.size > 16 * MIB]),
        "manifest": percentiles([r.seconds for r in run.requests if r.kind == "manifest" and r.ok]),
        "range": percentiles([r.seconds for r in run.requests if r.kind == "range" and r.ok]),
    }
    idle = _series(samples, "cpu_idle")
    summary["cpu_idle_percent"] = {"mean": round(statistics.fmean(idle), 1) if idle else None,
                                   "min": round(min(idle), 1) if idle else None}
    unseeded = _series(samples, "tracker.torrents_without_seeders")
    summary["tracker_torrents_without_seeders"] = {"max": max(unseeded, default=0.0),
                                                   "mean": round(statistics.fmean(unseeded), 2) if unseeded else 0}
    summary["served_bytes"] = {src: sum(last.get(f"{a}.served.{src}", 0.0) for a in agents)
                               for src in ("cache", "peers", "registry")}
    summary["evictions"] = sum(last.get(f"{a}.cache_evictions_total", 0.0) for a in agents)
    return Verdict(summary, targets)
