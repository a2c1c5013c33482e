"""Prometheus helpers shared by components: libtorrent session counters and store state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.store import BlobStore
from shoal.swarm import Swarm

# libtorrent session_stats counters exported as-is (they are monotonic in the session).
_SWARM_COUNTERS = {
    "net.recv_payload_bytes": ("swarm_received_payload_bytes", "Payload bytes received from peers"),
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
