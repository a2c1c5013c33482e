"""Property-based tests: every parser facing the network or an operator either returns a value
or raises its own error type, never anything else, whatever the input."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import audit, bencode, errors, metainfo, signing
from shoal.errors import ConfigError
from shoal.oci import Digest, ImageReference, parse_manifest
from shoal.registry import Challenge
from shoal_agent import config as agent_config
from shoal_agent.api import parse_path
from shoal_origin import config as origin_config
from shoal_tracker import announce as ann
from shoal_tracker import config as tracker_config
from tests.support.pki import SOME_ROOT

binary = st.binary(max_size=40)
text = st.text(max_size=60)


@given(st.dictionaries(st.sampled_from(["info_hash", "peer_id", "port", "left", "uploaded", "downloaded",
                                         "event", "numwant", "compact", "ip", "token", "key", "x"]),
                       binary, max_size=10))
def test_announce_parser(params: dict[str, bytes]) -> None:
    query = "&".join(f"{k}={quote_from_bytes(v)}" for k, v in params.items())
    try:
        a = ann.parse_announce(query)
    except ann.AnnounceError:
        return
    assert len(a.info_hash) == 20
    assert len(a.peer_id) == 20
    assert 1 <= a.port <= 65535


def _num(lo: int, hi: int) -> st.SearchStrategy[bytes]:
    return st.integers(lo, hi).map(lambda n: str(n).encode())


# Well-formed announces (what libtorrent sends), so the parser's success path is exercised on
# every example rather than by chance (random bytes almost never make a 20-byte info_hash).
valid_announces = st.fixed_dictionaries(
    {"info_hash": st.binary(min_size=20, max_size=20), "peer_id": st.binary(min_size=20, max_size=20),
     "port": _num(1, 65535)},
    optional={"left": _num(0, 1 << 50), "uploaded": _num(0, 1 << 50), "downloaded": _num(0, 1 << 50),
              "event": st.sampled_from([b"", b"started", b"completed", b"stopped", b"paused"]),
              "numwant": _num(0, 100000), "compact": st.sampled_from([b"0", b"1"]),
              "token": st.text(alphabet=st.characters(codec="ascii"), max_size=30).map(str.encode),
              "ip": binary, "key": binary},
)


@given(valid_announces)
def test_announce_parser_reads_every_well_formed_announce(params: dict[str, bytes]) -> None:
    a = ann.parse_announce("&".join(f"{k}={quote_from_bytes(v)}" for k, v in params.items()))
    assert (a.info_hash, a.peer_id, a.port) == (params["info_hash"], params["peer_id"], int(params["port"]))
    assert a.left == int(params.get("left", b"0"))
    assert a.event == params.get("event", b"").decode()
    assert a.numwant == (int(params["numwant"]) if "numwant" in params else None)
    assert a.compact is (params.get("compact", b"1") != b"0")
    assert a.token == (params["token"].decode() if "token" in params else None)


@given(text)
def test_announce_parser_raw(raw: str) -> None:
    with contextlib.suppress(ann.AnnounceError):
        ann.parse_announce(raw)
    try:
        hashes = ann.parse_scrape(raw)
        assert all(len(h) == 20 for h in hashes)
    except ann.AnnounceError:
        pass


@pytest.fixture(scope="module")
def valid_metainfo(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("meta")
    data = b"fuzz" * 50_000
    digest = Digest(hashlib.sha256(data).hexdigest())
    (d / digest.hex).write_bytes(data)
    return metainfo.create(d / digest.hex, digest, announce="http://t/announce", root_cert=SOME_ROOT)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_metainfo_parser(valid_metainfo: bytes, data: st.DataObject) -> None:
    raw = bytearray(valid_metainfo)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        meta = metainfo.parse(bytes(raw))
    except metainfo.MetainfoError:
        return
    assert len(meta.digest.hex) == 64
    assert meta.piece_length >= 16 * 1024


@given(binary)
def test_metainfo_parser_on_anything(raw: bytes) -> None:
    with contextlib.suppress(metainfo.MetainfoError):
        metainfo.parse(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
agent_keys = st.sampled_from(["data_dir", "upstreams", "listen", "node", "tracker", "origin", "cache", "auth",
                              "swarm", "journal", "torrent", "log", "max_blob_size", "node_token", "bogus"])


@given(st.dictionaries(agent_keys, json_values, max_size=6))
def test_agent_config_errors_are_config_errors(doc: dict[str, Any]) -> None:
    message = ""
    try:
        agent_config.load(doc)
    except ConfigError as exc:
        message = str(exc)
    assert "\n" not in message


@given(st.dictionaries(st.sampled_from(["listen", "interval", "peer_ttl", "registration_token", "node_token",
                                        "origin_public_key", "numwant_max", "x"]), json_values, max_size=5))
def test_tracker_config_errors_are_config_errors(doc: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        tracker_config.load(doc)


@given(st.dictionaries(st.sampled_from(["data_dir", "upstreams", "tracker", "signing_key", "node_token", "cache",
                                        "swarm_token_ttl", "preseed_concurrency", "y"]), json_values, max_size=5))
def test_origin_config_errors_are_config_errors(doc: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        origin_config.load(doc)


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=120))
def test_mirror_paths(tail: str) -> None:
    try:
        route = parse_path("/v2/" + tail)
    except errors.ShoalError:
        return
    assert ".." not in route.name and "%" not in route.name and "//" not in route.name
    assert "/" not in route.reference


_component = st.from_regex(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", fullmatch=True).filter(lambda c: len(c) < 40)
names = st.lists(_component, min_size=1, max_size=4).map("/".join)
references = st.one_of(
    st.tuples(st.just("manifests"), st.from_regex(r"[\w][\w.-]{0,127}", fullmatch=True)),
    st.tuples(st.sampled_from(["manifests", "blobs", "referrers"]),
              st.from_regex(r"[0-9a-f]{64}", fullmatch=True).map(lambda h: "sha256:" + h)),
    st.tuples(st.just("tags"), st.just("")),
)


@given(names, references)
def test_mirror_paths_accept_every_valid_route(name: str, ref: tuple[str, str]) -> None:
    kind, reference = ref
    path = f"/v2/{name}/tags/list" if kind == "tags" else f"/v2/{name}/{kind}/{reference}"
    route = parse_path(path)
    assert (route.kind, route.name, route.reference) == (kind, name, reference)


@given(text)
def test_image_references_and_challenges(raw: str) -> None:
    with contextlib.suppress(errors.ShoalError):
        ImageReference.parse(raw)
    challenge = Challenge.parse(raw)
    assert challenge is None or challenge.scheme in ("basic", "bearer")


@given(binary)
def test_manifest_parser(raw: bytes) -> None:
    with contextlib.suppress(errors.BadRequest):
        parse_manifest(raw, "application/json")


@given(st.dictionaries(st.sampled_from([*list(audit.EVENT_FIELDS), "phase", "junk"]), json_values, max_size=8))
def test_journal_record_validation(record: dict[str, Any]) -> None:
    with contextlib.suppress(audit.RecordError):
        audit.validate(record)


@given(text)
def test_swarm_token_verification(token: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(signing.SignatureError):
        signing.verify_token(key, token)


@given(st.binary(max_size=200))
def test_bencode_against_random_input(raw: bytes) -> None:
    with contextlib.suppress(bencode.BencodeError):
        bencode.decode(raw)


def test_no_file_outside_the_cache_for_hostile_digests(tmp_path: Path) -> None:
    for hostile in ("sha256:../../etc/passwd", "sha256:" + "../" * 21 + "a", "sha256:/etc/passwd" + "0" * 51):
        with pytest.raises(errors.BadRequest):
            Digest.parse(hostile)
