"""The swarm CA and node certificates (shoal.peercerts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import errors, peercerts
from shoal.errors import ConfigError


def test_the_ca_certificate_is_a_function_of_the_key() -> None:
    """Every origin with the key builds the same torrents: the CA PEM is inside the info-hash."""
    key = Ed25519PrivateKey.generate()
    first = peercerts.ca_certificate(key)
    assert peercerts.ca_certificate(key) == first
    assert peercerts.ca_certificate(Ed25519PrivateKey.generate()) != first
    cert = x509.load_pem_x509_certificate(first.encode())
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "\r" not in first and first.endswith("-----END CERTIFICATE-----\n")


def test_a_node_certificate_is_for_its_key_names_its_torrent_only_and_expires_with_the_token() -> None:
    ca, node = Ed25519PrivateKey.generate(), peercerts.NodeKey.generate()
    expires = time.time() + 600
    pem = peercerts.issue_node_certificate(ca, "0" * 64, node.public_key, expires, "a" * 64)
    peercerts.check_node_certificate(pem, ca.public_key(), node.public_key)
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert abs(cert.not_valid_after_utc.timestamp() - expires) < 1
    assert cert.not_valid_before_utc.timestamp() <= time.time() - 299
    # the one torrent it admits to is its only DNS name; a node named like a digest must not be
    # admitted to that torrent too (CN and DNS names are what libtorrent matches): the node's name
    # goes in a URI
    assert not cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a" * 64]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:shoal:node:" + "0" * 64]


def test_an_agent_refuses_a_certificate_from_another_ca_or_for_another_key() -> None:
    ca, node = Ed25519PrivateKey.generate(), peercerts.NodeKey.generate()
    other = peercerts.NodeKey.generate()
    pem = peercerts.issue_node_certificate(ca, "n", node.public_key, time.time() + 60, "*")
    with pytest.raises(errors.IntegrityError, match="not signed by the origin"):
        peercerts.check_node_certificate(pem, Ed25519PrivateKey.generate().public_key(), node.public_key)
    with pytest.raises(errors.IntegrityError, match="for another key"):
        peercerts.check_node_certificate(pem, ca.public_key(), other.public_key)
    with pytest.raises(errors.IntegrityError, match="not signed by the origin"):
        peercerts.check_node_certificate("junk", ca.public_key(), node.public_key)


@pytest.mark.parametrize("pem", ["", "junk", "é", peercerts.DH_PARAMS])
def test_a_public_key_that_is_not_ed25519_pem_is_a_400(pem: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        peercerts.parse_public_key(pem)
    assert exc.value.oci.status == 400 and str(exc.value).startswith("public_key: ")


def test_an_ec_public_key_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(errors.BadRequest, match="not an Ed25519 public key"):
        peercerts.parse_public_key(pem)


def test_a_node_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "data" / "node.key"
    made = peercerts.NodeKey.load_or_create(path, "data_dir")
    assert path.stat().st_mode & 0o777 == 0o600
    again = peercerts.NodeKey.load_or_create(path, "data_dir")
    assert again.public_pem == made.public_pem and "PRIVATE" not in repr(again)
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary file left
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^data_dir: .* can be read by others than its owner \(chmod 600 it\)$"):
        peercerts.NodeKey.load_or_create(path, "data_dir")
    path.chmod(0o600)
    path.write_text("junk")
    with pytest.raises(ConfigError, match=r"^data_dir: .* is not an unencrypted PEM private key$"):
        peercerts.NodeKey.load_or_create(path, "data_dir")
