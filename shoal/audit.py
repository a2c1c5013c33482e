"""The pull journal's record format, shared by the agent (writer) and the origin (collector).

Every response the agent starts produces a `start` record, written durably before the first
byte goes out, and an `end` record when it is done. Both carry the same `event_id`; the
collector keeps one of each (duplicates from re-sent batches are dropped) and merges them into
one event. An event with a start and no end is a response cut short (e.g. the agent was killed).

Never in a record: passwords, tokens or Authorization values; only `cred_fpr`, a truncated
SHA-256 of the credential.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

PHASES = ("start", "end")
# Fields of a merged event, in export order (CSV columns).
EVENT_FIELDS = (
    "event_id", "ts", "node", "client_addr", "user_agent", "principal", "principal_confirmed", "cred_fpr",
    "credential",
    "ns", "repository", "kind", "method", "reference", "digest", "range", "status", "bytes", "source",
    "verified", "duration_ms", "outcome", "authz_method", "registry_status", "error", "fallback", "action",
    "detail",
)
# Operator events: what an operator did at the origin (pre-seed, audit query, ...), recorded by
# the origin itself under the reserved node name "origin", kind "operator", with `action` and a
# JSON `detail`. No node can write one: the collector files a node's records under the node
# that signed the batch (never "origin", a reserved name), and refuses these fields and this
# kind in them.
OPERATOR_NODE = "origin"
OPERATOR_KIND = "operator"
_OPERATOR_ONLY = frozenset({"action", "detail"})
_START_FIELDS = frozenset(EVENT_FIELDS) - {"bytes", "duration_ms", "outcome"} - _OPERATOR_ONLY
# `fallback` (end): why a blob that was to come from the swarm came from the registry (the agent's
# fallback reasons). New in 0.1's issue 17: a collector older than it refuses an end record that
# has one (the event is then incomplete), so origins are upgraded before agents.
_END_FIELDS = frozenset({"event_id", "ts", "node", "bytes", "duration_ms", "outcome", "source", "verified",
                         "error", "fallback"})
_STRINGS = frozenset({"event_id", "ts", "node", "client_addr", "user_agent", "principal", "cred_fpr",
                      "credential", "ns", "repository", "kind", "method", "reference", "digest", "range",
                      "source", "outcome", "authz_method", "registry_status", "error", "fallback", "action",
                      "detail"})
_INTS = frozenset({"status", "bytes"})
MAX_FIELD = 2048
MAX_RECORD_BYTES = 16 * 1024


class RecordError(ValueError):
    """A journal record that does not follow the format."""


# Lone surrogates: aiohttp decodes a header that is not UTF-8 with surrogateescape, and JSON
# escapes (\udcff) decode to them; they cannot be written as UTF-8 (a User-Agent with a byte 0xff
# made every agent request a 500, and an origin's CSV export of such an event a 500).
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(text: str) -> str:
    """`text` as valid Unicode: each lone surrogate (a byte a client sent that was not UTF-8) as
    U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def new_event_id() -> str:
    return secrets.token_hex(16)  # 128 random bits, 32 hex digits (a uuid4's hex, minus its fixed bits)


_second: tuple[int, str] = (-1, "")


def now() -> str:
    global _second
    t = time.time()
    whole = int(t)
    second = _second  # (read once: another thread may move it on meanwhile)
    if second[0] != whole:  # (strftime once a second: the journal stamps two records per request)
        second = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{second[1]}.{int(t % 1 * 1e6):06d}Z"


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record in today's format. Until 0.1 a blob fetched from the registry said
    `source: origin` and `origin_status`; shoal's own origin seeder is a peer, so these now say
    `registry` (records journaled or stored before the change read the same as new ones)."""
    if "origin_status" not in record and record.get("source") != "origin":
        return record
    out = {("registry_status" if k == "origin_status" else k): v for k, v in record.items()}
    if out.get("source") == "origin":
        out["source"] = "registry"
    return out


def validate(record: Any) -> dict[str, Any]:
    """Check a record from the network (the collector trusts agents, but not blindly)."""
    if not isinstance(record, dict):
        raise RecordError("record is not an object")
    doc = upgrade(record)
    phase = doc.get("phase")
    if phase not in PHASES:
        raise RecordError("phase must be start or end")
    allowed = (_START_FIELDS if phase == "start" else _END_FIELDS) | {"phase"}
    for key, value in doc.items():
        if key not in allowed:
            raise RecordError(f"unknown field {key!r}")
        if value is None:
            continue
        if key in _STRINGS and (not isinstance(value, str) or len(value) > MAX_FIELD):
            raise RecordError(f"{key} must be a string of at most {MAX_FIELD} characters")
        if key in _INTS and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise RecordError(f"{key} must be a non-negative integer")
        if key == "duration_ms" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RecordError("duration_ms must be a number")
        if key in ("verified", "principal_confirmed") and not isinstance(value, bool):
            raise RecordError(f"{key} must be true or false")
    if doc.get("kind") == OPERATOR_KIND:
        raise RecordError(f"kind {OPERATOR_KIND!r} is the origin's own (operator events)")
    event_id = doc.get("event_id")
    if not isinstance(event_id, str) or not 8 <= len(event_id) <= 64:
        raise RecordError("event_id must be a string of 8 to 64 characters")
    if not isinstance(doc.get("ts"), str):
        raise RecordError("ts is required")
    if len(json.dumps(doc)) > MAX_RECORD_BYTES:
        raise RecordError("record too large")
    return doc


def operator_records(*, principal: str, method: str, action: str, status: int, outcome: str,
                     detail: dict[str, Any], client_addr: str | None, user_agent: str | None,
                     authz_method: str, error: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The start and end records of one operator event (the collector stores both at once, so
    the event is never incomplete). `detail` (images, filters, job) is kept as compact JSON."""
    event_id, ts = new_event_id(), now()
    start = fit({"phase": "start", "event_id": event_id, "ts": ts, "node": OPERATOR_NODE, "kind": OPERATOR_KIND,
                 "principal": principal, "principal_confirmed": True, "method": method, "action": action,
                 "status": status, "authz_method": authz_method, "client_addr": client_addr,
                 "user_agent": user_agent, "error": error,
                 "detail": json.dumps(detail, separators=(",", ":"), sort_keys=True)})
    start = {k: clean(v) if isinstance(v, str) else v for k, v in start.items()}  # (a caller's User-Agent, name)
    end = {"phase": "end", "event_id": event_id, "ts": ts, "node": OPERATOR_NODE, "outcome": outcome,
           "duration_ms": 0}
    return start, end


CUT_MARK = "…[cut]"


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[:max(0, length - len(CUT_MARK))] + CUT_MARK


def fit(record: dict[str, Any]) -> dict[str, Any]:
    """The record with over-long text fields cut (marked CUT_MARK) so that `validate` accepts it:
    each field to MAX_FIELD characters, then the longest ones halved until the record is within
    MAX_RECORD_BYTES. A collector that refused the whole record lost the pull from the audit (a
    long reference on a 404, a long user name on a 200)."""
    out = {k: _cut(v, MAX_FIELD) if k in _STRINGS and isinstance(v, str) else v for k, v in record.items()}
    while len(json.dumps(out)) > MAX_RECORD_BYTES:
        longest = max((k for k in out if k in _STRINGS and isinstance(out[k], str)), key=lambda k: len(out[k]))
        out[longest] = _cut(out[longest], len(out[longest]) // 2)
    return out


# A compact line this short is within `fit`'s limits whatever it holds: no field is longer, and
# `validate`'s measure (ASCII-escaped, with spaces) is at most 12 characters per character (a
# character beyond the BMP as two \uXXXX escapes) plus 2 per field: under MAX_RECORD_BYTES.
_SURELY_FITS = 1024


def line(record: dict[str, Any]) -> bytes:
    """One journal line: the record as compact JSON in UTF-8, fitted (`fit`), with each byte of a
    client's text that was not UTF-8 as U+FFFD. One encode for the common short record."""
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    if len(text) > _SURELY_FITS:
        text = json.dumps(fit(record), separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return clean(text).encode() + b"\n"


def merge(start: dict[str, Any] | None, end: dict[str, Any] | None) -> dict[str, Any]:
    """One event from its records; `outcome` says "incomplete" when the end never came."""
    event: dict[str, Any] = {f: None for f in EVENT_FIELDS}
    for part in (start, end):
        if part:
            for key, value in upgrade(part).items():
                if key in event and (value is not None or event[key] is None):
                    if key == "ts" and part is end and start is not None:
                        continue  # the event's time is when it started
                    event[key] = value
    if end is None:
        event["outcome"] = "incomplete"
    return event


def to_jsonl(events: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events)


# A cell a spreadsheet would run as a formula (OWASP's list); the journal holds client-chosen
# text (user agents, references, user names).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str):
        value = clean(value)  # (a node's record may hold any JSON escape)
        if value.startswith(_FORMULA_STARTS):
            return "'" + value
    return value


def to_csv(events: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(EVENT_FIELDS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for event in events:
        writer.writerow({k: _cell(v) for k, v in event.items()})
    return out.getvalue()
