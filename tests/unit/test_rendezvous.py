"""Blob ownership among several origins (shoal/rendezvous.py), and the deterministic torrent
every owner of a blob builds (shoal/metainfo.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shoal import bencode, metainfo, peercerts, rendezvous, signing
from shoal.oci import Digest

ROOT = Path(__file__).resolve().parents[2]
ORIGINS = ["origin-a", "origin-b", "origin-c"]
KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(6000)]


def test_weights_are_fixed_values_not_per_process() -> None:
    # pinned: a change of the function moves every blob to other owners in a mixed-version cluster
    assert rendezvous.weight("origin-a", "abc") == 16173228009359715792
    assert rendezvous.ranked(["a", "b", "c"], "0" * 64) == ["c", "b", "a"]
    assert rendezvous.ranked(["a", "b", "c"], "f" * 64) == ["a", "c", "b"]
    # and the same in another interpreter (str hashes are salted per process: not used)
    code = "from shoal import rendezvous; print(rendezvous.ranked(['a', 'b', 'c'], '0' * 64))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "['c', 'b', 'a']"


def test_the_order_of_the_configured_list_does_not_matter() -> None:
    for key in KEYS[:200]:
        assert rendezvous.ranked(ORIGINS, key) == rendezvous.ranked(list(reversed(ORIGINS)), key)
        assert sorted(rendezvous.ranked(ORIGINS, key)) == sorted(ORIGINS)


def test_owners_are_the_head_of_the_ranking() -> None:
    for key in KEYS[:200]:
        assert rendezvous.owners(ORIGINS, key, 2) == rendezvous.ranked(ORIGINS, key)[:2]
    assert rendezvous.owners(["solo"], KEYS[0], 2) == ["solo"]
    with pytest.raises(ValueError, match="replication"):
        rendezvous.owners(ORIGINS, KEYS[0], 0)


def test_blobs_spread_evenly() -> None:
    firsts = Counter(rendezvous.ranked(ORIGINS, k)[0] for k in KEYS)
    owned = Counter(o for k in KEYS for o in rendezvous.owners(ORIGINS, k, 2))
    for name in ORIGINS:
        assert abs(firsts[name] - len(KEYS) / 3) < len(KEYS) * 0.03, firsts
        assert abs(owned[name] - 2 * len(KEYS) / 3) < len(KEYS) * 0.03, owned
    # every pair of origins shares about as many blobs (a dead origin's load spreads over the rest)
    pairs = Counter(tuple(sorted(rendezvous.owners(ORIGINS, k, 2))) for k in KEYS)
    assert len(pairs) == 3 and min(pairs.values()) > len(KEYS) / 3 * 0.9


def test_adding_an_origin_moves_only_what_it_wins() -> None:
    more = [*ORIGINS, "origin-d"]
    moved = 0
    for key in KEYS:
        before, after = rendezvous.ranked(ORIGINS, key), rendezvous.ranked(more, key)
        # the old origins keep their relative order: removing the new one gives the old ranking
        assert [o for o in after if o != "origin-d"] == before
        if after[0] != before[0]:
            assert after[0] == "origin-d"
            moved += 1
    # about a quarter of the blobs change their first owner, all of them to the new origin
    assert abs(moved - len(KEYS) / 4) < len(KEYS) * 0.03


def test_removing_an_origin_moves_only_what_it_owned() -> None:
    fewer = ORIGINS[:2]
    for key in KEYS[:1000]:
        before = rendezvous.owners(ORIGINS, key, 2)
        after = rendezvous.owners(fewer, key, 2)
        if "origin-c" not in before:
            assert after == before


def test_every_owner_builds_the_same_torrent(tmp_path: Path) -> None:
    """Two origins sharing the signing key build byte-identical metainfo for a blob, whatever the
    time; the announce URL (outside the info dict) changes the bytes, never the info-hash."""
    data = os.urandom(3 << 20)
    digest = Digest(hashlib.sha256(data).hexdigest())
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / digest.hex).write_bytes(data)
    pem = tmp_path / "key.pem"
    pem.write_bytes(signing.generate_private_key())
    key = signing.load_private_key(str(pem), "signing_key")
    cert = peercerts.ca_certificate(key)
    assert peercerts.ca_certificate(key) == cert  # the CA certificate is a function of the key
    first = metainfo.create(tmp_path / "a" / digest.hex, digest, announce="http://t:1/announce", root_cert=cert)
    second = metainfo.create(tmp_path / "b" / digest.hex, digest, announce="http://t:1/announce", root_cert=cert)
    assert first == second
    doc = bencode.decode(first)
    assert isinstance(doc, dict) and b"creation date" not in doc  # (the one field that follows the clock)
    assert signing.sign_metainfo(key, first) == signing.sign_metainfo(key, second)
    elsewhere = metainfo.create(tmp_path / "b" / digest.hex, digest, announce="http://t2:1/announce",
                                root_cert=cert)
    assert elsewhere != first
    assert metainfo.parse(elsewhere).info_hash == metainfo.parse(first).info_hash
