"""Origin configuration (YAML, validated at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from shoal import metainfo, protocol, rendezvous
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


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """A PostgreSQL database that holds the audit trail, enrolled nodes and banned keys: every
    origin given the same one shares them (origin/audit_postgres.py)."""

    host: str
    dbname: str
    user: str
    # The role's password (file or env; never inline). None: the server's other methods (a
    # client certificate, trust on a private socket).
    password: SecretSource = field(default_factory=SecretSource)
    port: int = 5432
    # libpq's sslmode; verify-full checks the server's certificate against sslrootcert and its name.
    sslmode: SslMode = "prefer"
    sslrootcert: str | None = None
    # Connections to PostgreSQL at most (and so store calls at once).
    pool_size: int = 4
    # How long a call waits for a connection (PostgreSQL down: the collector answers 503 after it).
    connect_timeout: Annotated[float, DURATION] = 5.0
    # Shown in pg_stat_activity (tell the origins apart).
    application_name: str = "shoal-origin"

    def validate(self, prefix: str) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{prefix}.port: expected 1 to 65535, got {self.port}")
        if not 1 <= self.pool_size <= 100:
            raise ConfigError(f"{prefix}.pool_size: must be between 1 and 100")
        if not 1 <= self.connect_timeout <= 300:
            raise ConfigError(f"{prefix}.connect_timeout: must be between 1s and 5m")
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            raise ConfigError(f"{prefix}.sslrootcert: required with sslmode {self.sslmode} (the CA's PEM file)")
        for key in ("host", "dbname", "user", "application_name"):
            value = getattr(self, key)
            if not value or any(c in value for c in "\x00\r\n"):
                raise ConfigError(f"{prefix}.{key}: must be a non-empty single line")


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """Where the collector keeps the audit trail: SQLite in data_dir unless postgresql is set."""

    postgresql: PostgresSettings | None = None


@dataclass(frozen=True, slots=True)
class PushRule:
    """Which pushed images the origin pre-seeds (origin/notifications.py): globs (fnmatch; `*`
    also crosses `/`) over the repository name without the registry and over the tag."""

    repositories: list[str]
    tags: list[str] = field(default_factory=lambda: ["*"])
    # For an index: only these platforms' manifests ("linux/amd64", "linux/arm/v7"); empty: all.
    platforms: list[str] = field(default_factory=list)

    def validate(self, prefix: str) -> None:
        if not self.repositories or not all(self.repositories):
            raise ConfigError(f"{prefix}.repositories: give at least one glob, e.g. 'team/*'")
        if not self.tags or not all(self.tags):
            raise ConfigError(f"{prefix}.tags: give at least one glob, e.g. 'v*' (or leave it out: every tag)")
        for platform in self.platforms:
            if not 2 <= len(platform.split("/")) <= 3 or not all(platform.split("/")):
                raise ConfigError(f"{prefix}.platforms: expected os/architecture[/variant], got {platform!r}")


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    """The registry's push notifications (distribution's `notifications.endpoints`, Harbor's
    webhooks) pre-seed what `rules` select. No rule: nothing is seeded."""

    # The secret the registry sends as `Authorization: Bearer <token>` (file or env).
    token: SecretSource = field(default_factory=SecretSource)
    # The upstream (its `name`) whose pushes these are; the only one if there is one.
    upstream: str | None = None
    # Registry host names events may name besides the upstream's name and URL host (the address
    # clients push to, if neither); an event naming another registry is ignored.
    hosts: list[str] = field(default_factory=list)
    rules: list[PushRule] = field(default_factory=list)
    # Pushed images waiting for a pre-seed job at most; past it new ones are dropped (counted, logged).
    queue_size: int = 100
    # Pre-seed jobs running at once for pushes (each fetches preseed_concurrency blobs at once).
    jobs: int = 2
    # A push of the same image again within this window is not seeded again (the registry may
    # deliver an event twice; several tags may name one digest).
    dedupe_window: Annotated[float, DURATION] = 600.0

    def validate(self, prefix: str) -> None:
        if self.token.file is None and self.token.env is None:
            raise ConfigError(f"{prefix}.token: give file or env (the registry sends it as a Bearer token)")
        if not 1 <= self.queue_size <= 100_000:
            raise ConfigError(f"{prefix}.queue_size: must be between 1 and 100000")
        if not 1 <= self.jobs <= 16:
            raise ConfigError(f"{prefix}.jobs: must be between 1 and 16")
        if not 0 <= self.dedupe_window <= 86400:
            raise ConfigError(f"{prefix}.dedupe_window: must be between 0s and 24h")


@dataclass(frozen=True, slots=True)
class OriginConfig:
    data_dir: str
    upstreams: list[UpstreamSettings]
    # Base URL of the tracker (registration API and, unless announce_url is set, announces).
    tracker: Annotated[str | None, URL] = None
    listen: Annotated[str, HOSTPORT] = "127.0.0.1:6970"
    # The announce URL written into every torrent, as agents reach the tracker.
    announce_url: Annotated[str | None, URL] = None
    # Instead of `tracker`: the base URLs of tracker replicas sharing one Redis. Every torrent
    # names them all (announce_urls, if set, as agents reach them); nodes move to the next when
    # one fails, and the origin registers at the first that answers.
    trackers: list[Annotated[str, URL]] = field(default_factory=list)
    announce_urls: list[Annotated[str, URL]] = field(default_factory=list)
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
    # Hand out each blob's first copy over HTTP, a piece per node (origin/firstcopy.py); off, the
    # seeder serves every node that the tracker hands it to.
    first_copy: bool = True
    # Blobs a pre-seed job fetches at once.
    preseed_concurrency: int = 4
    # Connections served at once (every node's seed requests and journal shipping);
    # past it the oldest idle or slow one is closed (shoal/web.py).
    max_connections: int = 2048
    # Node names the origin enrolls (each bound to its key); past it, new names are refused.
    max_nodes: int = 10_000
    operators: OperatorSettings = field(default_factory=OperatorSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
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
    # Pre-seed on push: the registry's notifications (README "Pre-seed on push"). None: off.
    notifications: NotificationSettings | None = None

    def validate(self, prefix: str) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections: must be at least 1")
        if self.max_nodes < 1:
            raise ConfigError("max_nodes: must be at least 1")
        if (self.tracker is None) == (not self.trackers):
            raise ConfigError("tracker: give either tracker (one URL) or trackers (a list of replicas)")
        if self.trackers and self.announce_url is not None:
            raise ConfigError("announce_url: with trackers, give announce_urls (one per replica)")
        if self.announce_urls and len(self.announce_urls) != len(self.trackers):
            raise ConfigError("announce_urls: give one per entry of trackers, in the same order")
        if len(self.trackers) > metainfo.MAX_TRACKERS:
            raise ConfigError(f"trackers: at most {metainfo.MAX_TRACKERS}")
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
        if self.notifications is not None:
            notify = self.notifications.upstream
            if notify is None and len(names) > 1:
                raise ConfigError(f"notifications.upstream: name the upstream that sends them ({', '.join(names)})")
            if notify is not None and notify not in names:
                raise ConfigError(f"notifications.upstream: {notify!r} is not one of upstreams ({', '.join(names)})")

    @property
    def tracker_urls(self) -> list[str]:
        return [self.tracker] if self.tracker is not None else list(self.trackers)

    @property
    def announce(self) -> list[str]:
        """The announce URLs every torrent names."""
        if self.announce_url is not None:
            return [self.announce_url]
        return list(self.announce_urls) or [protocol.ANNOUNCE.url(t) for t in self.tracker_urls]


def load(doc: dict[str, Any]) -> OriginConfig:
    return load_section(OriginConfig, doc)
