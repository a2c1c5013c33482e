"""Which origins own a blob: rendezvous (highest-random-weight) hashing.

Every agent and every origin ranks the configured origins for a key (a blob's digest hex, or a
node's name for its journal) by the same pure function of (origin name, key), so they agree
without talking to each other. The first `replication` of the ranking are the blob's owners;
the rest of the ranking is the order in which everyone falls back when owners are down.

Why rendezvous and not a ring: no virtual nodes to tune, an even spread with few members, and
adding or removing an origin moves only the keys it wins or held (about 1/n of them).

The weight is keyed by the origin's configured *name*, never its URL: an origin can move to
another address without its blobs changing owners, and agents and origins only need to agree
on names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_REPLICATION = 2


def weight(member: str, key: str) -> int:
    """A stable 64-bit weight of `member` for `key` (the same on every host and Python run:
    SHA-256, not hash(), which is salted per process)."""
    digest = hashlib.sha256(member.encode() + b"\x00" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ranked(members: Sequence[str], key: str) -> list[str]:
    """`members` from the highest weight for `key` to the lowest (names break exact ties)."""
    return sorted(members, key=lambda m: (-weight(m, key), m))


def owners(members: Sequence[str], key: str, replication: int) -> list[str]:
    """The `replication` highest-ranked members for `key` (all of them if there are fewer)."""
    if replication < 1:
        raise ValueError("replication must be at least 1")
    return ranked(members, key)[:replication]
