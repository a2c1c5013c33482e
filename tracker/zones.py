"""Zones: which peers a node is handed when nodes state their zones (one policy, both stores).

A node states its zone (the agent's `zone`, a node label in the chart) in its announces. The
goal: a zone takes each blob across its boundary about once, and its nodes pass the pieces on
among themselves (cross-zone links are the slow and the billed ones). So:

- A node is handed its own zone's peers (seeders, then leechers).
- A few of a zone's nodes - at most `zone_gateways`, one slot per node (the node its swarm token
  names: one node cannot take every slot of a zone with several ports), the first leechers to
  ask while the zone has fewer live ones - are its gateways: they are also handed peers on the
  boundary of other zones, the boundary's seeders first (`reserved` places), so that a busy zone
  cannot fill a gateway's answer and leave it no way across. So is a node whose zone has no
  other live peer yet (it then becomes a gateway).
- On the boundary are the peers without a zone (the origin's seeders) and every zone's
  gateways; a node without a zone is handed only these, so the origin's seeder serves the
  gateways, not every node of every zone.
- Where no node states a zone, every peer is on the boundary: answers are as without zones.

Beside zones, the origins' seeders are left out of a leecher's answer once the swarm has
ORIGIN_SPARE seeders of its own on the boundary (tracker/peers.py).

A gateway stays one while it announces (a seeder by then, it serves other zones' gateways); one
that stops or expires is replaced by the next leecher of its zone to announce.
"""

from __future__ import annotations

from shoal import protocol

# Leechers per zone that take pieces across its boundary: two, so that one slow or lost gateway
# does not hold its zone back; each fetches about what the other has not (bench/zones.py).
ZONE_GATEWAYS = 2


def reserved(want: int) -> int:
    """Places of a gateway's answer kept for the boundary's seeders."""
    return min(want, max(4, want // 4))


def valid(zone: str) -> bool:
    return zone == "" or protocol.ZONE_RE.fullmatch(zone) is not None
