from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal import audit, signing
from shoal.errors import ConfigError
from shoal_agent.authz import Credential

NOW = 1_795_755_600.0  # 2026-11-27T05:00:00Z


def keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    key = serialization.load_pem_private_key(signing.generate_private_key(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key, key.public_key()


def test_swarm_tokens() -> None:
    key, pub = keypair()
    _, other = keypair()
    token = signing.issue_token(key, "node-7", 60, "*")
    assert signing.verify_token(pub, token).node == "node-7"
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_token(other, token)
    with pytest.raises(signing.SignatureError, match="expired"):
        signing.verify_token(pub, signing.issue_token(key, "node-7", -1, "*"))
    _payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"node":"root","exp":9999999999}').rstrip(b"=").decode()
    with pytest.raises(signing.SignatureError):
        signing.verify_token(pub, f"{forged}.{sig}")
    for bad in (None, "", "a.b.c", "x" * 600, "!!!.???"):
        with pytest.raises(signing.SignatureError):
            signing.verify_token(pub, bad)


def test_a_swarm_token_admits_to_its_blob_only() -> None:
    key, pub = keypair()
    a, b = "a" * 64, "b" * 64
    claims = signing.verify_token(pub, signing.issue_token(key, "node-7", 60, a))
    assert claims.blob == a and claims.admits(a) and not claims.admits(b) and not claims.admits("*")
    every = signing.verify_token(pub, signing.issue_token(key, "origin", 60, signing.EVERY_BLOB))
    assert every.admits(a) and every.admits(b)


def test_admission_receipts_are_for_one_node_key_and_one_blob() -> None:
    key, pub = keypair()
    node, other = keypair()[1], keypair()[1]
    digest = "sha256:" + "a" * 64
    receipt = signing.sign_receipt(key, node, digest)
    signing.verify_receipt(pub, node, digest, receipt)
    for who, what in ((other, digest), (node, "sha256:" + "b" * 64)):
        with pytest.raises(signing.SignatureError, match="does not verify for this node and blob"):
            signing.verify_receipt(pub, who, what, receipt)
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_receipt(keypair()[1], node, digest, receipt)  # another origin's
    for bad in (None, ""):
        with pytest.raises(signing.SignatureError, match="no admission receipt"):
            signing.verify_receipt(pub, node, digest, bad)
    # a receipt is no other signature of the origin's (separate contexts)
    with pytest.raises(signing.SignatureError):
        signing.verify_receipt(pub, node, digest, signing.sign_source(key, digest, "registry.a"))


def test_verified_tokens_are_remembered_until_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    key, pub = keypair()
    _, other = keypair()
    tokens = signing.VerifiedTokens(pub, max_entries=2)
    checks: list[str | None] = []
    real = signing.verify_token

    def counting(k: object, token: str | None) -> signing.SwarmToken:
        checks.append(token)
        return real(k, token)  # type: ignore[arg-type]

    monkeypatch.setattr(signing, "verify_token", counting)
    a = signing.issue_token(key, "node-a", 60, "*")
    assert tokens.verify(a).node == "node-a"
    assert tokens.verify(a).node == "node-a"
    assert checks == [a]  # the signature was checked once
    # what did not verify is never remembered: it is checked (and refused) every time
    forged = signing.issue_token(keypair()[0], "node-x", 60, "*")
    for _ in range(2):
        with pytest.raises(signing.SignatureError):
            tokens.verify(forged)
    assert checks == [a, forged, forged]
    for bad in (None, ""):
        with pytest.raises(signing.SignatureError):
            tokens.verify(bad)
    # a remembered token still expires
    now = time.time()
    monkeypatch.setattr("shoal.signing.time.time", lambda: now + 61)
    with pytest.raises(signing.SignatureError, match="expired"):
        tokens.verify(a)
    monkeypatch.setattr("shoal.signing.time.time", lambda: now)
    # bounded: the oldest goes first
    b, c = signing.issue_token(key, "node-b", 60, "*"), signing.issue_token(key, "node-c", 60, "*")
    for t in (a, b, c):
        tokens.verify(t)
    checks.clear()
    tokens.verify(a)
    assert checks == [a]  # a was pushed out by c
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.VerifiedTokens(other).verify(a)  # remembered per key, not globally


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refusal(pub: Ed25519PublicKey, token: str | None) -> str:
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_token(pub, token)
    return str(exc.value)


def test_swarm_token_refusals_say_why() -> None:
    """The reason is the tracker's `failure reason` ("not a swarm member: ...") and the agent's log."""
    key, pub = keypair()
    _, other = keypair()
    token = signing.issue_token(key, "node-7", 60, "*")
    payload, sig = token.split(".")
    assert refusal(pub, None) == refusal(pub, "") == "announce carries no swarm token"
    for malformed in ("a.b.c", payload, "x" * 1025):
        assert refusal(pub, malformed) == "malformed swarm token"
    # "AA!" is two data characters and junk: lenient padding would read it as b"\x00"
    assert refusal(pub, f"AA!.{sig}") == "not base64url"
    assert refusal(pub, f"{payload}.A") == "not base64url"
    # one spelling per token: junk inside, padding, or other spare bits in the last character
    # (Python's decoder ignores all three) are refused, not verified as the same token
    for junk in (f"{payload[:4]}!!!!{payload[4:]}.{sig}", f"{payload}.{sig[:10]} {sig[10:]}", f"{payload}==.{sig}",
                 f"{payload}.{sig[:-1]}{chr(ord(sig[-1]) + 1)}"):
        assert refusal(pub, junk) == "not base64url", junk
    assert refusal(other, token) == "swarm token signature does not verify"
    assert refusal(pub, signing.issue_token(key, "node-7", -1, "*")) == "swarm token expired"
    # signed by the origin but not claims: still refused, as malformed
    for claims in (b"not json", b"[1]", b'{"node":"n"}', b'{"node":"n","exp":"soon","blob":"*"}',
                   b'{"node":"n","exp":9999999999}', b'{"node":"n","exp":9999999999,"blob":1}'):
        signed = f"{b64(claims)}.{b64(key.sign(b'shoal swarm token v1' + bytes(1) + claims))}"
        assert refusal(pub, signed) == "malformed swarm token", claims


def test_swarm_token_wire_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact JSON claims and an Ed25519 signature, each unpadded base64url, joined by a dot."""
    key, pub = keypair()
    monkeypatch.setattr("shoal.signing.time.time", lambda: NOW)
    token = signing.issue_token(key, "node-7", 60, "*")
    payload, sig = token.split(".")
    assert base64.urlsafe_b64decode(payload + "==") == b'{"node":"node-7","exp":1795755660,"blob":"*"}'
    assert len(sig) == 86 and "=" not in token  # 64 bytes, no padding
    assert signing.verify_token(pub, token) == signing.SwarmToken("node-7", 1795755660, "*")
    # the encoding round-trips any bytes (b"\x00\x00\x17" encodes as "AAAX": nothing but "=" is stripped)
    # (and every length's padding: 4 to 23 bytes)
    for data in (b"", b"\x00", b"\xff\xfe", b"\x00\x00\x17", bytes(range(64)),
                 *(bytes(range(n)) for n in range(4, 24))):
        assert "=" not in signing._b64(data)
        assert signing._unb64(signing._b64(data)) == data


def test_swarm_token_length_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    key, pub = keypair()
    monkeypatch.setattr("shoal.signing.time.time", lambda: NOW)
    # the longest token under MAX_TOKEN_LENGTH (1024) is read: unpadded base64url has no length
    # of 1 mod 4, so a 937-character payload (and a 1024-character token) cannot be spelled
    node = "n" * 663
    token = signing.issue_token(key, node, 60, "*")
    assert len(token) == signing.MAX_TOKEN_LENGTH - 1
    assert signing.verify_token(pub, token).node == node
    longer = signing.issue_token(key, node + "n", 60, "*")
    assert len(longer) == signing.MAX_TOKEN_LENGTH + 1
    assert refusal(pub, longer) == "malformed swarm token"
    # exactly 1024 characters is still read (and refused for what it is, not for its length)
    _, sig = token.split(".")
    assert refusal(pub, "A" * 937 + "." + sig) == "not base64url"


def test_a_token_expires_at_its_exp_second(monkeypatch: pytest.MonkeyPatch) -> None:
    key, pub = keypair()
    monkeypatch.setattr("shoal.signing.time.time", lambda: NOW)
    token = signing.issue_token(key, "node-7", 60, "*")  # exp = NOW + 60
    remembered = signing.VerifiedTokens(pub)
    remembered.verify(token)
    monkeypatch.setattr("shoal.signing.time.time", lambda: NOW + 59.5)
    assert signing.verify_token(pub, token).node == "node-7"
    assert remembered.verify(token).node == "node-7"
    monkeypatch.setattr("shoal.signing.time.time", lambda: NOW + 60)
    assert refusal(pub, token) == "swarm token expired"
    with pytest.raises(signing.SignatureError) as exc:
        remembered.verify(token)
    assert str(exc.value) == "swarm token expired"


def test_verified_tokens_remember_ten_thousand_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _, pub = keypair()
    checks: list[str | None] = []

    def stub(k: object, token: str | None) -> signing.SwarmToken:
        checks.append(token)
        return signing.SwarmToken(str(token), int(time.time()) + 3600, "*")

    monkeypatch.setattr(signing, "verify_token", stub)
    tokens = signing.VerifiedTokens(pub)
    for i in range(10_000):
        tokens.verify(f"t{i}")
    checks.clear()
    tokens.verify("t0")
    assert checks == []  # all 10,000 kept
    tokens.verify("t10000")
    tokens.verify("t0")
    assert checks == ["t10000", "t0"]  # the 10,001st pushed out the oldest


def test_metainfo_signatures() -> None:
    key, pub = keypair()
    sig = signing.sign_metainfo(key, b"metainfo bytes")
    signing.verify_metainfo(pub, b"metainfo bytes", sig)
    with pytest.raises(signing.SignatureError):
        signing.verify_metainfo(pub, b"metainfo bytez", sig)
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify_metainfo(pub, b"metainfo bytes", None)
    # a swarm token's signature is no metainfo signature (separate contexts)
    token_sig = signing.issue_token(key, "n", 60, "*").split(".")[1]
    with pytest.raises(signing.SignatureError):
        signing.verify_metainfo(pub, b"metainfo bytes", token_sig)
    assert len(sig) == 86 and "=" not in sig  # unpadded base64url of 64 bytes


def test_journal_batch_signatures() -> None:
    """A node signs its batches with its own key; another key, another body, a metainfo
    signature of the same bytes, or none: refused, saying why."""
    key, pub = keypair()
    body = b'{"node":"n","records":[]}'
    sig = signing.sign_batch(key, body)
    signing.verify_batch(pub, body, sig)
    other, _ = keypair()
    bad = "the journal batch signature does not verify"
    for signature, data, why in ((None, body, "the journal batch is not signed"),
                                 ("", body, "the journal batch is not signed"),
                                 (sig, body + b" ", bad), (signing.sign_batch(other, body), body, bad),
                                 (signing.sign_metainfo(key, body), body, bad),
                                 (sig + "!", body, "not base64url")):
        with pytest.raises(signing.SignatureError) as exc:
            signing.verify_batch(pub, data, signature)
        assert str(exc.value) == why


def test_source_signatures_bind_the_blob_and_the_registry() -> None:
    """The origin's word that registry `ns` holds `digest`: for that pair only, and no other
    signature of the origin's passes for it."""
    key, pub = keypair()
    digest = "sha256:" + "a" * 64
    sig = signing.sign_source(key, digest, "registry.a:5000")
    signing.verify_source(pub, digest, "registry.a:5000", sig)
    other, _ = keypair()
    bad = "the origin's word on the blob's registry does not verify"
    for d, ns, signature, why in (
            (digest, "registry.b:5000", sig, bad), ("sha256:" + "b" * 64, "registry.a:5000", sig, bad),
            (digest, "registry.a:500", sig, bad),  # no ambiguity where digest and name meet
            (digest, "registry.a:5000", signing.sign_source(other, digest, "registry.a:5000"), bad),
            (digest, "registry.a:5000", signing.sign_metainfo(key, digest.encode()), bad),
            (digest, "registry.a:5000", None, "the origin did not vouch for the blob's registry"),
            (digest, "registry.a:5000", "", "the origin did not vouch for the blob's registry")):
        with pytest.raises(signing.SignatureError) as exc:
            signing.verify_source(pub, d, ns, signature)
        assert str(exc.value) == why


def test_metainfo_refusals_say_why() -> None:
    """The reason is in the tracker's 400 ("metainfo not signed by the origin: ...") and the agent's."""
    key, pub = keypair()
    sig = signing.sign_metainfo(key, b"metainfo bytes")
    for signature, why in ((None, "metainfo is not signed"), ("", "metainfo is not signed"),
                           ("AA!", "not base64url"), (sig, "metainfo signature does not verify")):
        with pytest.raises(signing.SignatureError) as exc:
            signing.verify_metainfo(pub, b"metainfo bytez", signature)
        assert str(exc.value) == why


def test_keys_load_from_pem_files(tmp_path: Path) -> None:
    pem = signing.generate_private_key()
    public = signing.public_pem(pem)
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----\n")
    (tmp_path / "key.pem").write_bytes(pem)
    (tmp_path / "pub.pem").write_bytes(public)
    private_key = signing.load_private_key(str(tmp_path / "key.pem"), "signing_key")
    public_key = signing.load_public_key(str(tmp_path / "pub.pem"), "origin_public_key")
    assert public_key.public_bytes_raw() == private_key.public_key().public_bytes_raw()
    signing.verify_metainfo(public_key, b"m", signing.sign_metainfo(private_key, b"m"))


def test_unusable_key_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    def error(load: object, path: Path, key: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load(str(path), key)  # type: ignore[operator]
        return str(exc.value)

    ed_pem = signing.generate_private_key()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "missing": None,
        "garbage": b"not a key\n",
        "ed_private": ed_pem,
        "ed_public": signing.public_pem(ed_pem),
        "ed_encrypted": serialization.load_pem_private_key(ed_pem, password=None).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")),
        "ec_private": ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()),
        "ec_public": ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    p = {name: tmp_path / name for name in files}
    load_private, load_public = signing.load_private_key, signing.load_public_key
    assert error(load_private, p["missing"], "signing_key") == \
        f"signing_key: cannot read {str(p['missing'])!r}: No such file or directory"
    for name in ("garbage", "ed_public", "ed_encrypted"):
        assert error(load_private, p[name], "signing_key") == \
            f"signing_key: {str(p[name])!r} is not an unencrypted PEM private key"
    assert error(load_private, p["ec_private"], "signing_key") == \
        f"signing_key: {str(p['ec_private'])!r} is not an Ed25519 key"
    assert error(load_public, p["missing"], "origin_public_key") == \
        f"origin_public_key: cannot read {str(p['missing'])!r}: No such file or directory"
    for name in ("garbage", "ed_private"):
        assert error(load_public, p[name], "origin_public_key") == \
            f"origin_public_key: {str(p[name])!r} is not a PEM public key"
    assert error(load_public, p["ec_public"], "origin_public_key") == \
        f"origin_public_key: {str(p['ec_public'])!r} is not an Ed25519 public key"


def jwt(claims: dict[str, object]) -> str:
    def b64(doc: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2ln"


@pytest.mark.parametrize(("cred", "principal"), [
    (Credential("client", "Basic " + base64.b64encode(b"alice:pw").decode(), "fp:1"), "alice"),
    (Credential("client", "Bearer " + jwt({"sub": "bob", "access": []}), "fp:2"), "bob"),
    (Credential("client", "Bearer " + jwt({"sub": ""}), "fp:3"), "anonymous"),
    (Credential("client", "Bearer opaque-token", "fp:4"), "fp:4"),
    (Credential("client", "Basic !!!notbase64", "fp:5"), "fp:5"),
    (Credential("node", None, "node:nodeuser"), "nodeuser"),
    (Credential("anonymous", None, "anonymous"), "anonymous"),
])
def test_principal_from_accepted_credentials(cred: Credential, principal: str) -> None:
    assert cred.principal("nodeuser") == principal


def test_records_validate_and_merge() -> None:
    start = {"event_id": "e" * 32, "phase": "start", "ts": "2026-11-27T05:00:00.000000Z", "node": "n",
             "principal": "alice", "repository": "private/app", "status": 200, "digest": "sha256:" + "a" * 64}
    end = {"event_id": "e" * 32, "phase": "end", "ts": "2026-11-27T05:00:01.000000Z", "node": "n", "bytes": 10,
           "duration_ms": 12.5, "outcome": "complete", "verified": True}
    assert audit.validate(dict(start)) == start
    merged = audit.merge(start, end)
    assert merged["ts"] == start["ts"]
    assert merged["bytes"] == 10
    assert merged["principal"] == "alice"
    assert audit.merge(start, None)["outcome"] == "incomplete"
    csv_text = audit.to_csv([merged])
    assert csv_text.splitlines()[0].split(",") == list(audit.EVENT_FIELDS)
    assert "alice" in csv_text.splitlines()[1]
    assert json.loads(audit.to_jsonl([merged]).splitlines()[0]) == merged
    for bad, why in [
        ({**start, "phase": "middle"}, "phase"), ({**start, "password": "x"}, "unknown field"),
        ({**start, "status": "200"}, "status"), ({**start, "bytes": 1}, "unknown field"),
        ({**end, "verified": "yes"}, "verified"), ({**start, "event_id": "x"}, "event_id"),
        ({**start, "user_agent": "u" * 5000}, "user_agent"), ([start], "object"),
    ]:
        with pytest.raises(audit.RecordError, match=why):
            audit.validate(bad)


def test_records_from_before_the_registry_rename_read_as_new_ones() -> None:
    """Agents and audit databases from before 0.1's rename said `source: origin` and
    `origin_status` for the registry; they are read in today's names."""
    old_start = {"event_id": "f" * 32, "phase": "start", "ts": "2026-11-27T05:00:00.000000Z", "node": "n",
                 "status": 200, "source": "origin", "origin_status": "200", "authz_method": "registry"}
    old_end = {"event_id": "f" * 32, "phase": "end", "ts": "2026-11-27T05:00:01.000000Z", "source": "origin",
               "outcome": "complete"}
    checked = audit.validate(dict(old_start))
    assert checked["source"] == "registry" and checked["registry_status"] == "200"
    assert "origin_status" not in checked
    merged = audit.merge(old_start, old_end)  # as stored by an older collector
    assert (merged["source"], merged["registry_status"], merged["outcome"]) == ("registry", "200", "complete")
    new = {**old_start, "source": "peers"}
    del new["origin_status"]
    assert audit.validate(dict(new)) == new  # today's records pass unchanged


START = {"event_id": "e" * 32, "phase": "start", "ts": "2026-11-27T05:00:00.000000Z", "node": "n",
         "principal": "alice", "repository": "private/app", "status": 200, "source": "peers"}
END = {"event_id": "e" * 32, "phase": "end", "ts": "2026-11-27T05:00:01.000000Z", "node": "n", "bytes": 10,
       "duration_ms": 12.5, "outcome": "complete", "source": "registry", "verified": True}


def test_record_times_are_utc_with_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shoal.audit.time.time", lambda: 1795755601.999999)
    assert audit.now() == "2026-11-27T05:00:01.999999Z"


def test_records_at_their_bounds() -> None:
    for ok in ({**START, "event_id": "e" * 8}, {**START, "event_id": "e" * 64}, {**START, "status": 0},
               {**START, "user_agent": "u" * audit.MAX_FIELD}, {**END, "bytes": 0}, {**END, "duration_ms": 0},
               {**END, "duration_ms": 3}):
        assert audit.validate(dict(ok)) == ok
    for bad, why in [
        ({**START, "event_id": "e" * 7}, "event_id"), ({**START, "event_id": "e" * 65}, "event_id"),
        ({**START, "status": -1}, "status"), ({**START, "status": True}, "status"), ({**END, "bytes": -1}, "bytes"),
        ({**END, "duration_ms": "12"}, "duration_ms"), ({**END, "duration_ms": True}, "duration_ms"),
        ({**START, "user_agent": "u" * (audit.MAX_FIELD + 1)}, "user_agent"),
        ({**START, "client_addr": None, "password": "x"}, "unknown field 'password'"),  # after a null, still checked
    ]:
        with pytest.raises(audit.RecordError, match=why):
            audit.validate(bad)


def filled(base: dict[str, object], keys: tuple[str, ...]) -> dict[str, object]:
    """`base` with text in `keys`, in order, until its JSON is exactly MAX_RECORD_BYTES long."""
    record = dict(base)
    for key in keys:
        record[key] = ""
        need = audit.MAX_RECORD_BYTES - len(json.dumps(record))
        record[key] = "x" * min(need, audit.MAX_FIELD)
        if need <= audit.MAX_FIELD:
            break
    assert len(json.dumps(record)) == audit.MAX_RECORD_BYTES
    return record


def test_records_up_to_the_size_limit() -> None:
    record = filled(START, ("client_addr", "user_agent", "cred_fpr", "credential", "ns", "kind", "method",
                            "reference", "range", "authz_method", "registry_status", "error"))
    assert audit.validate(dict(record)) == record
    with pytest.raises(audit.RecordError, match="too large"):
        audit.validate({**record, "principal": "alice!"})


def test_old_registry_status_is_renamed_whatever_the_source() -> None:
    old = {**START, "source": "cache", "origin_status": "404"}
    checked = audit.validate(dict(old))
    assert (checked["source"], checked["registry_status"]) == ("cache", "404")
    assert "origin_status" not in checked


def test_merge_keeps_event_fields_and_lets_the_end_say_last() -> None:
    merged = audit.merge(START, END)
    assert list(merged) == list(audit.EVENT_FIELDS)  # no "phase"
    assert merged["source"] == "registry"  # the pull fell back after it started
    assert audit.merge(START, {**END, "source": None})["source"] == "peers"  # an end without it keeps the start's


def test_exports_are_exact() -> None:
    start = {"event_id": "e" * 32, "phase": "start", "ts": "2026-11-27T05:00:00.000000Z", "principal": "alice",
             "status": 200}
    event = audit.merge(start, None)
    assert audit.to_jsonl([{"event_id": "a", "bytes": 1}, {"event_id": "b"}]) == \
        '{"event_id":"a","bytes":1}\n{"event_id":"b"}\n'
    values = {"event_id": "e" * 32, "ts": start["ts"], "principal": "alice", "status": "200", "outcome": "incomplete"}
    row = ",".join(str(values.get(f, "")) for f in audit.EVENT_FIELDS)
    expected = ",".join(audit.EVENT_FIELDS) + "\n" + row + "\n"
    assert audit.to_csv([event]) == expected
    assert audit.to_csv([{**event, "phase": "start"}]) == expected  # columns are EVENT_FIELDS, whatever else


def test_fit_cuts_long_fields_until_the_record_validates() -> None:
    base = {"event_id": "e" * 32, "phase": "start", "ts": audit.now(), "status": 200}
    assert audit.fit({**base, "reference": "v1"}) == {**base, "reference": "v1"}  # short: untouched
    one = audit.fit({**base, "reference": "r" * 5000})
    assert one["reference"] == "r" * (audit.MAX_FIELD - len(audit.CUT_MARK)) + audit.CUT_MARK
    many = audit.fit({**base, **{f: "\x00" * 2000 for f in ("user_agent", "principal", "error", "range")}})
    assert len(json.dumps(many)) <= audit.MAX_RECORD_BYTES  # 6 bytes per escaped character
    assert audit.validate(many) == many and audit.validate(one) == one
    assert all(many[f].endswith(audit.CUT_MARK) for f in ("user_agent", "principal", "error", "range"))


def test_a_journal_line_is_the_fitted_record_in_utf8() -> None:
    base = {"event_id": "e" * 32, "phase": "start", "ts": audit.now(), "status": 200, "user_agent": "pull/1 é"}
    assert audit.line(base) == json.dumps(base, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    # a record past the fast path's bound is fitted as `fit` does it, whatever its characters
    for filler in ("r", "\x00", "\U0001F600"):
        for n in (1024, 1500, 5000):
            long = {**base, "reference": filler * n, "error": filler * (n // 2)}
            written = json.loads(audit.line(long))
            assert written == audit.fit(long) and audit.validate(written) == written
    edge = {**base, "reference": "\U0001F600" * 870}  # (the fast path, at 12 bytes each in `validate`'s measure)
    assert len(json.dumps(edge, separators=(",", ":"), ensure_ascii=False)) <= 1024
    assert audit.validate(json.loads(audit.line(edge))) == edge
    # bytes a client sent that were not UTF-8 (aiohttp's surrogateescape) are U+FFFD, one each
    odd = audit.line({**base, "user_agent": "pull\udcff\udcfe", "range": "bytes=0-\udc80"})
    assert json.loads(odd)["user_agent"] == "pull\ufffd\ufffd" and json.loads(odd)["range"] == "bytes=0-\ufffd"
    odd.decode("utf-8")  # (strict)


def test_a_stamp_is_never_a_second_late_when_another_thread_moves_the_clock_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(attack22 F3) `now()` keeps the formatted second in a module global. It read it twice, so
    another thread moving it on between the check and the format stamped S.75 as S+1.75. A
    line tracer runs that other `now()` right before the return, deterministically."""
    clock, real = [NOW + 0.75, NOW + 1.25], time.time  # (fractions a float holds exactly)
    monkeypatch.setattr(time, "time", lambda: clock.pop(0) if clock else real())
    monkeypatch.setattr(audit, "_second", (int(NOW), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW))))
    lines, first = inspect.getsourcelines(audit.now)
    ret = first + next(i for i, text in enumerate(lines) if text.strip().startswith("return "))
    other: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not audit.now.__code__:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == ret and not other:
                other.append(audit.now())
            return local
        return local

    sys.settrace(tracer)
    try:
        stamp = audit.now()
    finally:
        sys.settrace(None)
    assert other == ["2026-11-27T05:00:01.250000Z"]
    assert stamp == "2026-11-27T05:00:00.750000Z"


def test_csv_cells_never_start_a_formula() -> None:
    """User agents, references and user names are the client's text; a spreadsheet opening the
    export would run `=HYPERLINK(...)` as a formula."""
    event = {"user_agent": "=HYPERLINK(\"http://x\")", "reference": "+1", "principal": "@evil", "error": "-2",
             "repository": "\tx", "range": "bytes=0-1", "status": 200, "bytes": None}
    row = next(csv.DictReader(io.StringIO(audit.to_csv([event]))))
    assert row["user_agent"] == "'=HYPERLINK(\"http://x\")" and row["reference"] == "'+1"
    assert row["principal"] == "'@evil" and row["error"] == "'-2" and row["repository"] == "'\tx"
    assert row["range"] == "bytes=0-1" and row["status"] == "200" and row["bytes"] == ""


def test_fit_cuts_at_exact_bounds() -> None:
    base = {"event_id": "e" * 32, "phase": "start", "ts": "2026-11-27T05:00:00.000000Z", "status": 200}
    at_bound = {**base, "reference": "r" * audit.MAX_FIELD}
    assert audit.fit(at_bound) == at_bound  # MAX_FIELD characters are kept whole
    over = audit.fit({**base, "reference": "r" * (audit.MAX_FIELD + 1)})["reference"]
    assert len(over) == audit.MAX_FIELD and over == "r" * (audit.MAX_FIELD - 6) + "…[cut]"
    # a record of exactly MAX_RECORD_BYTES is kept whole; one byte more and its longest field is halved
    record = filled(base, ("user_agent", "error", "range", "principal", "credential", "client_addr", "ns", "kind"))
    assert audit.fit(record) == record
    bigger = audit.fit({**record, "event_id": "e" * 33})
    assert bigger["user_agent"] == "x" * (audit.MAX_FIELD // 2 - 6) + "…[cut]"  # the first of the longest
    assert bigger == {**record, "event_id": "e" * 33, "user_agent": bigger["user_agent"]}  # the rest is whole
    # fields that are not text, and text in fields that are not journal text, are left as they are
    # a text field left empty (None) is not text: it is neither cut nor measured
    nulls = {**record, "event_id": "e" * 33, "authz_method": None, "registry_status": None}
    assert audit.fit(nulls) == {**nulls, "user_agent": bigger["user_agent"]}
    odd = {**base, "status": 10**40, "duration_ms": 1.5, "bytes": None, "unknown": "u" * 5000}
    assert audit.fit(odd) == odd


def test_principal_confirmed_is_true_or_false() -> None:
    for value in (True, False, None):
        assert audit.validate({**START, "principal_confirmed": value})["principal_confirmed"] is value
    for wrong in ("yes", 1, 0, "true"):
        with pytest.raises(audit.RecordError, match="principal_confirmed must be true or false"):
            audit.validate({**START, "principal_confirmed": wrong})


def test_node_request_refusals_say_what_was_refused() -> None:
    """The origin's 403 names the kind of request whose signature failed (grants, admission,
    journal batch), and a receipt's refusal says whether it was missing or wrong."""
    key, pub = keypair()
    body = b'{"node":"n"}'
    for kind, what in (("grants", "the grants request"), ("admission", "the admission request"),
                       ("journal", "the journal batch")):
        signing.verify_request(pub, kind, body, signing.sign_request(key, kind, body))
        with pytest.raises(signing.SignatureError) as exc:
            signing.verify_request(pub, kind, body, None)
        assert str(exc.value) == f"{what} is not signed"
        other = "admission" if kind == "grants" else "grants"
        with pytest.raises(signing.SignatureError) as exc:  # signed, but as another kind of request
            signing.verify_request(pub, kind, body, signing.sign_request(key, other, body))
        assert str(exc.value) == f"{what} signature does not verify"
    node = keypair()[1]
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_receipt(pub, node, "sha256:" + "a" * 64, None)
    assert str(exc.value) == "no admission receipt"
    with pytest.raises(signing.SignatureError) as exc:
        signing.verify_receipt(pub, node, "sha256:" + "a" * 64, signing.sign_receipt(key, keypair()[1], "x"))
    assert str(exc.value) == "the admission receipt does not verify for this node and blob"


def test_an_operator_event_is_a_start_and_an_end_record_of_the_origins() -> None:
    start, end = audit.operator_records(principal="token:ci", method="POST", action="preseed", status=202,
                                        outcome="accepted", detail={"images": ["r/a:v1"], "job": "j1"},
                                        client_addr="10.0.0.9:4000", user_agent="shoal/0.1",
                                        authz_method="operator-token")
    assert start["event_id"] == end["event_id"] and start["ts"] == end["ts"]
    assert start["phase"] == "start" and start["node"] == audit.OPERATOR_NODE and start["kind"] == audit.OPERATOR_KIND
    assert start["principal_confirmed"] is True  # the origin authenticated it itself
    assert start["detail"] == '{"images":["r/a:v1"],"job":"j1"}'  # compact, keys sorted: one spelling
    assert end == {"phase": "end", "event_id": start["event_id"], "ts": start["ts"], "node": audit.OPERATOR_NODE,
                   "outcome": "accepted", "duration_ms": 0}
    b, _ = audit.operator_records(principal="p", method="GET", action="a", status=200, outcome="ok",
                                  detail={"b": 1, "a": 2}, client_addr=None, user_agent=None, authz_method="m")
    assert b["detail"] == '{"a":2,"b":1}'
