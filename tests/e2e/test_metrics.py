"""Every component's /metrics, scraped from the real processes before any pull: process and
build information, no `_created` series, every known label value present at 0, and what
`promtool check metrics` says about it (nothing)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import libtorrent as lt

from shoal import protocol
from shoal_agent import metrics as agent_metrics
from shoal_origin.operators import OPERATOR_RESULTS
from shoal_origin.seeder import SEED_RESULTS
from shoal_tracker.app import ANNOUNCE_RESULTS, REGISTRATION_RESULTS
from tests.support.procs import Component, Sample, http_get, parse_metrics, series
from tests.support.stack import Stack


def _scrape(component: Component) -> tuple[str, list[Sample]]:
    status, body = http_get(protocol.METRICS.url(component.url))
    assert status == 200, (component.name, status)
    text = body.decode()
    return text, parse_metrics(text)


def _zero_for_each(samples: list[Sample], name: str, label: str, values: tuple[str, ...]) -> None:
    """One series per known value, each at 0 (nothing has happened yet)."""
    for value in values:
        assert [s.value for s in series(samples, name, **{label: value})] == [0], (name, label, value)
    assert {s.labels[label] for s in series(samples, name)} == set(values), name


def test_metrics_before_any_traffic(stack: Stack) -> None:
    stack.start(agents=1)
    assert stack.origin is not None and stack.tracker is not None
    agent = stack.agents[0]
    build = {"version": importlib.metadata.version("shoal"), "python_version": platform.python_version(),
             "libtorrent_version": lt.__version__}
    scraped = {}
    for component, kind in ((agent, "agent"), (stack.origin, "origin"), (stack.tracker, "tracker")):
        text, samples = _scrape(component)
        scraped[kind] = samples
        assert "_created" not in text, kind
        assert series(samples, "process_cpu_seconds_total"), kind
        assert series(samples, "process_resident_memory_bytes"), kind
        assert series(samples, "python_info"), kind
        assert [s.value for s in series(samples, "shoal_build_info", component=kind, **build)] == [1], kind
        assert len(series(samples, "shoal_build_info")) == 1, kind
        # promtool's linter (names, units, counters ending in _total, help text) finds nothing
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                             timeout=60)
        assert (out.returncode, out.stdout.strip(), out.stderr.strip()) == (0, "", ""), (kind, out)
        print(f"\n{kind}: {len(samples)} samples before any pull")

    a = scraped["agent"]
    _zero_for_each(a, "shoal_agent_fallbacks_total", "reason", agent_metrics.FALLBACK_REASONS)
    _zero_for_each(a, "shoal_agent_served_bytes_total", "source", agent_metrics.SOURCES)
    _zero_for_each(a, "shoal_agent_integrity_failures_total", "source", agent_metrics.DOWNLOAD_SOURCES)
    _zero_for_each(a, "shoal_agent_swarm_download_bytes_total", "peer", agent_metrics.PEERS)
    _zero_for_each(a, "shoal_agent_blob_hash_bytes_total", "by", agent_metrics.HASHED_BY)
    _zero_for_each(a, "shoal_agent_provenance_checks_total", "result", agent_metrics.PROVENANCE_RESULTS)
    _zero_for_each(a, "shoal_agent_download_seconds_count", "source", agent_metrics.DOWNLOAD_SOURCES)
    for source in agent_metrics.DOWNLOAD_SOURCES:
        _zero_for_each(series(a, "shoal_agent_downloads_total", source=source), "shoal_agent_downloads_total",
                       "result", agent_metrics.DOWNLOAD_RESULTS)
    o = scraped["origin"]
    _zero_for_each(o, "shoal_origin_seed_requests_total", "result", SEED_RESULTS)
    _zero_for_each(o, "shoal_origin_operator_requests_total", "result", OPERATOR_RESULTS)
    assert {s.labels["result"] for s in series(o, "shoal_origin_admission_checks_total")} >= {"allowed", "denied"}
    t = scraped["tracker"]
    _zero_for_each(t, "shoal_tracker_registrations_total", "result", REGISTRATION_RESULTS)
    # the origin and the agent may have announced by now: every result is there, the failures at 0
    assert {s.labels["result"] for s in series(t, "shoal_tracker_announces_total")} == set(ANNOUNCE_RESULTS)
    for result in ANNOUNCE_RESULTS:
        if result != "ok":
            assert [s.value for s in series(t, "shoal_tracker_announces_total", result=result)] == [0], result
