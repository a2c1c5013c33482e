"""The HTTP protocol between shoal's components, defined once: routes, headers and bodies.

Servers register these patterns in their route tables; clients (the agent, the origin's
registration, the CLI, tests and bench) build URLs from the same objects, so a path exists in
exactly one place. JSON bodies are the dataclasses below: both ends write them with `to_json`
and read them with `from_json`, which refuses a malformed document with a 400 naming the field.
The mirror API (`/v2/...`) is the OCI distribution spec's: only its entry points are listed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
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
SEEDED = Route("GET", "/v1/seeded")  # what the origin seeds (STATUS, which is public, has counts only)

# Tracker: BEP 3 announce and BEP 48 scrape (for nodes: seeder counts tell what is cached),
# and the registered metainfo
ANNOUNCE = Route("GET", "/announce")
SCRAPE = Route("GET", "/scrape")
METAINFO = Route("GET", "/v1/metainfo/{digest}")
REGISTER_METAINFO = Route("PUT", "/v1/metainfo/{digest}")
UNREGISTER_METAINFO = Route("DELETE", "/v1/metainfo/{digest}")


# Headers
SIGNATURE_HEADER = "Shoal-Signature"  # the origin's Ed25519 signature of a metainfo (base64)
NODE_SIGNATURE_HEADER = "Shoal-Node-Signature"  # a node's signature of its journal batch (base64)
# The registries the origin vouches hold a blob, each with its signature (signing.sign_source):
# "ns=signature;ns=signature". The origin sends them with a seed answer (for the ns asked) and with
# a registration (all it knows); the tracker hands them out with the metainfo.
SOURCES_HEADER = "Shoal-Sources"
MAX_SOURCES = 64
_SOURCE_ITEM = re.compile(r"([A-Za-z0-9.:\[\]-]{1,255})=([A-Za-z0-9_-]{1,128})")


def encode_sources(sources: dict[str, str]) -> str:
    return ";".join(f"{ns}={sig}" for ns, sig in sorted(sources.items()))


def parse_sources(value: str | None) -> dict[str, str]:
    """What SOURCES_HEADER says (signatures unchecked: the caller verifies them)."""
    if not value:
        return {}
    items = value.split(";")
    if len(items) > MAX_SOURCES:
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{SOURCES_HEADER}: more than {MAX_SOURCES} sources")
    out: dict[str, str] = {}
    for item in items:
        m = _SOURCE_ITEM.fullmatch(item.strip())
        if m is None:
            raise errors.BadRequest(errors.INVALID_REQUEST, f"{SOURCES_HEADER}: expected ns=signature;...")
        out[m.group(1)] = m.group(2)
    return out
TORRENT_TYPE = "application/x-bittorrent"


# Bodies

def _doc(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise errors.BadRequest(errors.INVALID_REQUEST, "body must be a JSON object")
    return doc


def _text(doc: dict[str, Any], key: str, *, max_length: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a string of 1 to {max_length} characters")
    return value


# A node's name: a lowercase DNS name (as Kubernetes names nodes), one spelling per node. Names
# that only look alike (spaces, zero-width or look-alike letters) or carry control characters
# would pass for another node in the audit, or forge log lines.
NODE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def node_name(value: str, key: str = "node") -> str:
    if not NODE_NAME_RE.fullmatch(value):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a lowercase DNS name (a-z, 0-9, '-', '.'; "
                                                        "at most 253 characters)")
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
    """POST SWARM_TOKEN: the node's name and the public key (PEM) its swarm certificate is for."""

    node: str
    public_key: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SwarmTokenRequest:
        d = _doc(doc)
        return cls(node_name(_text(d, "node", max_length=253)), _text(d, "public_key", max_length=512))


@dataclass(frozen=True, slots=True)
class SwarmToken:
    """The answer: a token to announce with, and a certificate (PEM) to present to peers, both
    valid for ttl_seconds."""

    token: str
    ttl_seconds: float
    certificate: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SwarmToken:
        d = _doc(doc)
        ttl = d.get("ttl_seconds")
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            raise errors.BadRequest(errors.INVALID_REQUEST, "ttl_seconds must be a positive number")
        return cls(_text(d, "token", max_length=4096), float(ttl), _text(d, "certificate", max_length=8192))


# The collector's limit on a JOURNAL body; a batch is built to fit it (agent/shipper.py).
JOURNAL_MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """POST JOURNAL: one node's records, as they are in its journal (checked by shoal.audit)."""

    node: str
    records: list[Any]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "records": self.records}

    def encode(self) -> bytes:
        """The body as sent: the journal's own encoding (compact, UTF-8), so a batch is as long
        as the journal lines it carries. (aiohttp's default escapes non-ASCII text, which grew a
        batch up to 3x, past JOURNAL_MAX_BODY: a 413, the same batch retried forever.)"""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, doc: Any) -> JournalBatch:
        d = _doc(doc)
        records = d.get("records")
        if not isinstance(records, list):
            raise errors.BadRequest(errors.INVALID_REQUEST, "records must be a list")
        return cls(node_name(_text(d, "node", max_length=253)), records)


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


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a non-negative number")
    return float(value)


def _optional_text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be a string or null")
    return value


@dataclass(frozen=True, slots=True)
class PreseedBlob:
    digest: str
    size: int
    state: str  # pending, seeding, done, skipped, failed
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> PreseedBlob:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=255), _count(d, "size"), _text(d, "state", max_length=32),
                   _optional_text(d, "error"))


@dataclass(frozen=True, slots=True)
class PreseedJob:
    """The answer of PRESEED (202) and PRESEED_JOB (200): a job's progress."""

    id: str
    state: str  # resolving, seeding, done, failed
    images: list[str]
    platforms: list[str]
    manifests: list[str]
    blobs_total: int
    blobs_done: int
    blobs_failed: int
    bytes_total: int
    bytes_done: int
    errors: list[str]
    elapsed_seconds: float
    blobs: list[PreseedBlob]

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> PreseedJob:
        d = _doc(doc)
        blobs = d.get("blobs")
        if not isinstance(blobs, list):
            raise errors.BadRequest(errors.INVALID_REQUEST, "blobs must be a list")
        return cls(_text(d, "id", max_length=128), _text(d, "state", max_length=32), _texts(d, "images", required=True),
                   _texts(d, "platforms", required=False), _texts(d, "manifests", required=False),
                   _count(d, "blobs_total"), _count(d, "blobs_done"), _count(d, "blobs_failed"),
                   _count(d, "bytes_total"), _count(d, "bytes_done"), _texts(d, "errors", required=False),
                   _number(d, "elapsed_seconds"), [PreseedBlob.from_json(b) for b in blobs])


AUDIT_FORMATS = ("json", "jsonl", "csv")
AUDIT_MAX_LIMIT = 100_000  # a larger limit is cut to this
AUDIT_FILTERS = ("image", "repository", "digest", "reference", "ns", "principal", "node", "since", "until")


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """GET AUDIT's query string: filters on the events (all optional; `image` is
    registry/name[:tag][@digest]), at most `limit` events (1 to AUDIT_MAX_LIMIT), in `format`
    (json answers an AuditPage, jsonl and csv answer text)."""

    image: str | None = None
    repository: str | None = None
    digest: str | None = None
    reference: str | None = None
    ns: str | None = None
    principal: str | None = None
    node: str | None = None
    since: str | None = None  # RFC 3339
    until: str | None = None
    limit: int = 1000
    format: str = "json"

    def to_query(self) -> dict[str, str]:
        query = {k: v for k in AUDIT_FILTERS if (v := getattr(self, k))}
        return {**query, "limit": str(self.limit), "format": self.format}

    @classmethod
    def from_query(cls, query: Any) -> AuditQuery:
        """From a request's query (a mapping of strings); empty filters are absent."""
        limit = query.get("limit", "1000")
        # ASCII only: str.isdigit() also admits "²", which int() refuses (that was a 500); and
        # short: int() refuses more than 4,300 digits
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 20):
            raise errors.BadRequest(errors.INVALID_REQUEST, "limit must be a whole number")
        fmt = query.get("format", "json")
        if fmt not in AUDIT_FORMATS:
            raise errors.BadRequest(errors.INVALID_REQUEST, "format is json, jsonl or csv")
        filters = {k: query[k] for k in AUDIT_FILTERS if query.get(k)}
        for key in ("since", "until"):
            if key in filters:
                filters[key] = _utc_time(filters[key], key)
        return cls(**filters, limit=max(1, min(int(limit), AUDIT_MAX_LIMIT)), format=fmt)


def _utc_time(text: str, key: str) -> str:
    """An RFC 3339 time (or a date: its midnight UTC) as the journal writes times, so that the
    collector's text comparison is a time comparison ("yesterday" matched nothing, silently)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise errors.BadRequest(errors.INVALID_REQUEST,
                                f"{key} must be an RFC 3339 time such as 2026-11-27T08:00:00Z, or a date") from None
    if when.tzinfo is None:
        if len(text) > 10:  # a time without its offset would be read in nobody knows which zone
            raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} needs a time zone (Z or +01:00)")
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class AuditPage:
    """GET AUDIT in json: the events (shoal.audit's joined event documents), oldest first."""

    events: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "count": len(self.events)}

    @classmethod
    def from_json(cls, doc: Any) -> AuditPage:
        events = _doc(doc).get("events")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise errors.BadRequest(errors.INVALID_REQUEST, "events must be a list of objects")
        return cls(events)


@dataclass(frozen=True, slots=True)
class SeededBlob:
    digest: str
    size: int
    info_hash: str  # hex, v1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> SeededBlob:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=255), _count(d, "size"), _text(d, "info_hash", max_length=64))


@dataclass(frozen=True, slots=True)
class Seeded:
    """GET SEEDED: the blobs the origin seeds."""

    blobs: list[SeededBlob]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> Seeded:
        blobs = _doc(doc).get("blobs")
        if not isinstance(blobs, list):
            raise errors.BadRequest(errors.INVALID_REQUEST, "blobs must be a list")
        return cls([SeededBlob.from_json(b) for b in blobs])
