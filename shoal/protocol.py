"""The HTTP protocol between shoal's components, defined once: routes, headers and bodies.

Servers register these patterns in their route tables; clients (the agent, the origin's
registration, the CLI, tests and bench) build URLs from the same objects, so a path exists in
exactly one place. JSON bodies are the dataclasses below: both ends write them with `to_json`
and read them with `from_json`, which refuses a malformed document with a 400 naming the field.
The mirror API (`/v2/...`) is the OCI distribution spec's: only its entry points are listed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote, urlencode

from shoal import errors


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: str  # aiohttp's route syntax: "{name}" is one path segment

    def path(self, **params: str) -> str:
        """The path with its segments filled in, each quoted so that a value never adds a segment
        (":" stays, as in "sha256:...")."""
        return self.pattern.format(**{k: quote(str(v), safe=":") for k, v in params.items()})

    def url(self, base: str, query: dict[str, str] | None = None, **params: str) -> str:
        url = base.rstrip("/") + self.path(**params)
        return f"{url}?{urlencode(query)}" if query else url


# The agent's mirror API: the OCI distribution spec's routes, dispatched inside the agent
MIRROR_BASE = Route("*", "/v2")
MIRROR_ROOT = Route("*", "/v2/")
MIRROR = Route("*", "/v2/{tail:.*}")

# Every component
HEALTHZ = Route("GET", "/healthz")
READYZ = Route("GET", "/readyz")
METRICS = Route("GET", "/metrics")
STATUS = Route("GET", "/v1/status")

# Origin: seeding, swarm tokens, the journal collector, audit queries, pre-seed jobs
SEED_BLOB = Route("POST", "/v1/blobs/{digest}/seed")
SWARM_TOKEN = Route("POST", "/v1/swarm/token")
JOURNAL = Route("POST", "/v1/journal")
AUDIT = Route("GET", "/v1/audit")
PRESEED = Route("POST", "/v1/preseed")
PRESEED_JOB = Route("GET", "/v1/preseed/{job}")

# Tracker: BEP 3 announce and BEP 48 scrape, and the registered metainfo
ANNOUNCE = Route("GET", "/announce")
SCRAPE = Route("GET", "/scrape")
METAINFO = Route("GET", "/v1/metainfo/{digest}")
REGISTER_METAINFO = Route("PUT", "/v1/metainfo/{digest}")
UNREGISTER_METAINFO = Route("DELETE", "/v1/metainfo/{digest}")


# Headers
SIGNATURE_HEADER = "Shoal-Signature"  # the origin's Ed25519 signature of a metainfo (base64)
TORRENT_TYPE = "application/x-bittorrent"


# Bodies

def _doc(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise errors.BadRequest(errors.INVALID_REQUEST, "body must be a JSON object")
    return doc


def _text(doc: dict[str, Any], key: str, *, max_length: int = 1024) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a string of 1 to {max_length} characters")
    return value


def _texts(doc: dict[str, Any], key: str, *, required: bool) -> list[str]:
    value = doc.get(key, None if required else [])
    if not isinstance(value, list) or (required and not value) or not all(isinstance(v, str) for v in value):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a {'non-empty ' if required else ''}"
                                                        "list of strings")
    return value


def _count(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a non-negative integer")
    return value


@dataclass(frozen=True, slots=True)
class SeedRequest:
    """POST SEED_BLOB: the blob's registry (`ns`) and repository; answered with the metainfo
    (TORRENT_TYPE) and its signature in SIGNATURE_HEADER."""

    ns: str
    repository: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SeedRequest:
        d = _doc(doc)
        return cls(_text(d, "ns", max_length=255), _text(d, "repository", max_length=255))


@dataclass(frozen=True, slots=True)
class SwarmTokenRequest:
    node: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SwarmTokenRequest:
        return cls(_text(_doc(doc), "node", max_length=253))


@dataclass(frozen=True, slots=True)
class SwarmToken:
    token: str
    ttl_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SwarmToken:
        d = _doc(doc)
        ttl = d.get("ttl_seconds")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            raise errors.BadRequest(errors.INVALID_REQUEST, "ttl_seconds must be a positive number")
        return cls(_text(d, "token", max_length=4096), float(ttl))


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """POST JOURNAL: one node's records, as they are in its journal (checked by shoal.audit)."""

    node: str
    records: list[Any]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "records": self.records}

    @classmethod
    def from_json(cls, doc: Any) -> JournalBatch:
        d = _doc(doc)
        records = d.get("records")
        if not isinstance(records, list):
            raise errors.BadRequest(errors.INVALID_REQUEST, "records must be a list")
        return cls(_text(d, "node", max_length=253), records)


@dataclass(frozen=True, slots=True)
class JournalAck:
    accepted: int
    duplicates: int
    rejected: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> JournalAck:
        d = _doc(doc)
        return cls(_count(d, "accepted"), _count(d, "duplicates"), _count(d, "rejected"))


@dataclass(frozen=True, slots=True)
class PreseedRequest:
    """POST PRESEED: images to seed whole, optionally only some platforms; answered 202 with the
    job (its `id` names it in PRESEED_JOB)."""

    images: list[str]
    platforms: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "platforms": self.platforms}

    @classmethod
    def from_json(cls, doc: Any) -> PreseedRequest:
        d = _doc(doc)
        return cls(_texts(d, "images", required=True), _texts(d, "platforms", required=False))
