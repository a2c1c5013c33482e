"""Swarm credentials for tests and bench runs that build libtorrent sessions without an origin:
a CA key, its certificate for torrents, and a token plus certificate for a session."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import peercerts, signing
from shoal.swarm import Swarm

# For torrents no swarm of the test trades (parsing, registering, fuzzing).
SOME_CA = Ed25519PrivateKey.generate()
SOME_ROOT = peercerts.ca_certificate(SOME_CA)


def admit(swarm: Swarm, ca: Ed25519PrivateKey, node: str, ttl: float = 600) -> None:
    """What an origin's swarm-token answer gives a node: a token and a certificate for its key."""
    token = signing.issue_token(ca, node, ttl)
    cert = peercerts.issue_node_certificate(ca, node, swarm.key.public_key, signing.verify_token(
        ca.public_key(), token).expires)
    swarm.set_token(token, cert)
