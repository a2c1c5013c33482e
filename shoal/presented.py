"""Credentials a caller presents on someone's behalf (an `Authorization` value as a puller or an
operator sent it), and how shoal asks the registry with them.

The agent forwards a puller's credential to the origin to have a blob admitted; an operator
signs in to the origin with their registry login. Either way the registry decides, with the
presented credential itself, and shoal reads who it accepted from the credential.
"""

from __future__ import annotations

import base64
import binascii
import json

from shoal import errors
from shoal.registry import OWN, Authorization, Credentials, RegistryClient

MAX_LENGTH = 8192  # a registry token with many scopes is a few KiB; containerd sends under 4 KiB


def check(header: str | None, what: str) -> str | None:
    """`header` if it can be forwarded as it was sent (ASCII, bounded), else 401."""
    if header is None or header == "":
        return None
    if not header.isascii() or len(header) > MAX_LENGTH or "\r" in header or "\n" in header:
        raise errors.Unauthorized(f"the {what} is not a usable Authorization value")
    return header


def basic_credentials(header: str) -> Credentials | None:
    """The user and password of a Basic `header`, or None if it is not Basic."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise errors.Unauthorized("malformed Basic credentials") from None
    if not sep or not user:
        raise errors.Unauthorized("malformed Basic credentials")
    return Credentials(user, password)


def acting_for(client: RegistryClient, header: str | None) -> tuple[RegistryClient, Authorization]:
    """How to ask `client`'s registry as the holder of `header`: a Basic login (or nobody) answers
    the registry's challenges itself, as a client of the registry would (a token from the token
    server for a Bearer registry); a Bearer token is sent exactly once, as it was given."""
    if header is None:
        return client.with_credentials(None), OWN
    credentials = basic_credentials(header)
    if credentials is not None:
        return client.with_credentials(credentials), OWN
    return client, header


def principal_of(header: str | None, fallback: str) -> str:
    """Who the registry accepted, read from the credential (call only after it answered 2xx for
    it): the Basic user, or a registry token's subject (the registry checked its signature).
    `fallback` (e.g. the credential's fingerprint) for anything else."""
    if header is None:
        return "anonymous"
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            return fallback
    if scheme.lower() == "bearer":
        parts = value.split(".")
        if len(parts) == 3:
            try:
                claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
                sub = claims.get("sub") if isinstance(claims, dict) else None
                if isinstance(sub, str):
                    return sub or "anonymous"
            except (binascii.Error, ValueError):
                pass
    return fallback
