"""Agent configuration (YAML, validated at start)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from shoal import errors, protocol, rendezvous
from shoal.config import (
    DURATION,
    HOSTPORT,
    SIZE,
    URL,
    LogSettings,
    OriginEntry,
    SecretSource,
    TorrentSettings,
    UpstreamSettings,
    check_origins,
    check_upstream_names,
    load_section,
    split_hostport,
)
from shoal.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_bytes: Annotated[int, SIZE] = 20 << 30
    # Every cached blob is hashed again this often (0: never), to find silent corruption.
    scrub_interval: Annotated[float, DURATION] = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # Requests without credentials: "challenge" relays the registry's 401 so the client
    # authenticates itself; "node" uses the upstream's node credentials for them (a trust choice:
    # whoever reaches the agent can pull what the node user can).
    unauthenticated: Literal["challenge", "node"] = "challenge"
    # How long the registry's answer for (credential, repository, blob) is reused.
    decision_ttl: Annotated[float, DURATION] = 60.0
    # Registry unreachable: "strict" refuses what it cannot authorize now; "availability" serves
    # under an earlier "yes" (no older than stale_decision_max_age) and journals that it did.
    mode: Literal["strict", "availability"] = "strict"
    stale_decision_max_age: Annotated[float, DURATION] = 86400.0

    def validate(self, prefix: str) -> None:
        if self.stale_decision_max_age < self.decision_ttl:
            raise ConfigError(f"{prefix}.stale_decision_max_age: must be at least decision_ttl")


DEFAULT_ROLL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class JournalSettings:
    # A journal segment is closed and a new one started at this size.
    max_segment_bytes: Annotated[int, SIZE] = 64 << 20
    # Ship records to the origin's collector (needs origin and node_token).
    ship: bool = True
    # Journal bytes on disk at most (and the end records of responses under way); past it the
    # agent answers 503 (nothing is served unrecorded) until shipping catches up. Unset: 1 GiB
    # when the journal is shipped, no limit when it is kept on the node only (then pruning it
    # is the operator's).
    max_disk_bytes: Annotated[int | None, SIZE] = None
    # Shipped records kept on disk: once the collector has everything and the open segment holds
    # this much, the segment is closed and deleted (about 2,000 requests at 1 MiB). Unset: 1 MiB,
    # or less to fit max_segment_bytes and half of max_disk_bytes.
    roll_bytes: Annotated[int | None, SIZE] = None

    def validate(self, prefix: str) -> None:
        if self.roll_bytes is None:
            return
        if not 64 << 10 <= self.roll_bytes <= self.max_segment_bytes:
            raise ConfigError(f"{prefix}.roll_bytes: must be between 64KiB and max_segment_bytes")
        if self.max_disk_bytes is not None and self.roll_bytes > self.max_disk_bytes // 2:
            # the journal would reach its budget before the roll: every request refused for good
            raise ConfigError(f"{prefix}.roll_bytes: must be at most half of max_disk_bytes")

    @property
    def roll_size(self) -> int:
        if self.roll_bytes is not None:
            return self.roll_bytes
        fits = [DEFAULT_ROLL_BYTES, self.max_segment_bytes]
        return min(fits if self.max_disk_bytes is None else [*fits, self.max_disk_bytes // 2])


@dataclass(frozen=True, slots=True)
class SwarmPolicy:
    # Blobs below this size go straight to the registry.
    threshold: Annotated[int, SIZE] = 1 << 20
    # Budget for the admission of a blob below `threshold` (the origin answers at once: it seeds
    # the blob already, or not), and how long a download waits for this node's enrollment right
    # after start.
    metainfo_timeout: Annotated[float, DURATION] = 2.0
    # Budget for an admission: the origin asks the registry, and fetches, verifies and hashes a
    # blob it does not have yet.
    seed_timeout: Annotated[float, DURATION] = 120.0
    # From joining the swarm to the first verified piece; then between pieces.
    first_piece_timeout: Annotated[float, DURATION] = 10.0
    stall_timeout: Annotated[float, DURATION] = 10.0


@dataclass(frozen=True, slots=True)
class ContainerdSettings:
    # containerd's hosts directory (its `config_path`, e.g. /etc/containerd/certs.d). Set, the
    # agent keeps <config_path>/<upstream name>/hosts.toml pointing at itself while it is ready
    # and at the registry alone otherwise (agent/hostsconf.py, agent/watchdog.py). Unset: the
    # agent never touches containerd's files.
    config_path: str | None = None
    # How containerd reaches this agent (scheme://host:port, no path). Default: http://<listen>,
    # with 127.0.0.1 (or ::1) for an unspecified listen address.
    mirror: Annotated[str | None, URL] = None
    # Also <config_path>/_default/hosts.toml: every registry without its own directory tries the
    # agent first; the agent answers 404 for registries it does not serve, and containerd goes
    # to the registry.
    default_host: bool = False
    # containerd >= 2.1 stops connecting to a dead agent after this; 1.6 and 1.7 ignore it.
    dial_timeout: Annotated[float, DURATION] = 1.0
    # How often the watchdog asks the agent's /readyz (each ask waits at most this long); two
    # failures in a row point containerd at the registry.
    check_interval: Annotated[float, DURATION] = 1.0

    def validate(self, prefix: str) -> None:
        if self.config_path is not None and not os.path.isabs(self.config_path):
            raise ConfigError(f"{prefix}.config_path: must be an absolute path")
        if self.mirror is not None:
            parts = urlsplit(self.mirror)
            if (parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query
                    or parts.fragment or "#" in self.mirror or parts.port is None):
                raise ConfigError(f"{prefix}.mirror: expected http(s)://host:port without a path")
        if self.dial_timeout <= 0:
            raise ConfigError(f"{prefix}.dial_timeout: must be positive")
        if not 0.1 <= self.check_interval <= 60:
            raise ConfigError(f"{prefix}.check_interval: must be between 100ms and 60s")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    data_dir: str
    upstreams: list[UpstreamSettings]
    listen: Annotated[str, HOSTPORT] = "127.0.0.1:5050"
    node: str = field(default_factory=lambda: default_node_name(socket.gethostname()))
    # Without an origin the agent is a plain verifying pull-through cache.
    origin: Annotated[str | None, URL] = None
    # The zone this node is in (the chart sets it from topology.kubernetes.io/zone): trackers
    # hand it its zone's peers first, others' only to fill what the zone lacks. "" for none.
    zone: str = ""
    # Several origins (instead of `origin`), each {name, url}, the same list (same names) as the
    # origins have: a blob's admission goes to its owners by rendezvous hashing, then to the
    # others in the same order; the journal to the first live one in the order of this node's name.
    origins: list[OriginEntry] = field(default_factory=list)
    # How many origins own (seed) each blob: the same number as the origins' own.
    origin_replication: int = rendezvous.DEFAULT_REPLICATION
    # No longer used: announces go to the tracker the origin names in each torrent. Accepted (with
    # a warning at start) so that configurations written for earlier versions still load.
    tracker: Annotated[str | None, URL] = None
    # With the swarm: the cluster's node secret (file or env) for the origin's API, and the
    # origin's public key (PEM file) that metainfo, grants and receipts must verify against.
    node_token: SecretSource = field(default_factory=SecretSource)
    origin_public_key: str | None = None
    torrent: TorrentSettings = field(default_factory=TorrentSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    journal: JournalSettings = field(default_factory=JournalSettings)
    swarm: SwarmPolicy = field(default_factory=SwarmPolicy)
    containerd: ContainerdSettings = field(default_factory=ContainerdSettings)
    # Blobs larger than this are refused before download.
    max_blob_size: Annotated[int, SIZE] = 64 << 30
    # Longest silence tolerated on a registry connection.
    registry_read_timeout: Annotated[float, DURATION] = 30.0
    # Connections served at once (containerd, kubelet and other nodes' fetches on one node);
    # past it the oldest idle or slow one is closed (shoal/web.py).
    max_connections: int = 1024
    log: LogSettings = field(default_factory=LogSettings)

    def validate(self, prefix: str) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections: must be at least 1")
        check_upstream_names(self.upstreams, "upstreams")
        if self.containerd.mirror is not None:
            check_mirror(self.containerd.mirror, self.listen)
        if self.containerd.config_path is not None:
            for i, upstream in enumerate(self.upstreams):
                # each name is a directory under config_path
                if upstream.name.strip(".") == "":
                    raise ConfigError(f"upstreams[{i}].name: {upstream.name!r} cannot name a directory of "
                                      "containerd.config_path")
        if self.origin is not None and self.origins:
            raise ConfigError("origins: give either origin (one) or origins (several), not both")
        check_origins(self.origins, self.origin_replication, "origins", "origin_replication")
        if self.origin_entries:
            if self.node_token.file is None and self.node_token.env is None:
                raise ConfigError("node_token: give file or env (required with origin)")
            if self.origin_public_key is None:
                raise ConfigError("origin_public_key: required with origin (PEM file)")
        try:
            protocol.node_name(self.node)
        except errors.BadRequest as exc:
            raise ConfigError(str(exc)) from None
        if self.zone and not protocol.ZONE_RE.fullmatch(self.zone):
            raise ConfigError("zone: must be a label value (letters, digits, '-', '_', '.'; at most 63, "
                              "starting and ending with a letter or digit)")


    @property
    def origin_entries(self) -> list[OriginEntry]:
        """The origins as one list: `origin` alone is one origin (its name matters to nobody)."""
        if self.origins:
            return list(self.origins)
        return [OriginEntry("origin", self.origin)] if self.origin is not None else []


def check_mirror(mirror: str, listen: str) -> None:
    """containerd must go where the watchdog checks the agent: an address the agent's socket
    holds (listen's IP, or a loopback IP of its family when listen is unspecified) and listen's
    port. A name (localhost) or another address could be held by another process, which would
    get containerd's pulls and credentials while the real agent passes every check."""
    parts = urlsplit(mirror)
    host, port = split_hostport(listen)
    try:
        want, got = ipaddress.ip_address(host), ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        raise ConfigError("containerd.mirror: must be an IP address (the one listen holds), not a name") from None
    # An unspecified listen holds its family's loopback; [::] is dual stack (shoal/web.py), so
    # it holds 127.0.0.1 too.
    held = got == want or (want.is_unspecified and got.is_loopback and (got.version == want.version
                                                                         or want.version == 6))
    if not held or parts.port != port:
        raise ConfigError(f"containerd.mirror: must name an address and port listen holds ({listen})")


def default_node_name(hostname: str) -> str:
    """The host name as a node name (a lowercase DNS name): `My_Host` is `my-host`."""
    name = re.sub(r"[^a-z0-9.-]+", "-", hostname.lower())[:253].strip("-.")
    return name if protocol.NODE_NAME_RE.fullmatch(name) else "node"


def load(doc: dict[str, Any]) -> AgentConfig:
    return load_section(AgentConfig, doc)
