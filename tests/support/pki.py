"""Swarm credentials for tests and bench runs that build libtorrent sessions without an origin:
a CA key, its certificate for torrents, and a token plus certificate for a session."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import peercerts, signing
from shoal.swarm import Grant, Swarm

# For torrents no swarm of the test trades (parsing, registering, fuzzing).
SOME_CA = Ed25519PrivateKey.generate()
SOME_ROOT = peercerts.ca_certificate(SOME_CA)


def grant(swarm: Swarm, ca: Ed25519PrivateKey, node: str, ttl: float = 600, torrent: str = signing.EVERY_BLOB
          ) -> Grant:
    """What an origin's admission gives a node for a torrent (or every one): a token and a
    certificate for the session's key."""
    return Grant(*peercerts.issue_grant(ca, node, swarm.key.public_key, torrent, ttl))


def admit(swarm: Swarm, ca: Ed25519PrivateKey, node: str, ttl: float = 600) -> None:
    """Let `swarm` take part in every torrent of `ca` (as the origin does)."""
    swarm.set_default_grant(grant(swarm, ca, node, ttl))
