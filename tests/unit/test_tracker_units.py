from __future__ import annotations

import time
from urllib.parse import quote_from_bytes

import pytest

from shoal import bencode
from shoal_tracker import announce as ann
from shoal_tracker.peers import ORIGIN_SPARE, Peer, PeerStore

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


def test_peer_store_orders_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shoal_tracker.peers.time.monotonic", lambda: clock[0])
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
    clock[0] += 0.01  # the clock moves on; nothing sleeps
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


def refusal(raw_query: str) -> str:
    """The `failure reason` a client reads for this announce (the exact text is the product)."""
    with pytest.raises(ann.AnnounceError) as exc:
        ann.parse_announce(raw_query)
    return str(exc.value)


def test_announce_refusals_are_exact() -> None:
    base = f"info_hash={'a' * 20}&peer_id={'b' * 20}"
    assert refusal("x=" + "a" * 5000) == "query string too long"
    assert refusal(query(info_hash=b"a" * 21)) == "info_hash must be 20 bytes"
    assert refusal(query(peer_id=b"b" * 19)) == "peer_id must be 20 bytes"
    assert refusal(query(peer_id=b"b" * 21)) == "peer_id must be 20 bytes"
    assert refusal(query(event="Started")) == "unknown event"
    assert refusal(query(token=b"tok\xe9n")) == "token is not ASCII"
    assert refusal(query(info_hash=None)) == "missing info_hash"
    # a missing port is a refusal like any other (never an assertion, never a default port)
    assert refusal(base) == "missing port"
    assert refusal(base + "&port=") == "port must be a non-negative integer"
    assert refusal(base + "&port=1&downloaded=x") == "downloaded must be a non-negative integer"
    assert refusal(base + "&port=1&numwant=-1") == "numwant must be a non-negative integer"


def test_numwant_is_bounded() -> None:
    assert ann.parse_announce(query(numwant=100000)).numwant == 100000
    assert ann.parse_announce(query(numwant=0)).numwant == 0
    assert ann.parse_announce(query()).numwant is None
    assert refusal(query(numwant=100001)) == "numwant out of range"
    assert refusal(query(numwant=2**62)) == "numwant out of range"


def test_announce_fields_and_their_defaults() -> None:
    base = f"info_hash={'a' * 20}&peer_id={'b' * 20}&port=1"
    a = ann.parse_announce(base)
    assert (a.uploaded, a.downloaded, a.left, a.event) == (0, 0, 0, "")
    assert a.compact is True and a.no_peer_id is False and a.token is None and a.numwant is None
    a = ann.parse_announce(base + "&uploaded=5&downloaded=7&left=9&no_peer_id=1&compact=0&token=t.k")
    assert (a.uploaded, a.downloaded, a.left) == (5, 7, 9)
    assert a.no_peer_id is True and a.compact is False and a.token == "t.k"
    assert ann.parse_announce(base + "&no_peer_id=0").no_peer_id is False
    assert ann.parse_announce(base + "&no_peer_id=yes").no_peer_id is False
    assert ann.parse_announce(base + "&compact=1").compact is True
    # ip= cannot move the peer anywhere: it is not even part of the parsed announce
    assert "ip" not in ann.Announce.__slots__
    assert ann.parse_announce(base + "&ip=10.0.0.1&ipv4=10.0.0.2&ipv6=%3A%3A1") == ann.parse_announce(base)


def test_query_keys_decode_plus_as_space() -> None:
    assert ann.parse_query("a+b=c+d&%2B=%2B") == {"a b": [b"c d"], "+": [b"+"]}


def test_scrape_parsing() -> None:
    other = bytes(range(20))
    assert ann.parse_scrape("") == []
    assert ann.parse_scrape(f"info_hash={quote_from_bytes(IH)}&info_hash={quote_from_bytes(other)}") == [IH, other]
    at_limit = "&".join(f"info_hash={quote_from_bytes(bytes([i]) * 20)}" for i in range(ann.MAX_SCRAPE_HASHES))
    assert len(ann.parse_scrape(at_limit)) == ann.MAX_SCRAPE_HASHES
    with pytest.raises(ann.AnnounceError) as exc:
        ann.parse_scrape(at_limit + "&info_hash=" + "z" * 20)
    assert str(exc.value) == "at most 64 info_hash values per scrape"
    for bad in (b"short", IH + b"x"):
        with pytest.raises(ann.AnnounceError) as exc:
            ann.parse_scrape(f"info_hash={quote_from_bytes(IH)}&info_hash={quote_from_bytes(bad)}")
        assert str(exc.value) == "info_hash must be 20 bytes"


def test_normalize_ip_drops_the_whole_zone() -> None:
    assert ann.normalize_ip("fe80::1%a%b") == "fe80::1"
    assert ann.normalize_ip("10.0.0.1") == "10.0.0.1"


def test_failure_and_scrape_documents() -> None:
    assert bencode.decode(ann.failure("unknown event")) == {b"failure reason": b"unknown event"}
    assert bencode.decode(ann.scrape_response({IH: (3, 4, 5)})) == {
        b"files": {IH: {b"complete": 3, b"incomplete": 4, b"downloaded": 5}}}
    assert bencode.decode(ann.scrape_response({})) == {b"files": {}}


def test_announce_answer_fields_and_high_ports() -> None:
    peers = [("127.0.0.2", 60000, PID), ("::1", 65535, PID), ("127.0.0.3", 40000, PID), ("::2", 1, PID)]
    doc = bencode.decode(ann.announce_response(peers, compact=True, no_peer_id=False, interval=30,
                                               min_interval=5, complete=2, incomplete=7))
    assert doc == {
        b"interval": 30, b"min interval": 5, b"complete": 2, b"incomplete": 7,
        b"peers": bytes([127, 0, 0, 2]) + (60000).to_bytes(2, "big") + bytes([127, 0, 0, 3])
        + (40000).to_bytes(2, "big"),
        b"peers6": b"\x00" * 15 + b"\x01" + (65535).to_bytes(2, "big") + b"\x00" * 15 + b"\x02" + b"\x00\x01",
    }
    only_v4 = bencode.decode(ann.announce_response(peers[:1], compact=True, no_peer_id=False, interval=30,
                                                   min_interval=5, complete=0, incomplete=0))
    assert isinstance(only_v4, dict) and b"peers6" not in only_v4
    listed = bencode.decode(ann.announce_response(peers[:1], compact=False, no_peer_id=True, interval=30,
                                                  min_interval=5, complete=0, incomplete=0))
    assert isinstance(listed, dict) and listed[b"peers"] == [{b"ip": b"127.0.0.2", b"port": 60000}]


def test_a_listed_peer_updates_its_entry_in_a_full_swarm() -> None:
    store = PeerStore(ttl=60, max_peers=2)
    store.announce(IH, peer("127.0.0.2", 1, 5), "started")
    store.announce(IH, peer("127.0.0.3", 1, 5), "started")
    store.announce(IH, peer("127.0.0.4", 1, 5), "started")  # full: not listed
    assert store.stats(IH) == (0, 2, 0)
    # a listed leecher that finished moves to the seeders although the swarm is full
    store.announce(IH, peer("127.0.0.2", 1, 0), "completed")
    assert store.stats(IH) == (1, 1, 1)
    # a listed seeder refreshes its entry in a full swarm too
    fresh = peer("127.0.0.2", 1, 0)
    store.announce(IH, fresh, "")
    assert store.select(IH, ("127.0.0.3", 1), want=5, seeder=False) == [fresh]


def test_completed_counts_each_download_once() -> None:
    store = PeerStore(ttl=60, max_peers=10)
    store.announce(IH, peer("127.0.0.2", 1, 0), "completed")
    store.announce(IH, peer("127.0.0.2", 1, 0), "completed")  # a seeder saying it again: no new download
    assert store.stats(IH) == (1, 0, 1)
    store.announce(IH, peer("127.0.0.3", 1, 4), "started")
    store.announce(IH, peer("127.0.0.3", 1, 0), "completed")
    assert store.stats(IH) == (2, 0, 2)


def test_select_never_returns_the_requester_and_honours_small_wants() -> None:
    store = PeerStore(ttl=60, max_peers=10)
    store.announce(IH, peer("127.0.0.2", 1, 0), "started")
    store.announce(IH, peer("127.0.0.3", 1, 0), "started")
    store.announce(IH, peer("127.0.0.4", 1, 3), "started")
    chosen = store.select(IH, ("127.0.0.2", 1), want=10, seeder=False)
    assert sorted(p.ip for p in chosen) == ["127.0.0.3", "127.0.0.4"]
    one = store.select(IH, ("127.0.0.9", 1), want=1, seeder=False)
    assert len(one) == 1 and one[0].is_seeder
    assert len(store.select(IH, ("127.0.0.9", 1), want=1, seeder=True)) == 1
    assert store.select(IH, ("127.0.0.9", 1), want=0, seeder=False) == []
    assert store.select(b"x" * 20, ("127.0.0.9", 1), want=5, seeder=False) == []


def test_a_peer_is_live_for_exactly_ttl_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shoal_tracker.peers.time.monotonic", lambda: clock[0])
    # sampling is random; here it takes the first values, so the stale peers fill the sample and
    # the answer has to come from the scan of the whole group
    monkeypatch.setattr("shoal_tracker.peers.random.sample", lambda values, k: list(values)[:k])
    store = PeerStore(ttl=60, max_peers=10)
    for i in range(3):
        store.announce(IH, Peer(f"127.0.0.{i + 10}", 1, PID, 0, 900.0), "started")  # long stale
    edge = Peer("127.0.0.2", 1, PID, 0, 940.0)  # exactly ttl old
    store.announce(IH, edge, "started")
    assert store.select(IH, ("x", 0), want=1, seeder=True) == []  # no leechers
    assert store.select(IH, ("x", 0), want=1, seeder=False) == [edge]  # from the scan
    assert store.select(IH, ("x", 0), want=4, seeder=False) == [edge]  # from the sample
    assert store.expire() == 3
    assert store.stats(IH) == (1, 0, 0)
    clock[0] += 0.5
    assert store.expire() == 1 and store.swarm_count == 0


def test_expire_counts_every_swarm_and_keeps_what_it_must(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shoal_tracker.peers.time.monotonic", lambda: clock[0])
    store = PeerStore(ttl=60, max_peers=10)
    ih2, ih3 = b"2" * 20, b"3" * 20
    store.announce(IH, Peer("127.0.0.2", 1, PID, 5, 900.0), "started")  # stale
    store.announce(ih2, Peer("127.0.0.3", 1, PID, 5, 900.0), "started")  # stale
    store.announce(ih2, Peer("127.0.0.4", 1, PID, 0, 900.0), "completed")  # stale, downloaded 1
    store.announce(ih3, Peer("127.0.0.5", 1, PID, 5, 999.0), "started")  # live, nothing downloaded
    assert store.expire() == 3
    # the emptied swarm with no downloads is gone; the one with a download count keeps it; the live one stays
    assert store.swarm_count == 2 and store.peer_count == 1
    assert store.stats(IH) == (0, 0, 0) and store.stats(ih2) == (0, 0, 1) and store.stats(ih3) == (0, 1, 0)


def test_stats_of_an_unknown_swarm_and_forget() -> None:
    store = PeerStore(ttl=60, max_peers=10)
    assert store.stats(IH) == (0, 0, 0)
    store.announce(IH, peer("127.0.0.2", 1, 0), "completed")
    store.announce(b"o" * 20, peer("127.0.0.2", 1, 3), "started")
    store.forget(IH)
    store.forget(b"n" * 20)  # unknown: nothing to do
    assert store.stats(IH) == (0, 0, 0) and store.swarm_count == 1 and store.peer_count == 1


def test_one_address_cannot_fill_a_swarm() -> None:
    """5,000 announces from one host with as many ports filled max_peers_per_torrent with fake
    peers; a fresh agent got 50 of them and fell back to the registry."""
    store = PeerStore(ttl=60, max_peers=5000, max_per_address=8)
    store.announce(IH, peer("127.0.0.2", 7000, 0), "started")  # a real seeder elsewhere
    for port in range(10_000, 15_000):
        store.announce(IH, peer("127.0.0.66", port, 0), "started")
    assert store.peer_count == 1 + 8
    # the address keeps its newest entries (a restarted node's new port is listed)
    assert {p.port for p in store.select(IH, ("127.0.0.9", 1), want=50, seeder=False)
            if p.ip == "127.0.0.66"} == set(range(14_992, 15_000))
    assert any(p.ip == "127.0.0.2" for p in store.select(IH, ("127.0.0.9", 1), want=50, seeder=False))
    # removing and expiring keep the per-address index exact: the address gets its slots back
    for port in range(14_992, 14_996):
        store.announce(IH, peer("127.0.0.66", port, 0), "stopped")
    store.announce(IH, peer("127.0.0.66", 20_000, 0), "started")
    assert store.peer_count == 1 + 5
    assert store._swarms[IH].by_address["127.0.0.66"] == dict.fromkeys(
        [("127.0.0.66", p) for p in (*range(14_996, 15_000), 20_000)])


def test_the_per_address_cap_is_eight_by_default_and_counts_only_new_entries() -> None:
    store = PeerStore(ttl=60, max_peers=100)
    for port in range(1, 10):
        store.announce(IH, peer("127.0.0.66", port, 3), "started")
    listed = {p.port for p in store.select(IH, ("x", 0), want=50, seeder=False)}
    assert listed == set(range(2, 10))  # the ninth pushed out the first
    # an entry already listed re-announces (or completes) at the cap: nothing is pushed out
    store.announce(IH, peer("127.0.0.66", 2, 3), "")
    store.announce(IH, peer("127.0.0.66", 5, 0), "completed")
    assert {p.port for p in store.select(IH, ("x", 0), want=50, seeder=False)} == listed
    assert store.stats(IH) == (1, 7, 1)
    # other addresses have their own cap, in this swarm and others
    store.announce(IH, peer("127.0.0.67", 1, 3), "started")
    store.announce(b"o" * 20, peer("127.0.0.66", 1, 3), "started")
    assert store.peer_count == 8 + 1 + 1


def test_the_per_address_index_follows_removal_and_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("shoal_tracker.peers.time.monotonic", lambda: clock[0])
    store = PeerStore(ttl=60, max_peers=100, max_per_address=2)
    store.announce(IH, Peer("127.0.0.66", 1, PID, 3, 900.0), "started")  # stale
    store.announce(IH, Peer("127.0.0.66", 2, PID, 3, 1000.0), "started")
    store.announce(IH, Peer("127.0.0.77", 1, PID, 3, 900.0), "started")  # stale, the address's only entry
    store.announce(IH, peer("127.0.0.88", 9, 3), "stopped")  # never listed: nothing to remove
    store.announce(IH, peer("127.0.0.66", 9, 3), "stopped")  # a port of a listed address that is not listed
    swarm = store._swarms[IH]
    assert store.expire() == 2
    assert swarm.by_address == {"127.0.0.66": {("127.0.0.66", 2): None}}  # an address with no entry is dropped
    # the expired entry's slot is free again: a new port does not push out the live one
    store.announce(IH, Peer("127.0.0.66", 3, PID, 3, 1000.0), "started")
    assert sorted(p.port for p in store.select(IH, ("x", 0), want=50, seeder=False)) == [2, 3]
    store.announce(IH, peer("127.0.0.66", 2, 3), "stopped")
    store.announce(IH, peer("127.0.0.66", 3, 3), "stopped")
    assert swarm.by_address == {} and store.peer_count == 0


def test_a_swarm_with_seeders_of_its_own_spares_the_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a rolling update every wave took about a quarter of its bytes from the origin's seeder
    though earlier waves' nodes had the blob: a leecher is not handed the origins' seeders while
    ORIGIN_SPARE seeders of the swarm's own announced within a third of the ttl."""
    clock = [1000.0]
    monkeypatch.setattr("shoal_tracker.peers.time.monotonic", lambda: clock[0])
    store = PeerStore(ttl=60, max_peers=50)

    def at(ip: str, left: int, *, origin: bool = False, port: int = 1, node: str = "") -> Peer:
        return Peer(ip, port, PID, left, clock[0], node=node or ip, origin=origin)

    def handed(ip: str = "127.0.0.99", *, seeder: bool = False, origin: bool = False) -> set[str]:
        return {p.ip for p in store.select(IH, (ip, 1), want=50, seeder=seeder, origin=origin)}

    assert ORIGIN_SPARE == 2
    store.announce(IH, at("127.0.0.1", 0, origin=True), "started")
    store.announce(IH, at("127.0.0.2", 5), "started")
    store.announce(IH, at("127.0.0.3", 0), "completed")
    assert handed() == {"127.0.0.1", "127.0.0.2", "127.0.0.3"}  # one seeder of its own: not enough
    store.announce(IH, at("127.0.0.3", 0, port=2), "completed")  # the same node from another port
    assert "127.0.0.1" in handed()  # one node still: it cannot hide the origin
    store.announce(IH, at("127.0.0.3", 0, port=2), "stopped")
    store.announce(IH, at("127.0.0.4", 0), "completed")
    for _ in range(5):  # random picks: the rule holds every time
        assert handed() == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert handed("127.0.0.1", seeder=True, origin=True) == set()  # nor the origin leechers
    assert handed("127.0.0.3", seeder=True) == {"127.0.0.2"}  # another seeder gets them
    # a seeder that has not announced for a third of the ttl does not count: the origin is back
    clock[0] += 21
    store.announce(IH, at("127.0.0.3", 0), "")
    assert "127.0.0.1" in handed()
    store.announce(IH, at("127.0.0.4", 0), "")
    assert "127.0.0.1" not in handed()
    # nor does one that left
    store.announce(IH, at("127.0.0.4", 0), "stopped")
    assert "127.0.0.1" in handed()
    # origin_spare 0: always handed out
    store.announce(IH, at("127.0.0.4", 0), "completed")
    assert "127.0.0.1" not in handed()
    store.origin_spare = 0
    assert "127.0.0.1" in handed()
    # an origin's leecher entry is never skipped as a seeder (origins seed; the set holds seeders)
    store.announce(IH, at("127.0.0.1", 7, origin=True), "")
    assert not store._swarms[IH].origins
