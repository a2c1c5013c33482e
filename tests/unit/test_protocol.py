"""The protocol between components: bodies survive the round trip and refuse malformed documents
with a 400 that names the field; routes quote their parameters."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import errors, protocol

BODIES: list[Any] = [
    protocol.SeedRequest("registry.example:5000", "private/app"),
    protocol.SwarmTokenRequest("node-1"),
    protocol.SwarmToken("v1.abc.def", 3600.0),
    protocol.JournalBatch("node-1", [{"event_id": "e" * 32, "phase": "start"}]),
    protocol.JournalAck(3, 1, 0),
    protocol.PreseedRequest(["r/app:v1"], ["linux/amd64"]),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_bodies_round_trip(body: Any) -> None:
    assert type(body).from_json(body.to_json()) == body


@pytest.mark.parametrize(("cls", "doc", "field"), [
    (protocol.SeedRequest, {"ns": "r"}, "repository"),
    (protocol.SeedRequest, {"ns": 5, "repository": "a"}, "ns"),
    (protocol.SeedRequest, ["ns", "repository"], "JSON object"),
    (protocol.SwarmTokenRequest, {"node": ""}, "node"),
    (protocol.SwarmTokenRequest, {"node": "n" * 254}, "node"),
    (protocol.SwarmToken, {"token": "t", "ttl_seconds": 0}, "ttl_seconds"),
    (protocol.SwarmToken, {"token": "t", "ttl_seconds": True}, "ttl_seconds"),
    (protocol.JournalBatch, {"node": "n", "records": {}}, "records"),
    (protocol.JournalAck, {"accepted": -1, "duplicates": 0, "rejected": 0}, "accepted"),
    (protocol.JournalAck, {"accepted": 1, "duplicates": 0}, "rejected"),
    (protocol.PreseedRequest, {"images": []}, "images"),
    (protocol.PreseedRequest, {"images": ["a"], "platforms": "linux/amd64"}, "platforms"),
    (protocol.PreseedRequest, {"images": ["a", 1]}, "images"),
])
def test_malformed_bodies_are_400s_naming_the_field(cls: Any, doc: Any, field: str) -> None:
    with pytest.raises(errors.BadRequest, match=field) as exc:
        cls.from_json(doc)
    assert exc.value.oci.status == 400


def test_refusals_are_the_error_body_a_client_reads() -> None:
    def message(cls: Any, doc: Any) -> str:
        with pytest.raises(errors.BadRequest) as exc:
            cls.from_json(doc)
        return str(exc.value)

    assert message(protocol.SeedRequest, []) == "body must be a JSON object"
    assert message(protocol.JournalBatch, {"node": "n"}) == "records must be a list"
    assert message(protocol.SwarmToken, {"token": "t", "ttl_seconds": -1}) == "ttl_seconds must be a positive number"
    assert message(protocol.PreseedRequest, {}) == "images must be a non-empty list of strings"
    assert message(protocol.PreseedRequest, {"images": ["a"], "platforms": [1]}) == \
        "platforms must be a list of strings"
    assert message(protocol.SeedRequest, {"ns": "r", "repository": ""}) == \
        "repository must be a string of 1 to 255 characters"


@pytest.mark.parametrize(("cls", "doc", "field", "limit"), [
    (protocol.SeedRequest, {"ns": "r", "repository": "a"}, "ns", 255),
    (protocol.SeedRequest, {"ns": "r", "repository": "a"}, "repository", 255),
    (protocol.SwarmTokenRequest, {}, "node", 253),
    (protocol.SwarmToken, {"ttl_seconds": 60}, "token", 4096),
    (protocol.JournalBatch, {"records": []}, "node", 253),
])
def test_text_fields_up_to_their_bound(cls: Any, doc: dict[str, Any], field: str, limit: int) -> None:
    longest = {**doc, field: "x" * limit}
    assert cls.from_json(longest).to_json()[field] == "x" * limit
    with pytest.raises(errors.BadRequest) as exc:
        cls.from_json({**doc, field: "x" * (limit + 1)})
    assert str(exc.value) == f"{field} must be a string of 1 to {limit} characters"


def test_optional_fields_and_small_positive_numbers() -> None:
    assert protocol.PreseedRequest.from_json({"images": ["r/app:v1"]}).platforms == []  # platforms may be left out
    for ttl in (0.5, 1):
        assert protocol.SwarmToken.from_json({"token": "t", "ttl_seconds": ttl}).ttl_seconds == ttl


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["ns", "repository", "node", "token", "ttl_seconds", "records", "accepted", "duplicates",
                         "rejected", "images", "platforms"]), c, max_size=6), max_leaves=10))
def test_any_document_is_a_body_or_a_400(doc: Any) -> None:
    for cls in {type(b) for b in BODIES}:
        with contextlib.suppress(errors.BadRequest):  # anything else escapes and fails the test
            body = cls.from_json(doc)
            assert type(body).from_json(body.to_json()) == body


def test_routes_quote_their_parameters() -> None:
    assert protocol.PRESEED_JOB.path(job="a/../b") == protocol.PRESEED_JOB.pattern.format(job="a%2F..%2Fb")
    assert protocol.METAINFO.path(digest="sha256:ab") == protocol.METAINFO.pattern.format(digest="sha256:ab")
    assert protocol.AUDIT.url("http://o:1/", {"node": "a&b"}) == f"http://o:1{protocol.AUDIT.pattern}?node=a%26b"
    assert protocol.HEALTHZ.url("http://BOX/") == "http://BOX/healthz"  # only the trailing slash goes


def test_one_error_answer_for_every_kind_of_error() -> None:
    import json

    from aiohttp import web

    from shoal.web import error_response

    def answer(exc: BaseException) -> tuple[int, str, str]:
        r = error_response(exc)
        assert r.body is not None and r.content_type == "application/json"
        doc = json.loads(bytes(r.body))  # type: ignore[arg-type]
        return r.status, doc["errors"][0]["code"], doc["errors"][0]["message"]

    assert answer(errors.Unauthorized("who are you")) == (401, "UNAUTHORIZED", "who are you")
    assert answer(errors.Denied())[:2] == (403, "DENIED")
    assert answer(web.HTTPNotFound())[:2] == (404, "NOT_FOUND")
    assert answer(web.HTTPMethodNotAllowed("PUT", ["GET"]))[:2] == (405, "UNSUPPORTED")
    assert answer(web.HTTPRequestEntityTooLarge(10, 20))[:2] == (413, "INVALID_REQUEST")
    secret = RuntimeError("password=hunter2")  # an unexpected error says nothing of itself
    assert answer(secret) == (500, "UNKNOWN", "unknown error")


JOB = protocol.PreseedJob(
    id="j1", state="seeding", images=["r/app:v1"], platforms=[], manifests=["r/app@sha256:" + "a" * 64],
    blobs_total=2, blobs_done=1, blobs_failed=0, bytes_total=30, bytes_done=10, errors=[], elapsed_seconds=1.5,
    blobs=[protocol.PreseedBlob("sha256:" + "b" * 64, 10, "done", None),
           protocol.PreseedBlob("sha256:" + "c" * 64, 20, "failed", "registry answered 500")])


@pytest.mark.parametrize("body", [JOB, protocol.AuditPage([{"event_id": "e1", "status": 200}]), protocol.AuditPage([])],
                         ids=lambda b: type(b).__name__)
def test_answers_round_trip(body: Any) -> None:
    assert type(body).from_json(body.to_json()) == body


def test_a_job_is_finished_when_done_or_failed() -> None:
    assert [replace(JOB, state=s).finished for s in ("resolving", "seeding", "done", "failed")] == [
        False, False, True, True]


@pytest.mark.parametrize(("doc", "field"), [
    ({**JOB.to_json(), "blobs": {}}, "blobs"),
    ({**JOB.to_json(), "blobs": [{"digest": "d", "size": -1, "state": "done", "error": None}]}, "size"),
    ({**JOB.to_json(), "blobs": [{"digest": "d", "size": 1, "state": "done", "error": 5}]}, "error"),
    ({**JOB.to_json(), "elapsed_seconds": "1"}, "elapsed_seconds"),
    ({**JOB.to_json(), "bytes_done": 1.5}, "bytes_done"),
    ({"events": [1]}, "events"),
])
def test_malformed_answers_are_refused_naming_the_field(doc: dict[str, Any], field: str) -> None:
    cls = protocol.AuditPage if "events" in doc else protocol.PreseedJob
    with pytest.raises(errors.BadRequest, match=field):
        cls.from_json(doc)


def test_an_audit_query_survives_the_query_string() -> None:
    query = protocol.AuditQuery(image="r/app:v1", node="n1", since="2026-11-30T00:00:00.000000Z", limit=5,
                                format="csv")
    assert query.to_query() == {"image": "r/app:v1", "node": "n1", "since": "2026-11-30T00:00:00.000000Z",
                                "limit": "5", "format": "csv"}
    assert protocol.AuditQuery.from_query(query.to_query()) == query
    assert protocol.AuditQuery.from_query({"node": "", "principal": "alice"}) == protocol.AuditQuery(principal="alice")


@pytest.mark.parametrize(("query", "message"), [
    ({"limit": "²"}, "limit must be a whole number"),  # isdigit(), but int() refuses it: was a 500
    ({"limit": "-1"}, "limit must be a whole number"),
    ({"limit": "9" * 5000}, "limit must be a whole number"),  # more digits than int() reads: a 500
    ({"format": "xml"}, "format is json, jsonl or csv"),
])
def test_a_bad_audit_query_is_a_400(query: dict[str, str], message: str) -> None:
    with pytest.raises(errors.BadRequest, match=message) as exc:
        protocol.AuditQuery.from_query(query)
    assert exc.value.oci.status == 400


def test_an_audit_limit_is_cut_to_its_bounds() -> None:
    def limit(text: str) -> int:
        return protocol.AuditQuery.from_query({"limit": text}).limit

    assert protocol.AuditQuery.from_query({}).limit == 1000
    assert [limit("0"), limit("1"), limit("99999"), limit(str(protocol.AUDIT_MAX_LIMIT))] == [
        1, 1, 99_999, protocol.AUDIT_MAX_LIMIT]
    assert limit("9" * 20) == protocol.AUDIT_MAX_LIMIT


@pytest.mark.parametrize(("given", "stored"), [
    ("2026-11-27", "2026-11-27T00:00:00.000000Z"),
    ("2026-11-27T08:00:00Z", "2026-11-27T08:00:00.000000Z"),
    ("2026-11-27T09:30:00.5+01:00", "2026-11-27T08:30:00.500000Z"),  # compared as the journal writes times
])
def test_audit_times_are_read_as_times(given: str, stored: str) -> None:
    assert protocol.AuditQuery.from_query({"since": given, "until": given}).since == stored
    assert protocol.AuditQuery.from_query({"until": given}).until == stored


@pytest.mark.parametrize(("given", "message"), [
    ("yesterday", "since must be an RFC 3339 time"),  # matched nothing, silently
    ("2026-13-01", "since must be an RFC 3339 time"),
    ("2026-11-27T08:00:00", "since needs a time zone"),
])
def test_audit_times_that_are_not_times_are_a_400(given: str, message: str) -> None:
    with pytest.raises(errors.BadRequest, match=message):
        protocol.AuditQuery.from_query({"since": given})
