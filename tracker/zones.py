"""Zones: which peers a node in a zone is handed (one policy for both peer stores).

A node states its zone (the agent's `zone`, a node label in the chart) in its announces. It gets
its own zone's peers first (seeders, then leechers), and other zones' peers (the origin's seeders
have no zone) only to fill what its zone lacks: all of them while its zone has no live peer yet,
at most `cross_zone_peers` once it has one. A zone thus takes a blob across its boundary through a
few connections (about once), and its nodes pass the pieces on among themselves; a node with no
zone is handed peers from everywhere, as before zones existed.
"""

from __future__ import annotations

from shoal import protocol

# Other zones' peers a node is handed while its own zone has live peers: one is the origin's
# seeder in practice, the other a second way in if that one is slow.
CROSS_ZONE_PEERS = 2


def cross_zone_room(want: int, local: int, cross_zone_peers: int) -> int:
    """How many other zones' peers go into an answer that holds `local` of the zone's own."""
    room = want - local
    return min(room, cross_zone_peers) if local else room


def valid(zone: str) -> bool:
    return zone == "" or protocol.ZONE_RE.fullmatch(zone) is not None
