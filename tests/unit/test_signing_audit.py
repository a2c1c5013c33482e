from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal import audit, signing
from shoal_agent.authz import Credential


def keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    key = serialization.load_pem_private_key(signing.generate_private_key(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key, key.public_key()


def test_swarm_tokens() -> None:
    key, pub = keypair()
    _, other = keypair()
    token = signing.issue_token(key, "node-7", 60)
    assert signing.verify_token(pub, token).node == "node-7"
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.verify_token(other, token)
    with pytest.raises(signing.SignatureError, match="expired"):
        signing.verify_token(pub, signing.issue_token(key, "node-7", -1))
    _payload, sig = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"node":"root","exp":9999999999}').rstrip(b"=").decode()
    with pytest.raises(signing.SignatureError):
        signing.verify_token(pub, f"{forged}.{sig}")
    for bad in (None, "", "a.b.c", "x" * 600, "!!!.???"):
        with pytest.raises(signing.SignatureError):
            signing.verify_token(pub, bad)


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
    a = signing.issue_token(key, "node-a", 60)
    assert tokens.verify(a).node == "node-a"
    assert tokens.verify(a).node == "node-a"
    assert checks == [a]  # the signature was checked once
    # what did not verify is never remembered: it is checked (and refused) every time
    forged = signing.issue_token(keypair()[0], "node-x", 60)
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
    b, c = signing.issue_token(key, "node-b", 60), signing.issue_token(key, "node-c", 60)
    for t in (a, b, c):
        tokens.verify(t)
    checks.clear()
    tokens.verify(a)
    assert checks == [a]  # a was pushed out by c
    with pytest.raises(signing.SignatureError, match="does not verify"):
        signing.VerifiedTokens(other).verify(a)  # remembered per key, not globally


def test_metainfo_signatures() -> None:
    key, pub = keypair()
    sig = signing.sign_metainfo(key, b"metainfo bytes")
    signing.verify_metainfo(pub, b"metainfo bytes", sig)
    with pytest.raises(signing.SignatureError):
        signing.verify_metainfo(pub, b"metainfo bytez", sig)
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify_metainfo(pub, b"metainfo bytes", None)
    # a swarm token's signature is no metainfo signature (separate contexts)
    token_sig = signing.issue_token(key, "n", 60).split(".")[1]
    with pytest.raises(signing.SignatureError):
        signing.verify_metainfo(pub, b"metainfo bytes", token_sig)


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
