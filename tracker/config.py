"""Tracker configuration (YAML, validated at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from shoal import announcing
from shoal.config import DURATION, HOSTPORT, LogSettings, SecretSource, load_section
from shoal.errors import ConfigError
from shoal_tracker import zones
from shoal_tracker.peers import ORIGIN_SPARE, SPARE_SCAN


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where tracker replicas keep peers and registered metainfo (tracker/redisstore.py)."""

    address: Annotated[str, HOSTPORT] = "127.0.0.1:6379"
    db: int = 0
    username: str | None = None
    password: SecretSource = field(default_factory=SecretSource)
    # Keys are named under this (several clusters may share one Redis).
    prefix: str = "shoal:"
    # Longest wait for Redis per command; an announce it fails gets a `failure reason` at once.
    timeout: Annotated[float, DURATION] = 2.0
    # Connections to Redis per tracker process (announces past it wait up to `timeout`).
    max_connections: int = 32

    def validate(self, prefix: str) -> None:
        if not 0 <= self.db <= 15:
            raise ConfigError(f"{prefix}.db: must be between 0 and 15")
        if not 0 < self.timeout <= 30:
            raise ConfigError(f"{prefix}.timeout: must be more than 0s and at most 30s")
        if not 1 <= self.max_connections <= 1024:
            raise ConfigError(f"{prefix}.max_connections: must be between 1 and 1024")
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ConfigError(f"{prefix}.prefix: must be non-empty, without spaces")


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    listen: Annotated[str, HOSTPORT] = "127.0.0.1:6969"
    # Where registered metainfo is kept across restarts; None keeps it in memory only.
    data_dir: str | None = None
    # The announce interval every peer uses (shoal.announcing: peers cannot choose another).
    interval: Annotated[float, DURATION] = 30.0
    # Least time between announces a peer may force (capped at interval in answers).
    min_interval: Annotated[float, DURATION] = 5.0
    # Peers not heard from for this long are dropped. Default: three intervals plus the announce
    # timeout (a peer survives two lost announces); never less than one interval plus it.
    peer_ttl: Annotated[float | None, DURATION] = None
    numwant_default: int = 50
    numwant_max: int = 200
    max_peers_per_torrent: int = 5000
    # Entries one source address may hold in a swarm (a node has one; an agent and the origin on
    # one host two; a restart's new port replaces the address's oldest entry).
    max_peers_per_address: int = 8
    # Leechers of a zone that are handed other zones' peers (tracker/zones.py).
    zone_gateways: int = zones.ZONE_GATEWAYS
    # Seeders of its own (on as many nodes) a swarm needs before leechers are no longer handed
    # the origin's seeder (tracker/peers.py); 0: always handed.
    origin_spare: int = ORIGIN_SPARE
    # Peers and registered metainfo in Redis, shared by every tracker replica; None: in this
    # process (with data_dir for the metainfo), the one-tracker default.
    redis: RedisSettings | None = None
    # Connections served at once (announces from thousands of nodes, kept alive or not);
    # past it the oldest idle or slow one is closed (shoal/web.py).
    max_connections: int = 4096
    # Shared secret the origin presents to register metainfo (file or env; required).
    registration_token: SecretSource = field(default_factory=SecretSource)
    # The origin's Ed25519 public key (PEM file): verifies metainfo signatures and swarm tokens.
    origin_public_key: str | None = None
    # The cluster's node secret (file or env): agents present it to fetch metainfo.
    node_token: SecretSource = field(default_factory=SecretSource)
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def ttl(self) -> float:
        return self.peer_ttl if self.peer_ttl is not None else announcing.default_peer_ttl(self.interval)

    @property
    def spare_window(self) -> float:
        """How recently a seeder must have announced to count toward origin_spare: a third of the
        default peer_ttl (one interval and a third of the announce timeout: a node that missed
        an announce does not count), never more however long an operator makes peer_ttl."""
        return min(self.ttl, announcing.default_peer_ttl(self.interval)) / 3

    def validate(self, prefix: str) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections: must be at least 1")
        if self.interval < announcing.MIN_INTERVAL or self.interval != int(self.interval):
            raise ConfigError(f"interval: must be a whole number of seconds, at least {announcing.MIN_INTERVAL}s")
        if self.peer_ttl is not None and self.peer_ttl < announcing.min_peer_ttl(self.interval):
            raise ConfigError(
                f"peer_ttl: {self.peer_ttl:g}s would drop live peers between their announces; it must be at "
                f"least interval + {announcing.ANNOUNCE_TIMEOUT}s (the announce timeout) = "
                f"{announcing.min_peer_ttl(self.interval):g}s, default 3 x interval + "
                f"{announcing.ANNOUNCE_TIMEOUT}s")
        if not 1 <= self.zone_gateways <= 64:
            raise ConfigError("zone_gateways: must be between 1 and 64")
        if not 0 <= self.origin_spare <= SPARE_SCAN:
            raise ConfigError(f"origin_spare: must be between 0 (always hand out the origin) and {SPARE_SCAN}")
        if self.redis is not None and self.data_dir is not None:
            raise ConfigError("data_dir: not used with redis (registered metainfo is kept in Redis); remove one")
        if self.max_peers_per_address < 1:
            raise ConfigError("max_peers_per_address: must be at least 1")
        if not 1 <= self.numwant_default <= self.numwant_max:
            raise ConfigError("numwant_default: must be between 1 and numwant_max")
        if self.registration_token.file is None and self.registration_token.env is None:
            raise ConfigError("registration_token: give file or env (the origin's registration secret)")
        if self.origin_public_key is None:
            raise ConfigError("origin_public_key: required (the PEM file of the origin's public key)")
        if self.node_token.file is None and self.node_token.env is None:
            raise ConfigError("node_token: give file or env (the cluster's node secret)")


def load(doc: dict[str, Any]) -> TrackerConfig:
    return load_section(TrackerConfig, doc)
