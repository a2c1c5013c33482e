"""The swarm's certificates: who may exchange pieces (libtorrent SSL torrents).

Every torrent carries the swarm CA's certificate in its info dictionary (`ssl-cert`), and
libtorrent then speaks TLS to every peer of it and accepts a peer only if its certificate
chains to that CA, is valid now, and names the torrent (by its name, the digest hex) or `*`.
Both ends check: a node without such a certificate gets no byte from a seeder, and serves none.

- The **CA** is the origin's Ed25519 signing key. Its certificate is a pure function of the key
  (fixed subject, serial, validity; Ed25519 signatures are deterministic), so every origin with
  the key builds byte-identical torrents, and the agents' copy of the public key identifies it.
- A **node certificate** names the one torrent it admits to (a DNS name that is the digest hex;
  the origin's own is `*`). A node gets one with each blob's admission, for the key it enrolled
  with, and it lives as long as the swarm token issued with it; the private key never leaves the
  node. A node admitted to blob A that dials blob B's swarm is refused by every peer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal import errors, signing
from shoal.errors import ConfigError

# Node certificates start this long before they are issued: clocks across a fleet drift.
CLOCK_SKEW = dt.timedelta(minutes=5)
# The CA never expires by itself: its certificate is inside every torrent's info-hash, so a new
# one would re-key every torrent. It is replaced by replacing the signing key.
_CA_NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal swarm CA")])
# RFC 7919's ffdhe2048 group. libtorrent wants DH parameters with each certificate and posts an
# error alert for every certificate set without them (TLS 1.3 never uses them).
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
# libtorrent settings that keep the swarm TLS-only; `torrent.libtorrent` may not override them
# (the reason is the configuration error an operator sees).
RESERVED_SETTINGS = {
    "listen_interfaces": "set by shoal from torrent.listen, as a TLS-only socket (a plain one would "
                         "let peers without a certificate in)",
}


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def ca_certificate(key: Ed25519PrivateKey) -> str:
    """The swarm CA's certificate (PEM), the same bytes every time for the same key."""
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    serial = int.from_bytes(hashlib.sha256(raw).digest()[:16], "big") >> 1 | 1
    cert = (x509.CertificateBuilder()
            .subject_name(_CA_NAME).issuer_name(_CA_NAME).public_key(public)
            .serial_number(serial)
            .not_valid_before(_CA_NOT_BEFORE).not_valid_after(_CA_NOT_AFTER)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, None))
    return _pem(cert)


def parse_public_key(pem: str) -> Ed25519PublicKey:
    """A node's public key as sent with its swarm-token request (400 naming the field if not)."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise errors.BadRequest(errors.INVALID_REQUEST, "public_key: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise errors.BadRequest(errors.INVALID_REQUEST, "public_key: not an Ed25519 public key")
    return key


def canonical_public_pem(key: Ed25519PublicKey) -> str:
    """The one spelling of a public key (bans and bindings compare keys as text)."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def issue_node_certificate(ca_key: Ed25519PrivateKey, node: str, public_key: Ed25519PublicKey,
                           expires: float, torrent: str) -> str:
    """A certificate admitting the holder of `public_key` to the torrent named `torrent` (a
    digest hex; `*`: every torrent of this CA) until `expires` (unix time). libtorrent matches
    the certificate's DNS names against the torrent's name; the node is named in a URI (never
    in the CN or another DNS name, which libtorrent would read as more torrents)."""
    now = dt.datetime.now(dt.UTC)
    ca_public = ca_key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoal node")]))
            .issuer_name(_CA_NAME).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(dt.datetime.fromtimestamp(expires, dt.UTC))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(torrent),
                x509.UniformResourceIdentifier(f"urn:shoal:node:{quote(node, safe='')}")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
            .sign(ca_key, None))
    return _pem(cert)


def issue_grant(ca_key: Ed25519PrivateKey, node: str, public_key: Ed25519PublicKey, torrent: str,
                ttl: float) -> tuple[str, str]:
    """A swarm token and a certificate for `public_key`, both for `torrent` (a digest hex, or
    signing.EVERY_BLOB for the origin's own) and valid for `ttl` seconds."""
    return (signing.issue_token(ca_key, node, ttl, torrent),
            issue_node_certificate(ca_key, node, public_key, time.time() + ttl, torrent))


def check_node_certificate(pem: str, ca_public: Ed25519PublicKey, public_key: Ed25519PublicKey) -> None:
    """Refuse a certificate that the CA did not sign or that is not for this node's key (what an
    agent checks in the origin's answer before it uses it)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        ca_public.verify(cert.signature, cert.tbs_certificate_bytes)
    except (ValueError, TypeError, UnicodeEncodeError, InvalidSignature):
        raise errors.IntegrityError("the swarm certificate is not signed by the origin") from None
    if cert.public_key() != public_key:
        raise errors.IntegrityError("the swarm certificate is for another key")


class NodeKey:
    """A node's own key (Ed25519): its swarm certificate is issued for it, and it signs the
    node's journal batches. The private half never leaves the node."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode("ascii")
        self.public_key = key.public_key()
        self.public_pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def __repr__(self) -> str:
        return "NodeKey(...)"

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._key

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path, key: str) -> NodeKey:
        """The key at `path`, made there (0600) on first use: a node keeps its identity across
        restarts, since the origin binds its name to this key when it first enrolls."""
        if not path.exists():
            made = cls.generate()
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(made.private_pem)
                    f.flush()
                    os.fsync(f.fileno())
                # whole or absent, never empty (a crash mid-write would lock the node out)
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use that one
            except OSError as exc:
                raise ConfigError(f"{key}: cannot create {str(path)!r}: {exc.strerror}") from None
            finally:
                tmp.unlink(missing_ok=True)
        try:
            private = path.stat().st_mode & 0o077 == 0
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from None
        if not private:
            raise ConfigError(f"{key}: {str(path)!r} can be read by others than its owner (chmod 600 it)")
        return cls(signing.load_private_key(str(path), key))
