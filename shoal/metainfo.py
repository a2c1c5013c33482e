"""Torrent metainfo for blobs: one private BitTorrent v2 torrent per blob digest.

Piece-size policy (deterministic, so every origin builds the same torrent for a blob):

    blob size         piece size
    < 16 MiB          the largest power of two up to 256 KiB giving 64 pieces, at least 16 KiB
    < 1 GiB           256 KiB
    < 16 GiB          1 MiB
    >= 16 GiB         4 MiB    (keeps the piece count and the metainfo small)

Small pieces win rollouts: a node can pass a piece on only once it has all of it, and with
many pieces per layer the nodes (and the origin seeder) hold different ones. At 16 nodes
capped at 20 MB/s, 4 MiB pieces took 51 s for a 256 MiB image, 1 MiB 42 s, 256 KiB 41 s
(bench/RESULTS.md).

The torrent's single file is named by the digest's hex, so the v2 info-hash binds the digest;
BitTorrent v2 pieces are SHA-256 merkle-verified. The v2 `pieces root` is not the OCI digest,
so whoever has the bytes (the origin) must publish the metainfo per digest.

Every torrent is an SSL torrent: its info dictionary holds the swarm CA's certificate
(`ssl-cert`, shoal.peercerts), so the info-hash binds the CA too, and libtorrent exchanges its
pieces only over TLS with peers holding a certificate from that CA. A torrent without one is
refused everywhere (a plain torrent would serve any peer that knows its info-hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal import bencode
from shoal.oci import SHA256_HEX_RE, Digest

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MAX_METAINFO_BYTES = 4 * MIB
# Tracker replicas a torrent may name, and the longest URL of one.
MAX_TRACKERS = 16
MAX_TRACKER_URL = 2048
# A blob under 16 MiB gets pieces small enough for MIN_PIECES of them (down to MIN_PIECE, the
# smallest v2 piece). When a swarm starts, every node asks the origin's seeder for the pieces no
# other node has yet: with 24 pieces (a 6 MiB layer at 256 KiB) they ask for the same few, and
# the seeder sends each several times (RESULTS.md section 26).
MIN_PIECE = 16 * KIB
MIN_PIECES = 64


def piece_size_for(size: int) -> int:
    if size >= 16 * GIB:
        return 4 * MIB
    if size >= GIB:
        return MIB
    piece = 256 * KIB
    while piece > MIN_PIECE and size < piece * MIN_PIECES:
        piece //= 2
    return piece


class MetainfoError(ValueError):
    """Metainfo that is not a single-file private v2 torrent named by a sha256 digest."""


@dataclass(frozen=True, slots=True)
class Metainfo:
    raw: bytes
    digest: Digest
    size: int
    piece_length: int
    info_hash: bytes  # the full 32-byte v2 info-hash
    announce: str
    root_cert: str  # the swarm CA certificate (PEM) peers must chain to
    # Every tracker (BEP 12 announce-list, one tier: replicas of one tracker), `announce` first.
    trackers: tuple[str, ...] = ()

    @property
    def tracker_hash(self) -> bytes:
        """v2 info-hashes reach trackers truncated to 20 bytes (BEP 52)."""
        return self.info_hash[:20]

    @property
    def num_pieces(self) -> int:
        return (self.size + self.piece_length - 1) // self.piece_length


def parse(raw: bytes) -> Metainfo:
    if len(raw) > MAX_METAINFO_BYTES:
        raise MetainfoError("metainfo too large")
    try:
        doc = bencode.decode(raw)
    except bencode.BencodeError as exc:
        raise MetainfoError(f"metainfo is not bencode: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(b"info"), dict):
        raise MetainfoError("metainfo has no info dictionary")
    info = doc[b"info"]
    assert isinstance(info, dict)
    if info.get(b"meta version") != 2:
        raise MetainfoError("not a BitTorrent v2 torrent")
    if info.get(b"private") != 1:
        raise MetainfoError("torrent is not private")
    name = info.get(b"name")
    if not isinstance(name, bytes) or not SHA256_HEX_RE.fullmatch(name.decode("ascii", "replace")):
        raise MetainfoError("torrent name is not a sha256 hex digest")
    tree = info.get(b"file tree")
    if not isinstance(tree, dict) or list(tree) != [name]:
        raise MetainfoError("torrent must hold exactly one file named by its digest")
    leaf = tree[name]
    node = leaf.get(b"") if isinstance(leaf, dict) else None
    length = node.get(b"length") if isinstance(node, dict) else None
    if not isinstance(length, int) or length < 0:
        raise MetainfoError("torrent file has no valid length")
    piece_length = info.get(b"piece length")
    if not isinstance(piece_length, int) or piece_length < 16 * KIB or piece_length & (piece_length - 1):
        raise MetainfoError("piece length must be a power of two of at least 16 KiB")
    root_cert = info.get(b"ssl-cert")
    if not isinstance(root_cert, bytes) or not root_cert.startswith(b"-----BEGIN CERTIFICATE-----") \
            or not root_cert.isascii():
        raise MetainfoError("torrent has no swarm certificate (not an SSL torrent)")
    announce = doc.get(b"announce")
    if (not isinstance(announce, bytes) or not announce.startswith((b"http://", b"https://"))
            or not announce.isascii()):
        # a URL is ASCII (RFC 3986); anything else would fail to decode further on
        raise MetainfoError("torrent has no http(s) announce URL")
    info_hash = hashlib.sha256(bencode.encode(info)).digest()
    return Metainfo(raw, Digest(name.decode()), length, piece_length, info_hash, announce.decode("ascii"),
                    root_cert.decode("ascii"), _trackers(announce.decode("ascii"), doc.get(b"announce-list")))


def _trackers(announce: str, announce_list: object) -> tuple[str, ...]:
    if announce_list is None:
        return (announce,)
    if not isinstance(announce_list, list) or not all(isinstance(tier, list) for tier in announce_list):
        raise MetainfoError("announce-list must be a list of tiers")
    urls: dict[str, None] = {}  # in order, once each
    for tier in announce_list:
        for url in tier:
            if (not isinstance(url, bytes) or not url.startswith((b"http://", b"https://")) or not url.isascii()
                    or len(url) > MAX_TRACKER_URL):
                raise MetainfoError("announce-list holds something other than http(s) URLs")
            urls[url.decode("ascii")] = None
            if len(urls) > MAX_TRACKERS:  # at once: a registration of 40,000 URLs took 14 s
                raise MetainfoError(f"more than {MAX_TRACKERS} trackers")
    return tuple(urls) if announce in urls else (announce, *urls)


def create(blob: Path, digest: Digest, *, announce: str | Sequence[str], root_cert: str) -> bytes:
    """Build the metainfo for the verified blob at `blob` (named by its hex), for peers holding
    a certificate of the CA `root_cert` (PEM, used byte for byte: it is part of the info-hash),
    announcing to `announce` (one URL, or the replicas of one tracker, as one BEP 12 tier).
    Blocking: it hashes the whole file, so call it in a thread."""
    import libtorrent as lt  # imported here: the tracker parses metainfo without libtorrent

    if blob.name != digest.hex:
        raise ValueError("the blob file must be named by its digest hex")
    size = blob.stat().st_size
    ct = lt.create_torrent(
        [lt.create_file_entry(digest.hex, size)],
        piece_size=piece_size_for(size),
        flags=lt.create_torrent.v2_only,
    )
    ct.set_priv(True)
    ct.set_root_cert(root_cert)
    ct.set_creator("shoal")
    for url in [announce] if isinstance(announce, str) else announce:
        ct.add_tracker(url, 0)
    lt.set_piece_hashes(ct, str(blob.parent))
    doc = ct.generate()
    # Several origins seed a blob (shoal/rendezvous.py): they must build the same torrent. The
    # info dict (and so the info-hash) depends only on the blob, the piece size and the CA
    # certificate; the creation date, outside it, is dropped too, so that origins with the same
    # announce URL publish byte-identical metainfo (the tracker's registration is then the same
    # whichever owner registers it).
    doc.pop(b"creation date", None)
    raw: bytes = lt.bencode(doc)
    return raw


def with_trackers(raw: bytes, announce: Sequence[str]) -> bytes:
    """The same torrent announcing to `announce` (one tier): the tracker keys are outside `info`,
    so the info-hash, and the swarm, stay the same."""
    doc = bencode.decode(raw)
    if not isinstance(doc, dict) or not announce:
        raise MetainfoError("not a torrent, or no tracker")
    doc[b"announce"] = announce[0].encode("ascii")
    doc[b"announce-list"] = [[url.encode("ascii") for url in announce]]
    return bencode.encode(doc)


@dataclass(frozen=True, slots=True)
class Published:
    """Metainfo with the origin's signature of it, as the origin publishes it."""

    meta: Metainfo
    signature: str
