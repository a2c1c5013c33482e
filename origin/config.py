"""Origin configuration (YAML, validated at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from shoal import protocol, rendezvous
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
)
from shoal.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_bytes: Annotated[int, SIZE] = 100 << 30


Role = Literal["seed", "audit", "admin"]


@dataclass(frozen=True, slots=True)
class OperatorTokenSettings:
    # The operators file (shoal-origin add-operator writes it): names, roles, token hashes.
    file: str | None = None


@dataclass(frozen=True, slots=True)
class RegistryOperatorSettings:
    """Operators who sign in with their registry login, checked by that registry."""

    # The upstream (its `name`) that checks the credentials; its identities are the principals.
    upstream: str
    # principal (the registry's user name, or a token's `sub`) -> roles
    roles: dict[str, list[Role]] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        for principal, roles in self.roles.items():
            if not roles:
                raise ConfigError(f"{prefix}.roles.{principal}: give at least one of seed, audit, admin")
            if principal in ("", "anonymous"):
                raise ConfigError(f"{prefix}.roles.{principal}: anonymous callers cannot hold a role")


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Who may pre-seed, query the audit trail, or list what is seeded (not the node token)."""

    tokens: OperatorTokenSettings = field(default_factory=OperatorTokenSettings)
    registry: RegistryOperatorSettings | None = None
    # How long a registry's verdict on an operator credential is reused (keyed by an HMAC of it).
    cache_ttl: Annotated[float, DURATION] = 60.0
    # Credentials remembered at most (a flood of wrong ones cannot grow the origin's memory).
    cache_size: int = 10_000

    def validate(self, prefix: str) -> None:
        if self.cache_ttl > 3600:
            raise ConfigError(f"{prefix}.cache_ttl: at most 1h (a revoked login stays valid this long)")
        if self.cache_size < 1:
            raise ConfigError(f"{prefix}.cache_size: must be at least 1")


@dataclass(frozen=True, slots=True)
class OriginConfig:
    data_dir: str
    upstreams: list[UpstreamSettings]
    # Base URL of the tracker (registration API and, unless announce_url is set, announces).
    tracker: Annotated[str, URL]
    listen: Annotated[str, HOSTPORT] = "127.0.0.1:6970"
    # The announce URL written into every torrent, as agents reach the tracker.
    announce_url: Annotated[str | None, URL] = None
    registration_token: SecretSource = field(default_factory=SecretSource)
    # The origin's Ed25519 private key (PEM file): signs metainfo and swarm tokens.
    signing_key: str | None = None
    # The cluster's node secret (file or env): agents present it (never valid for operator routes).
    node_token: SecretSource = field(default_factory=SecretSource)
    # How long a node's grants (a swarm token and a certificate per blob) are valid; nodes renew
    # them at half-life. A banned node drops out of every swarm within this.
    swarm_token_ttl: Annotated[float, DURATION] = 86400.0
    # How long the registry's answer to an admission check is kept (per credential, repository
    # and blob): a puller revoked at the registry gets no new admission after this.
    admission_ttl: Annotated[float, DURATION] = 60.0
    torrent: TorrentSettings = field(default_factory=lambda: TorrentSettings(listen="127.0.0.1:6882"))
    cache: CacheSettings = field(default_factory=CacheSettings)
    # Blobs larger than this are refused before download.
    max_blob_size: Annotated[int, SIZE] = 64 << 30
    # Blobs a pre-seed job fetches at once.
    preseed_concurrency: int = 4
    # Connections served at once (every node's seed requests and journal shipping);
    # past it the oldest idle or slow one is closed (shoal/web.py).
    max_connections: int = 2048
    # Node names the origin enrolls (each bound to its key); past it, new names are refused.
    max_nodes: int = 10_000
    operators: OperatorSettings = field(default_factory=OperatorSettings)
    log: LogSettings = field(default_factory=LogSettings)
    # Several origins (shoal/rendezvous.py): every origin of the cluster as {name, url}, the same
    # list the agents have, and this origin's own `name` in it. Each blob is owned (fetched and
    # seeded) by `origin_replication` of them; they share signing_key, node_token,
    # registration_token and `peer_token` (README "Several origins"). Empty: this origin alone.
    name: str | None = None
    origins: list[OriginEntry] = field(default_factory=list)
    origin_replication: int = rendezvous.DEFAULT_REPLICATION
    # The secret the origins share to ask each other to seed a blob (never the node token).
    peer_token: SecretSource = field(default_factory=SecretSource)

    def validate(self, prefix: str) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections: must be at least 1")
        if self.max_nodes < 1:
            raise ConfigError("max_nodes: must be at least 1")
        check_upstream_names(self.upstreams, "upstreams")
        if self.registration_token.file is None and self.registration_token.env is None:
            raise ConfigError("registration_token: give file or env (shared with the tracker)")
        if self.signing_key is None:
            raise ConfigError("signing_key: required (PEM file of the origin's Ed25519 private key)")
        if self.node_token.file is None and self.node_token.env is None:
            raise ConfigError("node_token: give file or env (the cluster's node secret)")
        if self.swarm_token_ttl < 60:
            raise ConfigError("swarm_token_ttl: must be at least 60s")
        if not 0 <= self.admission_ttl <= 3600:
            raise ConfigError("admission_ttl: must be between 0s and 1h")
        if not 1 <= self.preseed_concurrency <= 64:
            raise ConfigError("preseed_concurrency: must be between 1 and 64")
        check_origins(self.origins, self.origin_replication, "origins", "origin_replication")
        if self.origins:
            if self.name is None:
                raise ConfigError("name: required with origins (this origin's name in that list)")
            if self.name not in [o.name for o in self.origins]:
                raise ConfigError(f"name: {self.name!r} is not one of origins' names")
            if self.peer_token.file is None and self.peer_token.env is None:
                raise ConfigError("peer_token: give file or env with origins (a secret the origins share)")
        names = [u.name for u in self.upstreams]
        if self.operators.registry is not None and self.operators.registry.upstream not in names:
            raise ConfigError(f"operators.registry.upstream: {self.operators.registry.upstream!r} is not one of "
                              f"upstreams ({', '.join(names)})")

    @property
    def announce(self) -> str:
        return self.announce_url or protocol.ANNOUNCE.url(self.tracker)


def load(doc: dict[str, Any]) -> OriginConfig:
    return load_section(OriginConfig, doc)
