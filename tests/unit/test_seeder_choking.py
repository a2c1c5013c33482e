"""The origin seeder uploads to a few peers in turn; agents upload to every interested peer.

Serving every peer at once, the seeder sent 2.2-2.9 copies of each piece in a 16-node rollout
(bench/RESULTS.md §17): the peers all ask it for the pieces only it has."""

from __future__ import annotations

import asyncio

from shoal.swarm import (
    AGENT_FINGERPRINT,
    SEEDER_CHOKING,
    SEEDER_FINGERPRINT,
    SEEDER_MAX_SLOTS,
    Swarm,
    SwarmSettings,
    seeder_slots,
)
from tests.support.procs import free_port


def settings(fingerprint: str, **extra: int) -> SwarmSettings:
    return SwarmSettings(listen_ip="127.0.0.1", listen_port=1, fingerprint=fingerprint, extra=dict(extra))


def test_the_seeder_unchokes_four_peers_in_turn() -> None:
    packed = settings(SEEDER_FINGERPRINT).pack()
    assert {k: packed[k] for k in SEEDER_CHOKING} == {"unchoke_slots_limit": 4, "seed_choking_algorithm": 0,
                                                      "unchoke_interval": 3, "seeding_piece_quota": 4,
                                                      "num_optimistic_unchoke_slots": 1}


def test_agents_unchoke_every_peer() -> None:
    packed = settings(AGENT_FINGERPRINT).pack()
    assert packed["unchoke_slots_limit"] == -1 and packed["seed_choking_algorithm"] == 1


def test_an_operator_setting_wins() -> None:
    assert settings(SEEDER_FINGERPRINT, unchoke_slots_limit=8).pack()["unchoke_slots_limit"] == 8
    assert settings(AGENT_FINGERPRINT, seeding_outgoing_connections=True).pack()["seeding_outgoing_connections"]


def test_a_node_with_a_whole_blob_waits_for_peers_to_connect() -> None:
    """An agent's complete torrents make no outgoing connections (a rollout's finishing nodes
    opened TLS connections to every other: bench/RESULTS.md §28); nor does the origin's seeder,
    whom the tracker hands only to the leechers that should use it (origin/firstcopy.py)."""
    assert settings(AGENT_FINGERPRINT).pack()["seeding_outgoing_connections"] is False
    assert settings(SEEDER_FINGERPRINT).pack()["seeding_outgoing_connections"] is False


def test_the_running_seeder_session_has_them() -> None:
    async def run() -> dict[str, object]:
        swarm = Swarm(SwarmSettings("127.0.0.1", free_port("127.0.0.1"), SEEDER_FINGERPRINT))
        await swarm.start()
        try:
            return dict(swarm.session.get_settings())
        finally:
            await swarm.stop()

    live = asyncio.run(run())
    assert live["unchoke_slots_limit"] == 4 and live["seeding_piece_quota"] == 4


def test_the_seeders_slots_follow_the_swarms_being_downloaded() -> None:
    """One per swarm with leechers, four at least (a rollout's single swarm, as measured in
    bench/RESULTS.md §17), and a bound: a node can join every swarm it is admitted to."""
    assert seeder_slots([]) == seeder_slots([0, 0, 9]) == seeder_slots([16, 16, 16, 16]) == 4
    assert seeder_slots([1, 2, 0, 40, 1, 1, 3]) == 6
    assert seeder_slots([1] * 1000) == SEEDER_MAX_SLOTS == 64
