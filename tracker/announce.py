"""Announce and scrape: query parsing (binary-safe) and bencoded answers (BEP 3, 7, 23, 48).

`info_hash` and `peer_id` are percent-encoded binary, so the raw query string is decoded with
`unquote_to_bytes`; aiohttp's `request.query` would mangle them as UTF-8.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from shoal import bencode, protocol
from shoal_tracker import zones

EVENTS = frozenset({"", "started", "completed", "stopped", "paused"})
MAX_QUERY = 4096
MAX_SCRAPE_HASHES = 64


class AnnounceError(ValueError):
    """A bad announce or scrape; the message becomes the bencoded `failure reason`."""


def parse_query(raw: str) -> dict[str, list[bytes]]:
    if len(raw) > MAX_QUERY:
        raise AnnounceError("query string too long")
    params: dict[str, list[bytes]] = {}
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        name = unquote_to_bytes(key.replace("+", " ")).decode("latin-1")
        params.setdefault(name, []).append(unquote_to_bytes(value.replace("+", " ")))
    return params


def _one(params: dict[str, list[bytes]], name: str, *, required: bool = True) -> bytes | None:
    values = params.get(name)
    if not values:
        if required:
            raise AnnounceError(f"missing {name}")
        return None
    if len(values) > 1:
        raise AnnounceError(f"{name} given more than once")
    return values[0]


def _int(params: dict[str, list[bytes]], name: str, *, default: int | None = None,
         lo: int = 0, hi: int = 2**63 - 1) -> int:
    raw = _one(params, name, required=default is None)
    if raw is None:
        assert default is not None
        return default
    if not raw.isdigit() or len(raw) > 19:
        raise AnnounceError(f"{name} must be a non-negative integer")
    value = int(raw)
    if not lo <= value <= hi:
        raise AnnounceError(f"{name} out of range")
    return value


@dataclass(frozen=True, slots=True)
class Announce:
    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    event: str
    numwant: int | None
    compact: bool
    no_peer_id: bool
    token: str | None  # the origin-signed swarm token
    zone: str  # the zone the node states ("" for none; tracker/zones.py)
    stalled: bool = False  # a leecher asking for the origins' seeders (protocol.ANNOUNCE_STALLED)
    first_copy: bool = False  # a leecher not to be handed them (protocol.ANNOUNCE_FIRST_COPY)


def parse_announce(raw_query: str) -> Announce:
    params = parse_query(raw_query)
    info_hash = _one(params, "info_hash")
    peer_id = _one(params, "peer_id")
    assert info_hash is not None
    assert peer_id is not None
    if len(info_hash) != 20:
        raise AnnounceError("info_hash must be 20 bytes")
    if len(peer_id) != 20:
        raise AnnounceError("peer_id must be 20 bytes")
    event_raw = _one(params, "event", required=False) or b""
    event = event_raw.decode("latin-1")
    if event not in EVENTS:
        raise AnnounceError("unknown event")
    numwant_raw = _one(params, "numwant", required=False)
    numwant = _int(params, "numwant", hi=100000) if numwant_raw is not None else None
    # `ip=`, `ipv4=`, `ipv6=` are read and ignored on purpose: the source address is the peer.
    return Announce(
        info_hash=info_hash,
        peer_id=peer_id,
        port=_int(params, "port", lo=1, hi=65535),
        uploaded=_int(params, "uploaded", default=0),
        downloaded=_int(params, "downloaded", default=0),
        left=_int(params, "left", default=0),
        event=event,
        numwant=numwant,
        compact=(_one(params, "compact", required=False) or b"1") != b"0",
        no_peer_id=(_one(params, "no_peer_id", required=False) or b"0") == b"1",
        token=_text(_one(params, "token", required=False)),
        zone=_zone(_one(params, "zone", required=False)),
        stalled=_one(params, protocol.ANNOUNCE_STALLED, required=False) == b"1",
        first_copy=_one(params, protocol.ANNOUNCE_FIRST_COPY, required=False) == b"1",
    )


def _zone(raw: bytes | None) -> str:
    zone = (raw or b"").decode("latin-1")
    if not zones.valid(zone):
        raise AnnounceError("zone must be a label value (letters, digits, '-', '_', '.'; at most 63)")
    return zone


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise AnnounceError("token is not ASCII") from None


def parse_scrape(raw_query: str) -> list[bytes]:
    params = parse_query(raw_query)
    hashes = params.get("info_hash", [])
    if len(hashes) > MAX_SCRAPE_HASHES:
        raise AnnounceError(f"at most {MAX_SCRAPE_HASHES} info_hash values per scrape")
    for h in hashes:
        if len(h) != 20:
            raise AnnounceError("info_hash must be 20 bytes")
    return hashes


def normalize_ip(address: str) -> str:
    """An IPv4-mapped IPv6 source is the IPv4 peer it maps."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def failure(reason: str) -> bytes:
    return bencode.encode({b"failure reason": reason.encode()})


def announce_response(
    peers: list[tuple[str, int, bytes]], *, compact: bool, no_peer_id: bool, interval: int,
    min_interval: int, complete: int, incomplete: int,
) -> bytes:
    doc: dict[bytes, bencode.Value] = {
        b"interval": interval,
        b"min interval": min_interval,
        b"complete": complete,
        b"incomplete": incomplete,
    }
    if compact:
        v4 = bytearray()
        v6 = bytearray()
        for ip, port, _pid in peers:
            if ":" in ip:
                v6 += socket.inet_pton(socket.AF_INET6, ip) + struct.pack("!H", port)
            else:
                v4 += socket.inet_aton(ip) + struct.pack("!H", port)
        doc[b"peers"] = bytes(v4)
        if v6:
            doc[b"peers6"] = bytes(v6)
    else:
        plist: list[bencode.Value] = []
        for ip, port, pid in peers:
            entry: dict[bytes, bencode.Value] = {b"ip": ip.encode(), b"port": port}
            if not no_peer_id:
                entry[b"peer id"] = pid
            plist.append(entry)
        doc[b"peers"] = plist
    return bencode.encode(doc)


def scrape_response(files: dict[bytes, tuple[int, int, int]]) -> bytes:
    return bencode.encode(
        {
            b"files": {
                h: {b"complete": c, b"incomplete": i, b"downloaded": d} for h, (c, i, d) in files.items()
            }
        }
    )
