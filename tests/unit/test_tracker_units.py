from __future__ import annotations

import time
from urllib.parse import quote_from_bytes

import pytest

from shoal import bencode
from shoal_tracker import announce as ann
from shoal_tracker.peers import Peer, PeerStore

IH = bytes(range(0xE0, 0xF4))  # not valid UTF-8: must survive percent-decoding
PID = b"-SA0100-" + b"\xff" * 12


def query(**kw: object) -> str:
    params = {"info_hash": IH, "peer_id": PID, "port": 6881, "uploaded": 0, "downloaded": 0, "left": 10,
              "compact": 1, **kw}
    parts = []
    for k, v in params.items():
        if v is None:
            continue
        raw = v if isinstance(v, bytes) else str(v).encode()
        parts.append(f"{k}={quote_from_bytes(raw)}")
    return "&".join(parts)


def test_parse_binary_announce() -> None:
    a = ann.parse_announce(query(event="started", numwant=5, ip="10.9.9.9"))
    assert a.info_hash == IH and a.peer_id == PID and a.port == 6881 and a.left == 10
    assert a.event == "started" and a.numwant == 5 and a.compact


@pytest.mark.parametrize(("change", "message"), [
    ({"info_hash": b"short"}, "info_hash must be 20 bytes"),
    ({"peer_id": None}, "missing peer_id"),
    ({"port": 0}, "port out of range"),
    ({"port": 70000}, "port out of range"),
    ({"left": -1}, "left must be a non-negative integer"),
    ({"event": "exploded"}, "unknown event"),
])
def test_bad_announces(change: dict[str, object], message: str) -> None:
    with pytest.raises(ann.AnnounceError, match=message):
        ann.parse_announce(query(**change))
    with pytest.raises(ann.AnnounceError, match="more than once"):
        ann.parse_announce(query() + "&port=1")
    with pytest.raises(ann.AnnounceError, match="too long"):
        ann.parse_announce("x=" + "a" * 5000)


def test_compact_answer_v4_and_v6() -> None:
    body = ann.announce_response([("127.0.0.2", 6881, PID), ("::1", 7000, PID)], compact=True, no_peer_id=True,
                                 interval=30, min_interval=5, complete=1, incomplete=1)
    doc = bencode.decode(body)
    assert isinstance(doc, dict)
    assert doc[b"peers"] == bytes([127, 0, 0, 2]) + (6881).to_bytes(2, "big")
    assert doc[b"peers6"] == b"\x00" * 15 + b"\x01" + (7000).to_bytes(2, "big")
    assert doc[b"interval"] == 30
    dict_form = bencode.decode(ann.announce_response([("127.0.0.2", 1, PID)], compact=False, no_peer_id=False,
                                                     interval=30, min_interval=5, complete=0, incomplete=1))
    assert isinstance(dict_form, dict)
    assert dict_form[b"peers"] == [{b"ip": b"127.0.0.2", b"peer id": PID, b"port": 1}]


def test_normalize_ip() -> None:
    assert ann.normalize_ip("::ffff:127.0.0.2") == "127.0.0.2"
    assert ann.normalize_ip("fe80::1%eth0") == "fe80::1"


def peer(ip: str, port: int, left: int) -> Peer:
    return Peer(ip, port, PID, left, time.monotonic())


def test_peer_store_orders_and_expires() -> None:
    store = PeerStore(ttl=60, max_peers=10)
    store.announce(IH, peer("127.0.0.2", 1, 5), "started")
    store.announce(IH, peer("127.0.0.3", 1, 0), "completed")
    store.announce(IH, peer("127.0.0.4", 1, 9), "started")
    chosen = store.select(IH, ("127.0.0.2", 1), want=10, seeder=False)
    assert next(p.ip for p in chosen) == "127.0.0.3"  # seeders first, requester excluded
    assert {p.ip for p in chosen} == {"127.0.0.3", "127.0.0.4"}
    assert [p.ip for p in store.select(IH, ("127.0.0.3", 1), want=10, seeder=True)] != []
    assert all(not p.is_seeder for p in store.select(IH, ("127.0.0.3", 1), want=10, seeder=True))
    assert store.stats(IH) == (1, 2, 1)
    # "stopped" removes only the announcer's own entry (keyed by source address)
    store.announce(IH, peer("127.0.0.9", 1, 0), "stopped")
    assert store.stats(IH)[:2] == (1, 2)
    store.announce(IH, peer("127.0.0.4", 1, 9), "stopped")
    assert store.stats(IH)[:2] == (1, 1)
    store.ttl = 0.0
    time.sleep(0.01)
    assert store.expire() == 2 and store.peer_count == 0


def test_peer_store_is_bounded() -> None:
    store = PeerStore(ttl=60, max_peers=3)
    for i in range(10):
        store.announce(IH, peer(f"127.0.1.{i}", 1, 1), "started")
    assert store.peer_count == 3


def test_peer_store_samples_large_swarms_without_stale_or_requester() -> None:
    store = PeerStore(ttl=60, max_peers=10_000)
    for i in range(2_000):
        store.announce(IH, peer(f"127.0.{i // 250}.{i % 250 + 1}", 1, 0 if i % 4 == 0 else 7), "started")
    chosen = store.select(IH, ("127.0.0.1", 1), want=50, seeder=False)
    assert len(chosen) == 50 and len({(p.ip, p.port) for p in chosen}) == 50
    assert all(p.is_seeder for p in chosen)  # 500 seeders: they fill the answer
    assert ("127.0.0.1", 1) not in {(p.ip, p.port) for p in chosen}
    assert all(not p.is_seeder for p in store.select(IH, ("127.0.0.1", 1), want=50, seeder=True))
    # most peers went stale before the expiry loop ran: the answer still holds only live ones
    now = time.monotonic()
    live = {f"127.0.7.{i}" for i in range(1, 11)}
    for swarm_peer in store.select(IH, ("x", 0), want=10_000, seeder=False):
        if swarm_peer.ip not in live:
            swarm_peer.last_seen = now - 120
    chosen = store.select(IH, ("127.0.0.1", 1), want=50, seeder=False)
    assert sorted(p.ip for p in chosen) == sorted(live)


def test_peer_store_moves_a_completed_peer_to_the_seeders() -> None:
    store = PeerStore(ttl=60, max_peers=10)
    store.announce(IH, peer("127.0.0.2", 1, 5), "started")
    store.announce(IH, peer("127.0.0.2", 1, 0), "completed")
    assert store.stats(IH) == (1, 0, 1) and store.peer_count == 1
    store.announce(IH, peer("127.0.0.2", 1, 0), "stopped")
    assert store.stats(IH)[:2] == (0, 0) and store.peer_count == 0


def test_query_parsing_details() -> None:
    """What BEP 3 clients send: empty parts, '+' for space, '=' inside values, latin-1 keys."""
    q = ann.parse_query("&&a=1&&b=x+y&c=k%3D1=2&d&%E9=%FF")
    assert q == {"a": [b"1"], "b": [b"x y"], "c": [b"k=1=2"], "d": [b""], "\xe9": [b"\xff"]}
    assert ann.parse_query("x=1&x=2") == {"x": [b"1", b"2"]}
    ann.parse_query("a=" + "b" * (ann.MAX_QUERY - 2))  # exactly the limit
    with pytest.raises(ann.AnnounceError, match="too long"):
        ann.parse_query("a=" + "b" * (ann.MAX_QUERY - 1))


def test_announce_numbers_at_their_limits() -> None:
    base = f"info_hash={'a' * 20}&peer_id={'b' * 20}"
    assert ann.parse_announce(base + "&port=65535").port == 65535
    with pytest.raises(ann.AnnounceError, match="port out of range"):
        ann.parse_announce(base + "&port=65536")
    big = "1" + "0" * 18  # 19 digits, below 2**63
    assert ann.parse_announce(base + f"&port=1&uploaded={big}").uploaded == int(big)
    with pytest.raises(ann.AnnounceError, match="uploaded must be a non-negative integer"):
        ann.parse_announce(base + "&port=1&uploaded=" + "1" * 20)
