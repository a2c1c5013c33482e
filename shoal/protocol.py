"""The HTTP protocol between shoal's components, defined once: routes, headers and bodies.

Servers register these patterns in their route tables; clients (the agent, the origin's
registration, the CLI, tests and bench) build URLs from the same objects, so a path exists in
exactly one place. JSON bodies are the dataclasses below: both ends write them with `to_json`
and read them with `from_json`, which refuses a malformed document with a 400 naming the field.
The mirror API (`/v2/...`) is the OCI distribution spec's: only its entry points are listed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import asdict, dataclass, field
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

# Origin: admissions to blobs' swarms, a node's enrollment and grants, the journal collector,
# audit queries, pre-seed jobs
ADMISSION = Route("POST", "/v1/blobs/{digest}/admission")
# A cold blob's bytes as the origin fetches them from the registry, for a node it admitted with a
# RelayTicket (node token and the ticket in RELAY_TICKET_HEADER)
RELAY = Route("GET", "/v1/blobs/{digest}/relay")
# A blob's first copy, a piece per request, for a node admitted with a first-copy ticket
# (FIRST_COPY_TICKET_HEADER): each answer is the next piece no node has had from the origin yet
# (its index in FIRST_COPY_PIECE_HEADER), 204 once every piece has left the origin. A node the
# origin relayed the blob to says in its first request how many of the blob's first pieces it
# has verified (FIRST_COPY_HAVE_HEADER): the origin does not send those again
FIRST_COPY = Route("GET", "/v1/blobs/{digest}/first-copy")
GRANTS = Route("POST", "/v1/swarm/grants")
JOURNAL = Route("POST", "/v1/journal")
AUDIT = Route("GET", "/v1/audit")
PRESEED = Route("POST", "/v1/preseed")
PRESEED_JOB = Route("GET", "/v1/preseed/{job}")
SEEDED = Route("GET", "/v1/seeded")  # what the origin seeds (STATUS, which is public, has counts only)
# Registry to origin: push notifications (distribution's notifications endpoint, Harbor's webhook),
# with the notification token; the route exists only when `notifications` is configured
NOTIFICATIONS = Route("POST", "/v1/notifications")
# Origin to origin (several origins, shoal/rendezvous.py): "seed this blob too", with the token
# the origins share (never the node token)
REPLICA = Route("POST", "/v1/blobs/{digest}/replica")

# Status pages (shoal/statuspage/, origin/page.py, agent/page.py): the page, its own script and
# style, and the JSON it draws from; on the origin also the operator's sign-in and sign-out (a
# session cookie), and the audit search (GET AUDIT's query and answers, for the session's holder)
PAGE = Route("GET", "/")
PAGE_PREFIX = "/ui/"  # every page route but PAGE is under it (their security headers: shoal/statuspage)
PAGE_ASSET = Route("GET", "/ui/static/{name}")
PAGE_OVERVIEW = Route("GET", "/ui/api/overview")
PAGE_SIGNIN_FORM = Route("GET", "/ui/signin")
PAGE_SIGNIN = Route("POST", "/ui/signin")
PAGE_SIGNOUT = Route("POST", "/ui/signout")
PAGE_AUDIT = Route("GET", "/ui/api/audit")

# Tracker: BEP 3 announce and BEP 48 scrape (for nodes: seeder counts tell what is cached),
# and the metainfo the origin registers (which torrents exist; nodes get metainfo only from the
# origin, with an admission)
ANNOUNCE = Route("GET", "/announce")
SCRAPE = Route("GET", "/scrape")
REGISTER_METAINFO = Route("PUT", "/v1/metainfo/{digest}")
UNREGISTER_METAINFO = Route("DELETE", "/v1/metainfo/{digest}")
# An announce parameter (`stalled=1`): a leecher whose download got no piece for a while asks for
# the origins' seeders, which the tracker otherwise leaves out of a swarm that has seeders of its
# own (tracker/peers.py ORIGIN_SPARE): those seeders may be unreachable, or lying.
ANNOUNCE_STALLED = "stalled"
# An announce parameter (`first_copy=1`): a leecher that takes its share of the blob's first copy
# from the origin over HTTP (FIRST_COPY) is not handed the origins' seeders unless it stalls: a
# piece the seeder sent it would be a second copy of one the origin sends another node.
ANNOUNCE_FIRST_COPY = "first_copy"


# Headers
SIGNATURE_HEADER = "Shoal-Signature"  # the origin's Ed25519 signature of a metainfo (base64)
NODE_SIGNATURE_HEADER = "Shoal-Node-Signature"  # a node's signature of its journal batch (base64)
# The credential a node presents for an admission: the puller's Authorization as the puller sent
# it, or the node's own registry login as Basic (absent: anonymous). The origin asks the registry
# with it and forgets it.
PULLER_AUTHORIZATION_HEADER = "Shoal-Puller-Authorization"
# The agent's hosts.toml watchdog asks /readyz with a fresh challenge and trusts only an answer
# that proves the secret it shares with its own agent (HMAC-SHA256 of the challenge, hex): another
# process on the mirror's port is not the agent.
WATCHDOG_CHALLENGE_HEADER = "Shoal-Watchdog-Challenge"
WATCHDOG_PROOF_HEADER = "Shoal-Watchdog-Proof"


def watchdog_proof(secret: bytes, challenge: str) -> str:
    return hmac.new(secret, challenge.encode(), hashlib.sha256).hexdigest()
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
# The `detail` of the origin's 403 to a node it holds no enrollment for (its audit store was moved
# to PostgreSQL, or lost): the node enrolls again and asks once more.
NOT_ENROLLED = "node-not-enrolled"
# The tracker's `failure reason` while its store (Redis) does not answer: no tracker can name
# peers now, so a node counts that tracker as out of reach (and falls back without waiting).
TRACKER_STORE_UNAVAILABLE = "tracker store unavailable; retry later"
# A node's zone, as agents send it in announces (`zone=`) and trackers group peers by it: a
# Kubernetes label value (topology.kubernetes.io/zone), "" for none.
ZONE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")


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


def _compact(doc: dict[str, Any]) -> bytes:
    """A body as signed and sent: compact JSON, UTF-8."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


TICKET_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")  # (it goes into a header: nothing else)


def _ticket(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not TICKET_RE.fullmatch(value):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be 1 to 128 letters, digits, '-' or '_'")
    return value


def _b64(doc: dict[str, Any], key: str, *, max_length: int) -> bytes:
    try:
        return base64.b64decode(_text(doc, key, max_length=max_length), validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{key} must be base64") from None


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """POST ADMISSION: node `node` asks to join the swarm of a blob of `repository` at registry
    `ns`, on behalf of a puller whose credential is in PULLER_AUTHORIZATION_HEADER. With
    `seeded_only` (small blobs, which are not worth a fetch by the origin) an admitted node gets
    204 rather than an Admission when the origin does not seed the blob already. With `relay` an
    admitted node gets 202 and a RelayTicket, at once, when the origin is still to fetch the blob
    (the node streams the fetch's bytes from RELAY and asks again, without `relay`, for the
    Admission, which comes once the blob is seeded). Signed by the node's key
    (NODE_SIGNATURE_HEADER over `encode()`), and dated (`at`, unix seconds)."""

    node: str
    ns: str
    repository: str
    seeded_only: bool = False
    relay: bool = False
    at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return _compact(self.to_json())

    @classmethod
    def from_json(cls, doc: Any) -> AdmissionRequest:
        d = _doc(doc)
        seeded_only, relay = d.get("seeded_only", False), d.get("relay", False)
        if not isinstance(seeded_only, bool):
            raise errors.BadRequest(errors.INVALID_REQUEST, "seeded_only must be true or false")
        if not isinstance(relay, bool):
            raise errors.BadRequest(errors.INVALID_REQUEST, "relay must be true or false")
        return cls(node_name(_text(d, "node", max_length=253)), _text(d, "ns", max_length=255),
                   _text(d, "repository", max_length=255), seeded_only, relay, _count(d, "at"))


RELAY_TICKET_HEADER = "Shoal-Relay-Ticket"
FIRST_COPY_TICKET_HEADER = "Shoal-First-Copy-Ticket"
FIRST_COPY_PIECE_HEADER = "Shoal-Piece"  # the index of the piece a FIRST_COPY answer carries
FIRST_COPY_HAVE_HEADER = "Shoal-First-Copy-Have"  # pieces 0 to N-1: the node has them (a relay's)


def first_copy_have(value: str | None) -> int:
    """FIRST_COPY_HAVE_HEADER's count of pieces; 0 when absent."""
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise errors.BadRequest(errors.INVALID_REQUEST, f"{FIRST_COPY_HAVE_HEADER} must be a count of pieces")
    return int(value)


@dataclass(frozen=True, slots=True)
class RelayTicket:
    """The 202 answer of ADMISSION with `relay`: GET RELAY with `ticket` (for this node and blob
    only, good while the origin fetches it) streams the blob's bytes as they come from the
    registry, unverified: the node holds them to the blob's digest and its torrent's pieces."""

    ticket: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> RelayTicket:
        return cls(_text(_doc(doc), "ticket", max_length=128))


@dataclass(frozen=True, slots=True)
class Grant:
    """What a node holds for one blob's swarm, for the key it enrolled with: a swarm token to
    announce with and a certificate (PEM) to present to peers, both naming the blob and valid for
    the answer's ttl_seconds; and the receipt of its admission, shown to renew them."""

    digest: str
    token: str
    certificate: str
    receipt: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> Grant:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=71), _text(d, "token", max_length=1024),
                   _text(d, "certificate", max_length=4096), _text(d, "receipt", max_length=128))


def _ttl(doc: dict[str, Any]) -> float:
    ttl = doc.get("ttl_seconds")
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        raise errors.BadRequest(errors.INVALID_REQUEST, "ttl_seconds must be a positive number")
    return float(ttl)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of ADMISSION: the blob's metainfo and the origin's signature of it, its word that
    registry `ns` holds the blob (signing.sign_source), and the node's grant for the swarm. With
    `first_copy`, a ticket (for this node and blob) to GET FIRST_COPY with while the origin hands
    out the blob's first copy: the node takes pieces from there, and announces with
    ANNOUNCE_FIRST_COPY."""

    metainfo: bytes
    signature: str
    source: str
    grant: Grant
    ttl_seconds: float
    first_copy: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"metainfo": base64.b64encode(self.metainfo).decode(), "signature": self.signature,
               "source": self.source, "grant": self.grant.to_json(), "ttl_seconds": self.ttl_seconds}
        return doc if self.first_copy is None else {**doc, "first_copy": self.first_copy}

    @classmethod
    def from_json(cls, doc: Any) -> Admission:
        d = _doc(doc)
        first_copy = _ticket(d, "first_copy") if d.get("first_copy") is not None else None
        return cls(_b64(d, "metainfo", max_length=4 << 20), _text(d, "signature", max_length=128),
                   _text(d, "source", max_length=128), Grant.from_json(d.get("grant")), _ttl(d), first_copy)


@dataclass(frozen=True, slots=True)
class Receipt:
    digest: str
    receipt: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> Receipt:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=71), _text(d, "receipt", max_length=128))


MAX_RENEWALS = 500  # receipts in one GRANTS request (a node with more asks several times)


@dataclass(frozen=True, slots=True)
class GrantsRequest:
    """POST GRANTS: node `node` enrolls with `public_key` (PEM; the origin binds the name to it the
    first time) and has the grants of the blobs it was admitted to renewed, by their receipts.
    Signed with that key (NODE_SIGNATURE_HEADER over `encode()`: the caller holds it), and dated
    (`at`, unix seconds)."""

    node: str
    public_key: str
    renew: list[Receipt]
    at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "public_key": self.public_key, "renew": [r.to_json() for r in self.renew],
                "at": self.at}

    def encode(self) -> bytes:
        return _compact(self.to_json())

    @classmethod
    def from_json(cls, doc: Any) -> GrantsRequest:
        d = _doc(doc)
        renew = d.get("renew", [])
        if not isinstance(renew, list) or len(renew) > MAX_RENEWALS:
            raise errors.BadRequest(errors.INVALID_REQUEST, f"renew must be a list of at most {MAX_RENEWALS} receipts")
        return cls(node_name(_text(d, "node", max_length=253)), _text(d, "public_key", max_length=512),
                   [Receipt.from_json(r) for r in renew], _count(d, "at"))


@dataclass(frozen=True, slots=True)
class Grants:
    """The answer of GRANTS: a grant for every receipt that holds, valid for ttl_seconds (renew at
    half of it); the digests of those that do not (not for this node's key)."""

    ttl_seconds: float
    grants: list[Grant]
    refused: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"ttl_seconds": self.ttl_seconds, "grants": [g.to_json() for g in self.grants],
                "refused": self.refused}

    @classmethod
    def from_json(cls, doc: Any) -> Grants:
        d = _doc(doc)
        grants = d.get("grants")
        if not isinstance(grants, list):
            raise errors.BadRequest(errors.INVALID_REQUEST, "grants must be a list")
        return cls(_ttl(d), [Grant.from_json(g) for g in grants], _texts(d, "refused", required=False))


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
    # the job's image that first named this blob (`shoal seed` draws a bar per image); absent
    # from older origins
    image: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> PreseedBlob:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=255), _count(d, "size"), _text(d, "state", max_length=32),
                   _optional_text(d, "error"), _optional_text(d, "image"))


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


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """POST REPLICA (origin to origin, the peer token): seed the blob from registry `ns`, repository
    `repository` (fetched with the asked origin's own service credentials; the asking origin
    already had the registry accept the puller for it). Answered once the blob is seeded."""

    ns: str
    repository: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> ReplicaRequest:
        d = _doc(doc)
        return cls(_text(d, "ns", max_length=255), _text(d, "repository", max_length=255))


@dataclass(frozen=True, slots=True)
class Replica:
    """The answer of REPLICA: the blob is seeded by the asked origin, under this v2 info-hash
    (hex; every owner builds the same torrent, so the asking origin can check it is the same)."""

    digest: str
    info_hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Any) -> Replica:
        d = _doc(doc)
        return cls(_text(d, "digest", max_length=71), _text(d, "info_hash", max_length=64))
