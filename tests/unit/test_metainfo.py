from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shoal import bencode, metainfo
from shoal.oci import Digest
from tests.support.pki import SOME_ROOT

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(("size", "piece"), [
    # at least MIN_PIECES (64) pieces, down to 16 KiB ones: a rollout's nodes have that many
    # pieces to take from the origin's seeder each a different one (RESULTS.md section 26)
    (1, 16 * KIB), (16 * KIB + 1, 16 * KIB), (700 * KIB, 16 * KIB), (MIB, 16 * KIB), (MIB + 1, 16 * KIB),
    (2 * MIB, 32 * KIB), (4 * MIB - 1, 32 * KIB), (4 * MIB, 64 * KIB), (6_250_000, 64 * KIB),
    (8 * MIB, 128 * KIB), (16 * MIB - 1, 128 * KIB), (16 * MIB, 256 * KIB),
    (64 * MIB, 256 * KIB), (GIB - 1, 256 * KIB), (GIB, MIB),
    (16 * GIB - 1, MIB), (16 * GIB, 4 * MIB), (64 * GIB, 4 * MIB),
])
def test_piece_size_policy(size: int, piece: int) -> None:
    assert metainfo.piece_size_for(size) == piece
    assert size <= piece or size // piece >= 64 or piece == 16 * KIB


def make_blob(tmp_path: Path, size: int) -> tuple[Path, Digest]:
    data = (b"shoal" * (size // 5 + 1))[:size]
    digest = Digest(hashlib.sha256(data).hexdigest())
    path = tmp_path / digest.hex
    path.write_bytes(data)
    return path, digest


@pytest.mark.parametrize("size", [10, 3 * MIB + 5, 70 * MIB])
def test_create_and_parse(tmp_path: Path, size: int) -> None:
    path, digest = make_blob(tmp_path, size)
    raw = metainfo.create(path, digest, announce="http://t:1/announce", root_cert=SOME_ROOT)
    meta = metainfo.parse(raw)
    assert meta.digest == digest and meta.size == size
    assert meta.piece_length == metainfo.piece_size_for(size)
    assert meta.num_pieces == -(-size // meta.piece_length)
    doc = bencode.decode(raw)
    assert isinstance(doc, dict)
    assert doc[b"announce"] == b"http://t:1/announce"
    assert doc[b"created by"] == b"shoal"
    import libtorrent as lt

    ti = lt.torrent_info(raw)
    assert ti.priv() and ti.info_hashes().has_v2() and not ti.info_hashes().has_v1()
    assert ti.info_hashes().v2.to_bytes() == meta.info_hash
    assert ti.info_hashes().get_best().to_bytes() == meta.tracker_hash
    assert ti.ssl_cert() == SOME_ROOT and meta.root_cert == SOME_ROOT


def _mutate(raw: bytes, **info_changes: bencode.Value | None) -> bytes:
    doc = bencode.decode(raw)
    assert isinstance(doc, dict)
    info = doc[b"info"]
    assert isinstance(info, dict)
    for k, v in info_changes.items():
        key = b"ssl-cert" if k == "ssl_cert" else k.replace("_", " ").encode()
        if v is None:
            info.pop(key, None)
        else:
            info[key] = v
    return bencode.encode(doc)


def test_rejects_unsafe_metainfo(tmp_path: Path) -> None:
    path, digest = make_blob(tmp_path, 100)
    raw = metainfo.create(path, digest, announce="http://t:1/announce", root_cert=SOME_ROOT)
    # The tracker answers a refused registration with "invalid metainfo: <this message>".
    for bad, reason in [
        (_mutate(raw, private=None), "torrent is not private"),
        (_mutate(raw, meta_version=1), "not a BitTorrent v2 torrent"),
        # a plain torrent would be served to any peer that knows its info-hash
        (_mutate(raw, ssl_cert=None), "torrent has no swarm certificate (not an SSL torrent)"),
        (_mutate(raw, ssl_cert=b"junk"), "torrent has no swarm certificate (not an SSL torrent)"),
        (_mutate(raw, ssl_cert=7), "torrent has no swarm certificate (not an SSL torrent)"),
        (_mutate(raw, name=b"../../etc/passwd"), "torrent name is not a sha256 hex digest"),
        (_mutate(raw, name=b"\xff" * 64), "torrent name is not a sha256 hex digest"),
        (_mutate(raw, piece_length=1000), "piece length must be a power of two of at least 16 KiB"),
        (b"d4:infod", "metainfo is not bencode: unexpected end of bencoded data"),
        (b"x" * (metainfo.MAX_METAINFO_BYTES + 1), "metainfo too large"),
        # found by the hypothesis parser test under mutmut's seed: a byte >= 0x80 in the URL
        # escaped as UnicodeDecodeError instead of MetainfoError
        (raw.replace(b"http://t:1/announce", b"http://t:1/\x80nnounce"), "torrent has no http(s) announce URL"),
    ]:
        with pytest.raises(metainfo.MetainfoError) as exc:
            metainfo.parse(bad)
        assert str(exc.value) == reason


def test_size_limit_is_inclusive(tmp_path: Path) -> None:
    path, digest = make_blob(tmp_path, 100)
    doc = bencode.decode(metainfo.create(path, digest, announce="http://t:1/announce", root_cert=SOME_ROOT))
    assert isinstance(doc, dict)
    # a comment of n bytes adds n + len(str(n)) - 1 to the empty comment's "0:"; n has 7 digits here
    pad = metainfo.MAX_METAINFO_BYTES - len(bencode.encode({**doc, b"comment": b""})) + 1 - 7
    exact = bencode.encode({**doc, b"comment": b"x" * pad})
    assert len(exact) == metainfo.MAX_METAINFO_BYTES
    assert metainfo.parse(exact).digest == digest
    with pytest.raises(metainfo.MetainfoError) as exc:
        metainfo.parse(bencode.encode({**doc, b"comment": b"x" * (pad + 1)}))
    assert str(exc.value) == "metainfo too large"


def test_empty_file_parses(tmp_path: Path) -> None:
    path, digest = make_blob(tmp_path, 100)
    raw = metainfo.create(path, digest, announce="http://t:1/announce", root_cert=SOME_ROOT)
    name = digest.hex.encode()
    meta = metainfo.parse(_mutate(raw, file_tree={name: {b"": {b"length": 0}}}))
    assert meta.size == 0 and meta.num_pieces == 0


def test_parse_refuses_every_malformed_shape(tmp_path: Path) -> None:
    """Each shape a hostile server could send ends in MetainfoError, never another exception."""
    path, digest = make_blob(tmp_path, 100_000)
    raw = metainfo.create(path, digest, announce="https://t:1/announce", root_cert=SOME_ROOT)
    meta = metainfo.parse(raw)
    assert meta.raw == raw and meta.announce == "https://t:1/announce"
    doc = bencode.decode(raw)
    assert isinstance(doc, dict)
    info = doc[b"info"]
    assert isinstance(info, dict)
    name = digest.hex.encode()
    no_info, no_length = "metainfo has no info dictionary", "torrent file has no valid length"
    bad_piece = "piece length must be a power of two of at least 16 KiB"
    no_announce = "torrent has no http(s) announce URL"
    for bad, why in [
        (b"le", no_info), (b"de", no_info),
        (bencode.encode({**doc, b"info": b"x"}), no_info),
        (_mutate(raw, file_tree={name: 5}), no_length),
        (_mutate(raw, file_tree={name: {b"": 5}}), no_length),
        (_mutate(raw, file_tree={name: {b"": {b"length": -1}}}), no_length),
        (_mutate(raw, file_tree={name: {b"": {b"length": 1}}, b"x": {}}),
         "torrent must hold exactly one file named by its digest"),
        (_mutate(raw, piece_length=8 * KIB), bad_piece),
        (_mutate(raw, piece_length=48 * KIB), bad_piece),
        (_mutate(raw, name=5), "torrent name is not a sha256 hex digest"),
        (bencode.encode({**doc, b"announce": b"udp://t:1/announce"}), no_announce),
        (bencode.encode({**doc, b"announce": 7}), no_announce),
    ]:
        with pytest.raises(metainfo.MetainfoError) as exc:
            metainfo.parse(bad)
        assert str(exc.value) == why


def test_announce_list(tmp_path: Path) -> None:
    """Tracker replicas: one BEP 12 tier, `announce` first; the info-hash does not depend on them."""
    data = b"replicas" * 1000
    digest = Digest(hashlib.sha256(data).hexdigest())
    path = tmp_path / digest.hex
    path.write_bytes(data)
    one = metainfo.parse(metainfo.create(path, digest, announce="http://a:1/announce", root_cert=SOME_ROOT))
    two_raw = metainfo.create(path, digest, announce=["http://a:1/announce", "http://b:1/announce"],
                              root_cert=SOME_ROOT)
    two = metainfo.parse(two_raw)
    assert one.trackers == ("http://a:1/announce",)
    assert two.announce == "http://a:1/announce" and two.trackers == ("http://a:1/announce", "http://b:1/announce")
    assert one.info_hash == two.info_hash
    doc = bencode.decode(two_raw)
    assert isinstance(doc, dict)
    bads: list[bencode.Value] = [[[b"ftp://x/announce"]], [b"http://x/announce"],
                                 [[b"http://x/%d" % i for i in range(17)]], [[1]]]
    for bad in bads:
        doc[b"announce-list"] = bad
        with pytest.raises(metainfo.MetainfoError):
            metainfo.parse(bencode.encode(doc))
