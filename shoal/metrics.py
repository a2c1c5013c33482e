"""Prometheus helpers shared by components: each component's registry (process, Python and
build information), metrics whose label values are all known in advance, libtorrent session
counters and store state."""

from __future__ import annotations

import importlib.metadata
import itertools
import platform
from collections.abc import Iterator
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from shoal.store import BlobStore
from shoal.swarm import Swarm

M = TypeVar("M", bound=MetricWrapperBase)
L = TypeVar("L", bound=str)
L2 = TypeVar("L2", bound=str)


def component_registry(component: str) -> CollectorRegistry:
    """A component's own registry, with what the default registry would have carried (process,
    platform and garbage-collector collectors) plus `shoal_build_info`.

    `_created` series are turned off for the whole process here, before the component creates a
    metric: they doubled the sample count (a timestamp per labelled child) and no dashboard or
    alert of shoal reads them. (prometheus_client keeps this switch process-wide; it is read
    at each scrape, so every registry in the process is covered.)"""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    # (the library's own instances of these are bound to its default registry, which no
    # component serves)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    info = Gauge("shoal_build_info", "Always 1; the labels say which shoal, Python and libtorrent this is",
                 ["version", "component", "python_version", "libtorrent_version"], registry=registry)
    info.labels(*build_labels(component)).set(1)
    return registry


def build_labels(component: str) -> tuple[str, str, str, str]:
    """(shoal's version from the installed package's metadata, component, Python, libtorrent)."""
    try:
        version = importlib.metadata.version("shoal")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "unknown"
    try:
        import libtorrent as lt  # the tracker does not otherwise load it; reported for all alike

        libtorrent_version = str(lt.__version__)
    except ImportError:
        libtorrent_version = "none"
    return version, component, platform.python_version(), libtorrent_version


class Known(Generic[M, L]):
    """A metric with one label whose values are all known in advance (`values`, built from a
    Literal next to the metric). Every value is exported from the start, at 0, so a dashboard or
    an alert tells zero from absent; `labels` takes only those values (mypy checks the Literal),
    so the code that counts and the list of series cannot drift apart."""

    def __init__(self, metric: M, values: tuple[L, ...]) -> None:
        self.metric = metric
        self.values = values
        for value in values:
            metric.labels(value)

    def labels(self, value: L) -> M:
        return self.metric.labels(value)


class Known2(Generic[M, L, L2]):
    """`Known` for a metric with two labels: every pair exported from the start, at 0."""

    def __init__(self, metric: M, first: tuple[L, ...], second: tuple[L2, ...]) -> None:
        self.metric = metric
        for a, b in itertools.product(first, second):
            metric.labels(a, b)

    def labels(self, first: L, second: L2) -> M:
        return self.metric.labels(first, second)


# libtorrent session_stats counters exported as-is (they are monotonic in the session).
_SWARM_COUNTERS = {
    "net.recv_payload_bytes": ("swarm_received_payload_bytes", "Payload bytes received from peers"),
    "net.recv_redundant_bytes": ("swarm_received_redundant_bytes",
                                 "Payload bytes received that were had or asked of another peer already (end game, "
                                 "cancelled requests): a share of received_payload"),
    "net.sent_payload_bytes": ("swarm_sent_payload_bytes", "Payload bytes sent to peers"),
    "net.recv_bytes": ("swarm_received_bytes", "All bytes received on peer connections"),
    "net.sent_bytes": ("swarm_sent_bytes", "All bytes sent on peer connections"),
}
_SWARM_GAUGES = {
    "peer.num_peers_connected": ("swarm_peers_connected", "Peer connections open"),
}


class SwarmCollector(Collector):
    def __init__(self, prefix: str, swarm: Swarm) -> None:
        self.prefix = prefix
        self.swarm = swarm

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.swarm.stats
        for key, (name, text) in _SWARM_COUNTERS.items():
            c = CounterMetricFamily(f"{self.prefix}_{name}", text)
            c.add_metric([], float(stats.get(key, 0)))
            yield c
        for key, (name, text) in _SWARM_GAUGES.items():
            g = GaugeMetricFamily(f"{self.prefix}_{name}", text)
            g.add_metric([], float(stats.get(key, 0)))
            yield g
        g = GaugeMetricFamily(f"{self.prefix}_swarm_torrents", "Torrents in the session")
        g.add_metric([], float(len(self.swarm.jobs())))
        yield g
        c = CounterMetricFamily(f"{self.prefix}_swarm_hash_failures", "Pieces that failed their hash check")
        c.add_metric([], float(self.swarm.hash_failures))
        yield c
        c = CounterMetricFamily(f"{self.prefix}_swarm_banned_peers", "Peers banned for sending bad data")
        c.add_metric([], float(self.swarm.banned_peers))
        yield c
        c = CounterMetricFamily(f"{self.prefix}_swarm_refused_handshakes",
                                "Incoming peer connections refused at the TLS handshake (no valid certificate)")
        c.add_metric([], float(self.swarm.refused_handshakes))
        yield c
        c = CounterMetricFamily(f"{self.prefix}_swarm_announce_failures",
                                "Announces the tracker refused or did not answer (retried)")
        c.add_metric([], float(self.swarm.tracker_errors))
        yield c
        guard = self.swarm.slow_peers
        if guard is not None:  # the origin's seeder (shoal/slowpeers.py)
            c = CounterMetricFamily(f"{self.prefix}_swarm_slow_peers_dropped",
                                    "Peers dropped for holding an upload slot without reading while others "
                                    "waited, or for sending the seeder pieces")
            c.add_metric([], float(guard.dropped))
            yield c
            g = GaugeMetricFamily(f"{self.prefix}_swarm_addresses_banned",
                                  "Peer addresses the seeder refuses for now (dropped peers, each for a while)")
            g.add_metric([], float(len(self.swarm.banned_addresses)))
            yield g


class StoreCollector(Collector):
    def __init__(self, prefix: str, store: BlobStore) -> None:
        self.prefix = prefix
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, text, value in (
            ("cache_bytes", "Bytes of verified blobs in the cache", self.store.used_bytes),
            ("cache_blobs", "Verified blobs in the cache", len(self.store.digests())),
            ("cache_reserved_bytes", "Bytes reserved by downloads in progress", self.store.reserved_bytes),
            ("cache_in_use_bytes", "Bytes of cached blobs in use (being served); never evicted",
             self.store.pinned_bytes),
            ("cache_budget_bytes", "The cache's size budget", self.store.max_bytes),
        ):
            g = GaugeMetricFamily(f"{self.prefix}_{name}", text)
            g.add_metric([], float(value))
            yield g
        c = CounterMetricFamily(f"{self.prefix}_cache_evictions", "Blobs evicted to stay in budget")
        c.add_metric([], float(self.store.evictions))
        yield c
        c = CounterMetricFamily(f"{self.prefix}_cache_evicted_bytes", "Bytes evicted to stay in budget")
        c.add_metric([], float(self.store.evicted_bytes))
        yield c
        c = CounterMetricFamily(f"{self.prefix}_cache_corrupt_blobs",
                                "Cached blobs found changed or corrupt on disk (evicted)")
        c.add_metric([], float(self.store.integrity_failures))
        yield c
