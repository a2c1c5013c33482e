"""Socket addresses as shoal writes them (journals, audit records, logs) and keys them (limits).

IPv6 and dual stack: a `[::]` listener takes IPv4 clients as IPv4-mapped IPv6 addresses
(`::ffff:192.0.2.7`); those are the IPv4 clients they map, so that one client has one spelling
whichever socket it came through. IPv6 addresses are written in brackets before a port
(`[2001:db8::7]:5050`), as URLs and `listen` take them; `::1:5050` would be ambiguous.
"""

from __future__ import annotations

import ipaddress
from typing import Any

# An IPv6 host usually holds a whole /64 (SLAAC, privacy addresses, a delegated prefix), so a
# limit per single IPv6 address is one that host can step around by changing its address.
IPV6_LIMIT_PREFIX = 64


def unmapped(host: str) -> str:
    """`host` as shoal records it: an IPv4-mapped IPv6 address is its IPv4 address; a zone
    index (`fe80::1%eth0`) is dropped; anything that is not an IP address is returned as is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def hostport(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(peername: Any) -> str | None:
    """A transport's `peername` (2-tuple for IPv4, 4-tuple for IPv6) as `host:port`, unmapped;
    None when there is none (a closed transport, a Unix socket)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        if len(peername) == 2:  # AF_INET: the kernel's dotted quad, nothing to unmap (a parse per request)
            return f"{peername[0]}:{peername[1]}"
        return hostport(unmapped(str(peername[0])), int(peername[1]))
    return None


def limit_key(host: str | None) -> str:
    """The key a per-address limit counts under: an IPv4 address (mapped or not) as itself, an
    IPv6 address as its /64 (one host, one budget)."""
    if not host:
        return ""
    address = unmapped(host)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_LIMIT_PREFIX}", strict=False))
    return address
