"""The protocol between components: bodies survive the round trip and refuse malformed documents
with a 400 that names the field; routes quote their parameters."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import errors, protocol

BODIES: list[Any] = [
    protocol.AdmissionRequest("node-1", "registry.example:5000", "private/app"),
    protocol.GrantsRequest("node-1", "-----BEGIN PUBLIC KEY-----\n", [protocol.Receipt("sha256:" + "a" * 64, "r1")]),
    protocol.GrantsRequest("node-1", "-----BEGIN PUBLIC KEY-----\n", []),
    protocol.Grants(3600.0, [protocol.Grant("sha256:" + "a" * 64, "v1.abc", "-----BEGIN CERTIFICATE-----\n", "r1")],
                    ["sha256:" + "b" * 64]),
    protocol.Admission(b"d8:announce\x00e", "sig", "src", protocol.Grant("sha256:" + "a" * 64, "t", "c", "r"), 60.0),
    protocol.Admission(b"d8:announce\x00e", "sig", "src", protocol.Grant("sha256:" + "a" * 64, "t", "c", "r"), 60.0,
                       "ticket"),
    protocol.JournalBatch("node-1", [{"event_id": "e" * 32, "phase": "start"}]),
    protocol.JournalAck(3, 1, 0),
    protocol.PreseedRequest(["r/app:v1"], ["linux/amd64"]),
]


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_bodies_round_trip(body: Any) -> None:
    assert type(body).from_json(body.to_json()) == body


@pytest.mark.parametrize(("cls", "doc", "field"), [
    (protocol.AdmissionRequest, {"node": "n", "ns": "r"}, "repository"),
    (protocol.AdmissionRequest, {"node": "n", "ns": 5, "repository": "a"}, "ns"),
    (protocol.AdmissionRequest, ["ns", "repository"], "JSON object"),
    (protocol.GrantsRequest, {"node": "", "public_key": "k"}, "node"),
    (protocol.GrantsRequest, {"node": "n" * 254, "public_key": "k"}, "node"),
    (protocol.GrantsRequest, {"node": "n"}, "public_key"),
    (protocol.GrantsRequest, {"node": "n", "public_key": "k", "renew": {}}, "renew"),
    (protocol.GrantsRequest, {"node": "n", "public_key": "k",
                              "renew": [{"digest": "d", "receipt": "r"}] * (protocol.MAX_RENEWALS + 1)}, "renew"),
    (protocol.GrantsRequest, {"node": "n", "public_key": "k", "renew": [{"digest": "d"}]}, "receipt"),
    (protocol.GrantsRequest, {"node": "n", "public_key": "k"}, "at"),
    (protocol.GrantsRequest, {"node": "n", "public_key": "k", "at": True}, "at"),
    (protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": "a"}, "at"),
    (protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": "a", "at": -5}, "at"),
    (protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": "a", "at": 1, "seeded_only": 1},
     "seeded_only"),
    (protocol.Grants, {"ttl_seconds": 0, "grants": [], "refused": []}, "ttl_seconds"),
    (protocol.Grants, {"ttl_seconds": True, "grants": [], "refused": []}, "ttl_seconds"),
    (protocol.Grants, {"ttl_seconds": 60, "refused": []}, "grants"),
    (protocol.Grants, {"ttl_seconds": 60, "grants": [{"digest": "d", "token": "t", "receipt": "r"}]}, "certificate"),
    (protocol.Admission, {"metainfo": "not base64!", "signature": "s", "source": "s",
                          "grant": {"digest": "d", "token": "t", "certificate": "c", "receipt": "r"},
                          "ttl_seconds": 1}, "metainfo"),
    (protocol.Admission, {"metainfo": "AA==", "signature": "s", "source": "s", "ttl_seconds": 1}, "JSON object"),
    (protocol.Admission, {"metainfo": "AA==", "signature": "s", "source": "s", "ttl_seconds": 1, "first_copy": 5,
                          "grant": {"digest": "d", "token": "t", "certificate": "c", "receipt": "r"}}, "first_copy"),
    (protocol.Admission, {"metainfo": "AA==", "signature": "s", "source": "s", "ttl_seconds": 1,
                          "first_copy": "abc\r\nX-Injected: 1",
                          "grant": {"digest": "d", "token": "t", "certificate": "c", "receipt": "r"}}, "first_copy"),
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

    assert message(protocol.AdmissionRequest, []) == "body must be a JSON object"
    assert message(protocol.JournalBatch, {"node": "n"}) == "records must be a list"
    assert message(protocol.Grants, {"grants": [], "ttl_seconds": -1}) == "ttl_seconds must be a positive number"
    assert message(protocol.PreseedRequest, {}) == "images must be a non-empty list of strings"
    assert message(protocol.PreseedRequest, {"images": ["a"], "platforms": [1]}) == \
        "platforms must be a list of strings"
    assert message(protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": ""}) == \
        "repository must be a string of 1 to 255 characters"


@pytest.mark.parametrize(("cls", "doc", "field", "limit"), [
    (protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": "a", "at": 1}, "ns", 255),
    (protocol.AdmissionRequest, {"node": "n", "ns": "r", "repository": "a", "at": 1}, "repository", 255),
    (protocol.GrantsRequest, {"public_key": "k", "at": 1}, "node", 253),
    (protocol.GrantsRequest, {"node": "n", "at": 1}, "public_key", 512),
    (protocol.Grant, {"digest": "d", "certificate": "c", "receipt": "r"}, "token", 1024),
    (protocol.Grant, {"digest": "d", "token": "t", "receipt": "r"}, "certificate", 4096),
    (protocol.Grant, {"digest": "d", "token": "t", "certificate": "c"}, "receipt", 128),
    (protocol.Receipt, {"digest": "d"}, "receipt", 128),
    (protocol.Receipt, {"receipt": "r"}, "digest", 71),
    (protocol.Grant, {"token": "t", "certificate": "c", "receipt": "r"}, "digest", 71),
    (protocol.AdmissionRequest, {"ns": "r", "repository": "a", "at": 1}, "node", 253),
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
    assert protocol.GrantsRequest.from_json({"node": "n", "public_key": "k", "at": 1}).renew == []  # enrollment alone
    for ttl in (0.5, 1):
        assert protocol.Grants.from_json({"ttl_seconds": ttl, "grants": []}).ttl_seconds == ttl


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                        ["ns", "repository", "node", "token", "ttl_seconds", "certificate", "public_key", "records",
                         "accepted", "duplicates", "rejected", "images", "platforms", "renew", "grants", "refused",
                         "digest", "receipt", "metainfo", "signature", "source", "grant", "at", "seeded_only"]), c,
                        max_size=6),
                    max_leaves=10))
def test_any_document_is_a_body_or_a_400(doc: Any) -> None:
    for cls in {type(b) for b in BODIES}:
        with contextlib.suppress(errors.BadRequest):  # anything else escapes and fails the test
            body = cls.from_json(doc)
            assert type(body).from_json(body.to_json()) == body


def test_routes_quote_their_parameters() -> None:
    assert protocol.PRESEED_JOB.path(job="a/../b") == protocol.PRESEED_JOB.pattern.format(job="a%2F..%2Fb")
    assert protocol.ADMISSION.path(digest="sha256:ab") == protocol.ADMISSION.pattern.format(digest="sha256:ab")
    assert protocol.AUDIT.url("http://o:1/", {"node": "a&b"}) == f"http://o:1{protocol.AUDIT.pattern}?node=a%26b"
    assert protocol.HEALTHZ.url("http://BOX/") == "http://BOX/healthz"  # only the trailing slash goes


def test_one_error_answer_for_every_kind_of_error() -> None:
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


@pytest.mark.parametrize("body", [JOB, JOB.blobs[1], protocol.AuditPage([{"event_id": "e1", "status": 200}]),
                                  protocol.AuditPage([])], ids=lambda b: type(b).__name__)
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


def refusal(cls: Any, doc: Any) -> str:
    """The 400's message: the error body a client (the CLI, the agent, an operator's script) reads."""
    with pytest.raises(errors.BadRequest) as exc:
        cls.from_json(doc)
    assert exc.value.oci is errors.INVALID_REQUEST
    return str(exc.value)


SEEDED = protocol.Seeded([protocol.SeededBlob("sha256:" + "a" * 64, 10, "b" * 40),
                          protocol.SeededBlob("sha256:" + "c" * 64, 0, "d" * 40)])


def test_the_seeded_list_is_exact_on_the_wire() -> None:
    assert SEEDED.to_json() == {"blobs": [{"digest": "sha256:" + "a" * 64, "size": 10, "info_hash": "b" * 40},
                                          {"digest": "sha256:" + "c" * 64, "size": 0, "info_hash": "d" * 40}]}
    assert protocol.Seeded.from_json(SEEDED.to_json()) == SEEDED
    assert protocol.Seeded.from_json({"blobs": []}) == protocol.Seeded([])


def test_a_malformed_seeded_list_is_refused_naming_the_field() -> None:
    blob = SEEDED.blobs[0].to_json()
    assert refusal(protocol.Seeded, []) == "body must be a JSON object"
    assert refusal(protocol.Seeded, {}) == "blobs must be a list"
    assert refusal(protocol.Seeded, {"blobs": {"a": blob}}) == "blobs must be a list"
    assert refusal(protocol.Seeded, {"blobs": [blob, 5]}) == "body must be a JSON object"
    assert refusal(protocol.SeededBlob, {**blob, "digest": ""}) == "digest must be a string of 1 to 255 characters"
    assert refusal(protocol.SeededBlob, {**blob, "size": -1}) == "size must be a non-negative integer"
    assert refusal(protocol.SeededBlob, {**blob, "size": True}) == "size must be a non-negative integer"
    assert refusal(protocol.SeededBlob, {**blob, "info_hash": None}) == \
        "info_hash must be a string of 1 to 64 characters"
    for field, limit in (("digest", 255), ("info_hash", 64)):
        assert protocol.SeededBlob.from_json({**blob, field: "x" * limit}).to_json()[field] == "x" * limit
        assert refusal(protocol.SeededBlob, {**blob, field: "x" * (limit + 1)}) == \
            f"{field} must be a string of 1 to {limit} characters"


def test_a_job_is_exact_on_the_wire() -> None:
    doc = JOB.to_json()
    assert doc == {
        "id": "j1", "state": "seeding", "images": ["r/app:v1"], "platforms": [], "manifests": JOB.manifests,
        "blobs_total": 2, "blobs_done": 1, "blobs_failed": 0, "bytes_total": 30, "bytes_done": 10, "errors": [],
        "elapsed_seconds": 1.5,
        "blobs": [{"digest": "sha256:" + "b" * 64, "size": 10, "state": "done", "error": None, "image": None},
                  {"digest": "sha256:" + "c" * 64, "size": 20, "state": "failed", "error": "registry answered 500",
                   "image": None}]}
    # the image that named a blob (`shoal seed` draws a bar per image) travels when the origin says it
    named = protocol.PreseedBlob("d", 1, "done", None, "r/app:v1")
    assert protocol.PreseedBlob.from_json(named.to_json()) == named
    # the optional lists may be left out; a blob's error may be left out; whole seconds are read as seconds
    lean = {k: v for k, v in doc.items() if k not in ("platforms", "manifests", "errors")}
    lean["blobs"] = [{"digest": "d", "size": 0, "state": "pending"}]
    job = protocol.PreseedJob.from_json({**lean, "elapsed_seconds": 0})
    assert (job.platforms, job.manifests, job.errors) == ([], [], [])
    assert job.blobs == [protocol.PreseedBlob("d", 0, "pending", None)]
    assert job.elapsed_seconds == 0.0 and isinstance(job.elapsed_seconds, float)
    assert isinstance(protocol.PreseedJob.from_json({**doc, "elapsed_seconds": 7}).elapsed_seconds, float)


@pytest.mark.parametrize(("change", "message"), [
    ({"id": ""}, "id must be a string of 1 to 128 characters"),
    ({"id": "j" * 129}, "id must be a string of 1 to 128 characters"),
    ({"state": "s" * 33}, "state must be a string of 1 to 32 characters"),
    ({"images": []}, "images must be a non-empty list of strings"),
    ({"platforms": None}, "platforms must be a list of strings"),
    ({"manifests": [1]}, "manifests must be a list of strings"),
    ({"errors": "boom"}, "errors must be a list of strings"),
    ({"blobs_total": -1}, "blobs_total must be a non-negative integer"),
    ({"blobs_done": None}, "blobs_done must be a non-negative integer"),
    ({"blobs_failed": False}, "blobs_failed must be a non-negative integer"),
    ({"bytes_total": "30"}, "bytes_total must be a non-negative integer"),
    ({"bytes_done": 1.5}, "bytes_done must be a non-negative integer"),
    ({"elapsed_seconds": -0.5}, "elapsed_seconds must be a non-negative number"),
    ({"elapsed_seconds": True}, "elapsed_seconds must be a non-negative number"),
    ({"elapsed_seconds": None}, "elapsed_seconds must be a non-negative number"),
    ({"blobs": None}, "blobs must be a list"),
    ({"blobs": [[]]}, "body must be a JSON object"),
    ({"blobs": [{"digest": "d" * 256, "size": 1, "state": "done"}]}, "digest must be a string of 1 to 255 characters"),
    ({"blobs": [{"digest": "d", "size": "1", "state": "done"}]}, "size must be a non-negative integer"),
    ({"blobs": [{"digest": "d", "size": 1, "state": "s" * 33}]}, "state must be a string of 1 to 32 characters"),
    ({"blobs": [{"digest": "d", "size": 1, "state": "done", "error": 5}]}, "error must be a string or null"),
])
def test_job_refusals_are_exact(change: dict[str, Any], message: str) -> None:
    assert refusal(protocol.PreseedJob, {**JOB.to_json(), **change}) == message


def test_job_fields_up_to_their_bounds() -> None:
    blob = {"digest": "d" * 255, "size": 0, "state": "s" * 32, "error": "e"}
    job = protocol.PreseedJob.from_json({**JOB.to_json(), "id": "j" * 128, "state": "s" * 32, "elapsed_seconds": 0.0,
                                         "blobs": [blob]})
    assert (job.id, job.state, job.elapsed_seconds) == ("j" * 128, "s" * 32, 0.0)
    assert job.blobs == [protocol.PreseedBlob("d" * 255, 0, "s" * 32, "e")]
    assert refusal(protocol.PreseedJob, {**JOB.to_json(), "state": ""}) == \
        "state must be a string of 1 to 32 characters"


def test_an_audit_page_counts_its_events() -> None:
    events = [{"event_id": "e1"}, {"event_id": "e2"}]
    assert protocol.AuditPage(events).to_json() == {"events": events, "count": 2}
    assert protocol.AuditPage([]).to_json() == {"events": [], "count": 0}
    assert refusal(protocol.AuditPage, []) == "body must be a JSON object"
    bad: dict[str, Any]
    for bad in ({}, {"events": {}}, {"events": [{}, []]}, {"events": None}):
        assert refusal(protocol.AuditPage, bad) == "events must be a list of objects"


def test_a_journal_batch_is_sent_as_the_journal_writes_it() -> None:
    batch = protocol.JournalBatch("node-e", [{"user_agent": "café ☕", "n": 1}])
    body = batch.encode()
    assert body == '{"node":"node-e","records":[{"user_agent":"café ☕","n":1}]}'.encode()
    assert protocol.JournalBatch.from_json(json.loads(body)) == batch


def test_audit_query_defaults_and_every_filter() -> None:
    assert protocol.AuditQuery.from_query({}) == protocol.AuditQuery()
    assert protocol.AuditQuery().to_query() == {"limit": "1000", "format": "json"}
    every = {"image": "r/app:v1", "repository": "app", "digest": "sha256:" + "a" * 64, "reference": "v1",
             "ns": "r", "principal": "alice", "node": "n1"}
    query = protocol.AuditQuery.from_query({**every, "format": "jsonl", "limit": "7", "other": "x"})
    assert query == protocol.AuditQuery(**every, limit=7, format="jsonl")
    assert query.to_query() == {**every, "limit": "7", "format": "jsonl"}
    assert protocol.AuditQuery.from_query({"since": "", "until": ""}) == protocol.AuditQuery()  # empty: absent
    assert protocol.AuditQuery.from_query({"limit": "0" * 19 + "5"}).limit == 5  # 20 digits are read
    with pytest.raises(errors.BadRequest) as exc:
        protocol.AuditQuery.from_query({"limit": "0" * 20 + "5"})
    assert str(exc.value) == "limit must be a whole number"
    for fmt in protocol.AUDIT_FORMATS:
        assert protocol.AuditQuery.from_query({"format": fmt}).format == fmt
    with pytest.raises(errors.BadRequest) as exc:
        protocol.AuditQuery.from_query({"format": "JSON"})
    assert str(exc.value) == "format is json, jsonl or csv"


@pytest.mark.parametrize(("key", "given", "message"), [
    ("since", "yesterday", "since must be an RFC 3339 time such as 2026-11-27T08:00:00Z, or a date"),
    ("until", "2026-02-30", "until must be an RFC 3339 time such as 2026-11-27T08:00:00Z, or a date"),
    ("until", "2026-11-27T08:00:00", "until needs a time zone (Z or +01:00)"),
    ("since", "20261127T08", "since needs a time zone (Z or +01:00)"),  # 11 characters: a time, not a date
])
def test_audit_time_refusals_are_exact(key: str, given: str, message: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        protocol.AuditQuery.from_query({key: given})
    assert str(exc.value) == message and exc.value.oci is errors.INVALID_REQUEST


def test_audit_dates_in_any_iso_spelling_are_midnight_utc() -> None:
    for date in ("2026-11-27", "20261127", "2026-W48-5"):  # 10 characters or fewer: a date
        assert protocol.AuditQuery.from_query({"since": date}).since == "2026-11-27T00:00:00.000000Z"
    assert protocol.AuditQuery.from_query({"until": "2026-11-27T23:59:59.999999-02:00"}).until == \
        "2026-11-28T01:59:59.999999Z"


def test_audit_times_do_not_depend_on_the_servers_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A date is midnight UTC and every time is written in UTC, wherever the origin runs."""
    monkeypatch.setenv("TZ", "EST5")  # POSIX: UTC-5, no zone files needed
    time.tzset()
    try:
        assert protocol.AuditQuery.from_query({"since": "2026-11-27"}).since == "2026-11-27T00:00:00.000000Z"
        assert protocol.AuditQuery.from_query({"until": "2026-11-27T08:00:00+01:00"}).until == \
            "2026-11-27T07:00:00.000000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_signed_bodies_are_compact_json_and_read_back() -> None:
    """What a node signs is exactly what it sends: compact JSON (protocol.AdmissionRequest.encode),
    whose every field reads back; seeded_only and relay are false unless said (an agent older
    than relays sends neither)."""
    request = protocol.AdmissionRequest("node-1", "registry.example:5000", "team/app", at=5)
    assert request.encode() == (b'{"node":"node-1","ns":"registry.example:5000","repository":"team/app",'
                                b'"seeded_only":false,"relay":false,"at":5}')
    assert protocol.AdmissionRequest.from_json(json.loads(request.encode())) == request
    relayed = protocol.AdmissionRequest("node-1", "r", "a", relay=True, at=5)
    assert protocol.AdmissionRequest.from_json(json.loads(relayed.encode())) == relayed
    plain = protocol.AdmissionRequest.from_json({"node": "n", "ns": "r", "repository": "a", "at": 1})
    assert plain.seeded_only is False and plain.relay is False
    with pytest.raises(errors.BadRequest, match="relay"):
        protocol.AdmissionRequest.from_json({"node": "n", "ns": "r", "repository": "a", "at": 1, "relay": "yes"})
    assert protocol.RelayTicket.from_json({"ticket": "t"}) == protocol.RelayTicket("t")
    with pytest.raises(errors.BadRequest, match="ticket"):
        protocol.RelayTicket.from_json({"ticket": "x" * 129})
    grants = protocol.GrantsRequest("node-1", "pem é", [protocol.Receipt("sha256:ab", "r1")], at=7)
    assert grants.encode() == ('{"node":"node-1","public_key":"pem é","renew":[{"digest":"sha256:ab","receipt":"r1"}],'
                               '"at":7}').encode()
    assert protocol.GrantsRequest.from_json(json.loads(grants.encode())) == grants
    most = {"node": "n", "public_key": "k", "at": 1, "renew": [{"digest": "d", "receipt": "r"}] * protocol.MAX_RENEWALS}
    assert len(protocol.GrantsRequest.from_json(most).renew) == protocol.MAX_RENEWALS
    assert protocol.Grants.from_json({"ttl_seconds": 1, "grants": []}).refused == []


def test_admission_fields_and_their_refusals_read_as_documented() -> None:
    grant = {"digest": "d", "token": "t", "certificate": "c", "receipt": "r"}
    doc = {"metainfo": "AAEC", "signature": "s" * 128, "source": "s" * 128, "grant": grant, "ttl_seconds": 1}
    assert protocol.Admission.from_json(doc).metainfo == b"\x00\x01\x02"
    for key, value, message in (("signature", "s" * 129, "signature must be a string of 1 to 128 characters"),
                                ("source", "s" * 129, "source must be a string of 1 to 128 characters"),
                                ("metainfo", "AA\nEC", "metainfo must be base64"),
                                ("metainfo", "A" * ((4 << 20) + 4), f"metainfo must be a string of 1 to {4 << 20} "
                                                                    "characters")):
        with pytest.raises(errors.BadRequest) as exc:
            protocol.Admission.from_json({**doc, key: value})
        assert str(exc.value) == message, key
    with pytest.raises(errors.BadRequest) as exc:
        protocol.AdmissionRequest.from_json({"node": "n", "ns": "r", "repository": "a", "at": 1, "seeded_only": "yes"})
    assert str(exc.value) == "seeded_only must be true or false"
    with pytest.raises(errors.BadRequest) as exc:
        protocol.Grants.from_json({"ttl_seconds": 1, "grants": {}})
    assert str(exc.value) == "grants must be a list"
