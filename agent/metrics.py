"""The agent's Prometheus metrics (one registry per agent instance)."""

from __future__ import annotations

import typing
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal.metrics import Known, Known2

# Every label value below is exported from the start at 0 (shoal.metrics.Known), so an alert on
# rate(...) sees zero, not "no data"; the Literal types are what the counting code may pass.

DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Where served bytes came from, and where a download got them (origin = the registry).
Source = Literal["cache", "peers", "registry"]
SOURCES: tuple[Source, ...] = typing.get_args(Source)
DownloadSource = Literal["peers", "registry"]
DOWNLOAD_SOURCES: tuple[DownloadSource, ...] = typing.get_args(DownloadSource)
DownloadResult = Literal["ok", "failed"]
DOWNLOAD_RESULTS: tuple[DownloadResult, ...] = typing.get_args(DownloadResult)
# Who sent a completed swarm download's pieces: the origin seeder or other nodes.
Peer = Literal["seeder", "agent"]
PEERS: tuple[Peer, ...] = typing.get_args(Peer)
HashedBy = Literal["download", "reader"]
HASHED_BY: tuple[HashedBy, ...] = typing.get_args(HashedBy)
ProvenanceResult = Literal["confirmed", "refused", "unavailable"]
PROVENANCE_RESULTS: tuple[ProvenanceResult, ...] = typing.get_args(ProvenanceResult)
# Why a swarm download was abandoned for the registry.
FallbackReason = Literal[
    "not_enrolled",  # the origin has not enrolled this node (yet)
    "not_admitted",  # the registry did not let the origin admit this puller's credential to the blob
    "origin_unreachable", "origin_error",  # the origin could not admit the node or seed the blob
    "origin_refused",  # the origin does not vouch that the registry holds the blob
    "tracker_unreachable",  # the announce could not reach the tracker, so no peers are known
    "unsigned_metainfo", "bad_metainfo",  # metainfo that does not verify or describe the blob
    "no_first_piece", "stalled",  # no seeder answered, or every peer stopped sending
    "torrent_error",  # libtorrent failed the torrent (disk, storage)
    "integrity",  # the assembled blob did not hash to its digest
    "swarm_error",  # anything else on the swarm path
]
FALLBACK_REASONS: tuple[FallbackReason, ...] = typing.get_args(FallbackReason)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("shoal_agent_requests_total", "Mirror API requests",
                                ["kind", "method", "status"], registry=registry)
        self.cache_hits = Counter("shoal_agent_cache_hits_total", "Blob requests served from the cache",
                                  registry=registry)
        self.cache_misses = Counter("shoal_agent_cache_misses_total",
                                    "Blob requests for blobs not in the cache", registry=registry)
        self.served_bytes = Known(Counter("shoal_agent_served_bytes_total",
                                          "Blob bytes sent to clients, by where the blob came from",
                                          ["source"], registry=registry), SOURCES)
        self.downloads = Known2(Counter("shoal_agent_downloads_total", "Blob downloads by outcome and source",
                                        ["source", "result"], registry=registry), DOWNLOAD_SOURCES, DOWNLOAD_RESULTS)
        self.download_seconds = Known(Histogram("shoal_agent_download_seconds",
                                                "Time to download and verify a blob", ["source"],
                                                registry=registry, buckets=DURATION_BUCKETS), DOWNLOAD_SOURCES)
        self.swarm_bytes = Known(Counter("shoal_agent_swarm_download_bytes_total",
                                         "Payload bytes of completed swarm downloads, by peer kind "
                                         "(seeder = origin seeder, agent = other nodes)", ["peer"],
                                         registry=registry), PEERS)
        self.registry_bytes = Counter("shoal_agent_registry_bytes_total",
                                      "Blob bytes fetched from the origin registry", registry=registry)
        self.first_copy_bytes = Counter("shoal_agent_first_copy_bytes_total",
                                        "Bytes of blobs' first copies taken from the origin, this node's share "
                                        "(pieces the swarm then spreads)", registry=registry)
        self.relay_bytes = Counter("shoal_agent_relay_bytes_total",
                                   "Bytes of cold blobs relayed by the origin while it fetched them (a head "
                                   "start: libtorrent keeps the whole pieces of it, the swarm sends the rest)",
                                   registry=registry)
        self.stall_escapes = Counter("shoal_agent_swarm_stall_escapes_total",
                                     "Swarm downloads that got no piece for half of first_piece_timeout or "
                                     "stall_timeout and asked the tracker for the origin's seeder", registry=registry)
        self.fallbacks = Known(Counter("shoal_agent_fallbacks_total",
                                       "Swarm downloads abandoned for the registry, by reason", ["reason"],
                                       registry=registry), FALLBACK_REASONS)
        self.integrity_failures = Known(Counter("shoal_agent_integrity_failures_total",
                                                "Blobs whose bytes did not hash to their digest", ["source"],
                                                registry=registry), DOWNLOAD_SOURCES)
        # A blob from the swarm is hashed once per node ("download": a relayed prefix as it is
        # written, pieces as they are first read for a client, and what neither brought from the
        # file before it enters the cache; the whole file again if the relay was wrong); "reader":
        # bytes a whole-blob reader hashed on its own (the registry path, a cached tail, a reader
        # behind the others). Both over the bytes delivered tell how many passes a blob took.
        self.blob_hash_bytes = Known(Counter("shoal_agent_blob_hash_bytes_total",
                                             "Bytes of in-flight blobs hashed against their digest, by who hashed "
                                             "them", ["by"], registry=registry), HASHED_BY)
        self.swarm_token_expiry = Gauge("shoal_agent_swarm_token_expiry_timestamp_seconds",
                                        "When this node's swarm grants (tokens and certificates, renewed "
                                        "together) expire (0: none yet)",
                                        registry=registry)
        self.origin_failovers = Counter("shoal_agent_origin_failovers_total",
                                        "Admissions answered by an origin other than the blob's first owner "
                                        "(several origins: the ones before it were unreachable or failed)",
                                        registry=registry)
        self.registry_requests = Counter("shoal_agent_registry_requests_total",
                                         "Requests the agent sent to the origin registry",
                                         ["kind", "status"], registry=registry)
        self.provenance_checks = Known(Counter(
            "shoal_agent_provenance_checks_total",
            "Blobs from the cache or the swarm the origin was asked to confirm a registry holds, before they "
            "are served for it (agent/provenance.py)",
            ["result"], registry=registry), PROVENANCE_RESULTS)
