"""The origin's signatures: swarm membership tokens and metainfo provenance (Ed25519).

The origin holds the private key. The tracker and the agents hold the public key, so they can
check, but never mint, what the origin signed:
- a **swarm token** names a node, the blob it was admitted to (`*` for the origin itself) and an
  expiry; the tracker refuses announces without a valid one for that torrent (a node joins only
  the swarms of blobs the registry let one of its pullers have);
- an **admission receipt** says the holder of a node key was admitted to a blob; the node shows it
  to have that blob's token and certificate renewed (it keeps what it had, no more);
- a **metainfo signature** covers the exact metainfo bytes; agents add no torrent and the tracker
  registers none unless the origin signed it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.errors import ConfigError

_METAINFO_CONTEXT = b"shoal metainfo v1\x00"
_TOKEN_CONTEXT = b"shoal swarm token v1\x00"
_SOURCE_CONTEXT = b"shoal blob source v1\x00"
_RECEIPT_CONTEXT = b"shoal admission receipt v1\x00"
# What a node signs with its own key, by kind of request (a signature for one kind is no
# signature for another)
NODE_REQUESTS = {"journal": b"shoal journal batch v1\x00", "grants": b"shoal grants request v1\x00",
                 "admission": b"shoal admission request v1\x00"}
MAX_TOKEN_LENGTH = 1024
# HTTP header carrying the origin's signature of a metainfo (origin -> tracker -> agents).


class SignatureError(ValueError):
    """A token or signature that is missing, malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict: one spelling per value. Python's decoder skips characters outside the alphabet and
    ignores the last character's spare bits, so a token with junk inserted (or its last character
    changed) verified as well, under another text: the tracker's memo of verified tokens, keyed
    by the text, could be filled with spellings of one token."""
    if not _B64URL.fullmatch(text):
        raise SignatureError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SignatureError("not base64url") from None
    if _b64(data) != text:
        raise SignatureError("not base64url")
    return data


def generate_private_key() -> bytes:
    """A new Ed25519 private key as PEM (PKCS#8)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def public_pem(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: str, key: str) -> Ed25519PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {path!r} is not an unencrypted PEM private key") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"{key}: {path!r} is not an Ed25519 key")
    return loaded


def load_public_key(path: str, key: str) -> Ed25519PublicKey:
    try:
        loaded = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {path!r} is not a PEM public key") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(f"{key}: {path!r} is not an Ed25519 public key")
    return loaded


# ----- metainfo ------------------------------------------------------------------------------------


def sign_metainfo(key: Ed25519PrivateKey, raw: bytes) -> str:
    return _b64(key.sign(_METAINFO_CONTEXT + hashlib.sha256(raw).digest()))


def verify_metainfo(key: Ed25519PublicKey, raw: bytes, signature: str | None) -> None:
    if not signature:
        raise SignatureError("metainfo is not signed")
    try:
        key.verify(_unb64(signature), _METAINFO_CONTEXT + hashlib.sha256(raw).digest())
    except InvalidSignature:
        raise SignatureError("metainfo signature does not verify") from None


# ----- blob sources --------------------------------------------------------------------------------
# The origin's word that registry `ns` holds blob `digest` (it fetched the blob from there, and
# checked it against the digest): an agent serves a blob for `ns` from the swarm or its cache only
# with it, or with the blob fetched from `ns` itself (shoal_agent.provenance).


def _source_message(digest: str, ns: str) -> bytes:
    return _SOURCE_CONTEXT + digest.encode() + b"\x00" + ns.encode()


def sign_source(key: Ed25519PrivateKey, digest: str, ns: str) -> str:
    return _b64(key.sign(_source_message(digest, ns)))


def verify_source(key: Ed25519PublicKey, digest: str, ns: str, signature: str | None) -> None:
    if not signature:
        raise SignatureError("the origin did not vouch for the blob's registry")
    try:
        key.verify(_unb64(signature), _source_message(digest, ns))
    except InvalidSignature:
        raise SignatureError("the origin's word on the blob's registry does not verify") from None


# ----- what nodes send the origin ------------------------------------------------------------------
# A node signs its requests with its own key (shoal.peercerts.NodeKey), which the origin bound to
# the node's name when it enrolled: journal batches (the collector attributes the records to that
# node; a replayed batch stores nothing, records are kept once per event and phase), grant
# requests (proof that the caller holds the key it enrolls with and shows receipts for) and
# admissions (counted and logged for the node that really asked). No other holder of the
# cluster's node token can act in its name.


def sign_request(key: Ed25519PrivateKey, kind: str, body: bytes) -> str:
    return _b64(key.sign(NODE_REQUESTS[kind] + hashlib.sha256(body).digest()))


def verify_request(key: Ed25519PublicKey, kind: str, body: bytes, signature: str | None) -> None:
    what = "the journal batch" if kind == "journal" else f"the {kind} request"
    if not signature:
        raise SignatureError(f"{what} is not signed")
    try:
        key.verify(_unb64(signature), NODE_REQUESTS[kind] + hashlib.sha256(body).digest())
    except InvalidSignature:
        raise SignatureError(f"{what} signature does not verify") from None


def sign_batch(key: Ed25519PrivateKey, body: bytes) -> str:
    return sign_request(key, "journal", body)


def verify_batch(key: Ed25519PublicKey, body: bytes, signature: str | None) -> None:
    verify_request(key, "journal", body, signature)


# ----- admission receipts --------------------------------------------------------------------------
# An admission is for good: revoking a puller at the registry stops new admissions, while a node
# keeps taking part in the swarm of a blob it was admitted to (it holds the bytes anyway). Its
# token and certificate expire with every other grant, so a banned node drops out of every swarm.


def _receipt_message(node_key: Ed25519PublicKey, digest: str) -> bytes:
    return _RECEIPT_CONTEXT + node_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) \
        + digest.encode()


def sign_receipt(key: Ed25519PrivateKey, node_key: Ed25519PublicKey, digest: str) -> str:
    return _b64(key.sign(_receipt_message(node_key, digest)))


def verify_receipt(key: Ed25519PublicKey, node_key: Ed25519PublicKey, digest: str, receipt: str | None) -> None:
    if not receipt:
        raise SignatureError("no admission receipt")
    try:
        key.verify(_unb64(receipt), _receipt_message(node_key, digest))
    except InvalidSignature:
        raise SignatureError("the admission receipt does not verify for this node and blob") from None


# ----- swarm tokens --------------------------------------------------------------------------------

EVERY_BLOB = "*"  # the scope of the origin's own token


@dataclass(frozen=True, slots=True)
class SwarmToken:
    node: str
    expires: int  # unix time
    blob: str  # the digest hex of the one swarm it admits to, or EVERY_BLOB

    def admits(self, digest_hex: str) -> bool:
        return self.blob in (EVERY_BLOB, digest_hex)

    def remaining(self) -> float:
        return self.expires - time.time()


def issue_token(key: Ed25519PrivateKey, node: str, ttl: float, blob: str) -> str:
    payload = json.dumps({"node": node, "exp": int(time.time() + ttl), "blob": blob}, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(key.sign(_TOKEN_CONTEXT + payload))}"


class VerifiedTokens:
    """Swarm tokens whose signature has verified, remembered until they expire. A node announces
    with one token for hours (renewed at half-life), and the Ed25519 check cost 180 us of the
    tracker's 660 us per announce. Only tokens that verified are kept; at `max_entries` the
    oldest goes first."""

    def __init__(self, key: Ed25519PublicKey, *, max_entries: int = 10_000) -> None:
        self.key = key
        self.max_entries = max_entries
        self._known: dict[str, SwarmToken] = {}

    def verify(self, token: str | None) -> SwarmToken:
        if not token:
            return verify_token(self.key, token)  # refuses it
        claims = self._known.get(token)
        if claims is None:
            claims = verify_token(self.key, token)
            if len(self._known) >= self.max_entries:
                del self._known[next(iter(self._known))]
            self._known[token] = claims
        elif claims.remaining() <= 0:
            del self._known[token]
            raise SignatureError("swarm token expired")
        return claims


def verify_token(key: Ed25519PublicKey, token: str | None) -> SwarmToken:
    if not token:
        raise SignatureError("announce carries no swarm token")
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise SignatureError("malformed swarm token")
    payload_b64, sig_b64 = token.split(".")
    payload = _unb64(payload_b64)
    try:
        key.verify(_unb64(sig_b64), _TOKEN_CONTEXT + payload)
    except InvalidSignature:
        raise SignatureError("swarm token signature does not verify") from None
    try:
        doc = json.loads(payload)
        claims = SwarmToken(str(doc["node"]), int(doc["exp"]), doc["blob"])
        if not isinstance(claims.blob, str):
            raise TypeError("blob")
    except (ValueError, KeyError, TypeError):
        raise SignatureError("malformed swarm token") from None
    if claims.remaining() <= 0:
        raise SignatureError("swarm token expired")
    return claims
