"""The seeder's guard against peers that hold an upload slot and do not read (shoal/slowpeers.py).

The integration test (tests/integration/test_seeder_slots.py) shows the guard freeing real
libtorrent slots; these pin its rules: who is dropped, when, for how long, and what it remembers."""

from __future__ import annotations

from shoal import slowpeers
from shoal.slowpeers import PeerSample, SlowPeerGuard

WINDOW, FLOOR, KICK, BAN, BAN_MAX = 10.0, 1000, 5.0, 60.0, 400.0


def guard() -> SlowPeerGuard:
    return SlowPeerGuard(window=WINDOW, floor=FLOOR, kick=KICK, ban=BAN, ban_max=BAN_MAX, spare=["10.9.9.9"])


def holder(uploaded: int, ip: str = "10.0.0.1", swarm: str = "a", holds: bool = True, received: int = 0
           ) -> PeerSample:
    return PeerSample(swarm, (ip, 6881), unchoked=holds, interested=True, uploaded=uploaded, received=received)


def waiter(ip: str, swarm: str = "a") -> PeerSample:
    return PeerSample(swarm, (ip, 6881), unchoked=False, interested=True, uploaded=0)


def slow(ip: str = "10.0.0.1") -> list[tuple[str, str]]:
    return [(ip, "slow")]


def test_a_holder_under_the_floor_is_banned_after_a_whole_window_while_others_wait() -> None:
    g = guard()
    assert g.observe([holder(0)], 0.0, waiting=1) == []
    # not yet a whole window
    assert g.observe([holder(100)], WINDOW - 1, waiting=1) == []
    assert g.observe([holder(200)], WINDOW, waiting=1) == slow()
    assert g.dropped == 1
    # the first time, a kick: refused long enough to close its connections
    assert g.is_banned("10.0.0.1", WINDOW + KICK - 1)
    assert not g.is_banned("10.0.0.1", WINDOW + KICK)
    assert g.banned(WINDOW + 1) == ["10.0.0.1"]
    assert g.ban_length("10.0.0.1", WINDOW + 1) == KICK - 1


def test_a_slow_holder_keeps_its_slot_while_nobody_waits_and_goes_at_the_first_look_someone_does() -> None:
    g = guard()
    g.observe([holder(0)], 0.0, waiting=0)
    assert g.observe([holder(10)], WINDOW, waiting=0) == []
    assert g.observe([holder(20)], 2 * WINDOW, waiting=0) == []
    # its last window counts: no new one is needed once someone waits
    assert g.observe([holder(30)], 2 * WINDOW + 1, waiting=1) == slow()


def test_the_window_slides_a_burst_long_ago_does_not_keep_a_slot() -> None:
    g = guard()
    burst = int(100 * FLOOR * WINDOW)
    for t, sent in [(0.0, 0), (WINDOW / 2, burst), (WINDOW, burst)]:
        assert g.observe([holder(sent)], t, waiting=1) == []  # (the burst: fast over the first window)
    # nothing since the burst: over the last window, 0 bytes a second
    assert g.observe([holder(burst)], 3 * WINDOW / 2, waiting=1) == slow()


def test_no_more_holders_are_dropped_than_peers_wait_the_slowest_first() -> None:
    g = guard()
    rates = {"10.0.0.1": 500, "10.0.0.2": 100, "10.0.0.3": 300}  # all under the floor (1000)
    g.observe([holder(0, ip) for ip in rates], 0.0, waiting=2)
    samples = [holder(int(rate * WINDOW), ip) for ip, rate in rates.items()]
    assert g.observe(samples, WINDOW, waiting=2) == slow("10.0.0.2") + slow("10.0.0.3")
    # an address holding slots in several swarms frees them all: one waiter, one address
    g = guard()
    samples = [holder(0, "10.0.0.1", swarm) for swarm in "ab"] + [holder(0, "10.0.0.2")]
    g.observe(samples, 0.0, waiting=2)
    assert len(g.observe(samples, WINDOW, waiting=2)) == 1


def test_after_a_drop_no_slow_holder_goes_until_the_slots_have_settled() -> None:
    """The session's counters lag (read every 2 s, the choker runs every 3 s): right after a
    drop they still show the waiter that the freed slot is about to take."""
    g = SlowPeerGuard(window=WINDOW, floor=FLOOR, settle=8.0)
    g.observe([holder(0, "10.0.0.1"), holder(0, "10.0.0.2")], 0.0, waiting=1)
    assert g.observe([holder(0, "10.0.0.1"), holder(1, "10.0.0.2")], WINDOW, waiting=1) == slow("10.0.0.1")
    assert g.observe([holder(1, "10.0.0.2")], WINDOW + 7.9, waiting=1) == []
    assert g.observe([holder(1, "10.0.0.2")], WINDOW + 8, waiting=1) == slow("10.0.0.2")


def test_a_holder_reading_at_the_floor_is_never_banned() -> None:
    g = guard()
    for step in range(20):
        t = step * WINDOW / 2
        assert g.observe([holder(int(t * FLOOR))], t, waiting=1) == []
    assert g.dropped == 0 and g.banned(100.0) == []


def test_being_choked_or_leaving_ends_the_watch() -> None:
    g = guard()
    g.observe([holder(0)], 0.0, waiting=1)
    g.observe([holder(0, holds=False)], WINDOW / 2, waiting=1)  # choked: turn over
    g.observe([holder(0)], WINDOW / 2 + 1, waiting=1)  # unchoked again: a new window
    assert g.observe([holder(0)], WINDOW, waiting=1) == []
    g.observe([], WINDOW + 1, waiting=1)  # disconnected
    g.observe([holder(0)], WINDOW + 2, waiting=1)
    assert g.observe([holder(0)], 2 * WINDOW + 1, waiting=1) == []
    assert g.observe([holder(0)], 2 * WINDOW + 2, waiting=1) == slow()


def test_a_counter_that_went_backwards_is_a_new_connection() -> None:
    g = guard()
    g.observe([holder(50_000)], 0.0, waiting=1)
    # the same address and port reconnected: its counter starts at 0, which is not slowness
    assert g.observe([holder(10)], WINDOW, waiting=1) == []
    assert g.observe([holder(20)], 2 * WINDOW, waiting=1) == slow()


def test_an_upload_rate_limit_lowers_the_floor_to_a_quarter_of_a_slot_share() -> None:
    g = guard()
    share = 2000.0  # the operator's limit over the slots: FLOOR would drop peers reading 600/s
    g.observe([holder(0)], 0.0, waiting=1, slot_share=share)
    assert g.observe([holder(int(WINDOW * 600))], WINDOW, waiting=1, slot_share=share) == []
    assert g.observe([holder(int(WINDOW * 600) + 100)], 2 * WINDOW, waiting=1, slot_share=share) == slow()
    assert g.floor_for(share) == share / slowpeers.SHARE
    assert g.floor_for(1e9) == FLOOR  # a generous limit never raises it


def drop(g: SlowPeerGuard, ip: str, at: float) -> None:
    g.observe([holder(0, ip)], at, waiting=1)
    assert g.observe([holder(0, ip)], at + WINDOW, waiting=1) == slow(ip)


def test_each_repeat_doubles_the_ban_up_to_its_cap_and_a_long_good_spell_forgets() -> None:
    g = guard()
    t = 0.0
    lengths = []
    for _ in range(5):
        drop(g, "10.0.0.1", t)
        start = t + WINDOW
        until = start
        while g.is_banned("10.0.0.1", until):
            until += 1.0
        lengths.append(until - start)
        t = until
    assert lengths == [KICK, BAN, 2 * BAN, 4 * BAN, BAN_MAX]
    # ban_max after its last ban ended, the address starts afresh: a kick again
    assert g.banned(t + BAN_MAX) == []
    drop(g, "10.0.0.1", t + BAN_MAX)
    assert g.is_banned("10.0.0.1", t + BAN_MAX + WINDOW + KICK - 1)
    assert not g.is_banned("10.0.0.1", t + BAN_MAX + WINDOW + KICK)


def test_one_ban_per_address_however_many_swarms_it_holds_slots_in() -> None:
    g = guard()
    samples = [holder(0, "10.0.0.1", swarm) for swarm in "abc"] + [holder(0, "10.0.0.2", "a")]
    g.observe(samples, 0.0, waiting=4)
    assert sorted(g.observe(samples, WINDOW, waiting=4)) == slow("10.0.0.1") + slow("10.0.0.2")
    assert g.dropped == 2
    assert g.banned(WINDOW) == ["10.0.0.1", "10.0.0.2"]


def test_ipv6_addresses_are_banned_as_written() -> None:
    g = guard()
    drop(g, "fd00::7", 0.0)
    assert g.banned(WINDOW) == ["fd00::7"]


def test_what_it_remembers_is_bounded() -> None:
    g = guard()
    n = slowpeers.MAX_REMEMBERED + 10
    samples = [holder(0, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(n)]
    g.observe(samples, 0.0, waiting=n)
    assert len(g.observe(samples, WINDOW, waiting=n)) == n
    assert len(g.banned(WINDOW)) == slowpeers.MAX_REMEMBERED
    # the oldest were forgotten, the latest kept
    assert not g.is_banned("10.0.0.0", WINDOW)
    assert g.is_banned(samples[-1].address[0], WINDOW)
    # and the connections it watches are the ones it was last shown
    g.observe([], WINDOW + 1, waiting=1)
    assert g._watched == {}


def test_past_the_bound_an_address_whose_ban_ended_is_forgotten_before_a_banned_one() -> None:
    g = guard()
    # the oldest: banned for the longest; then one kicked, whose kick ends first
    assert g.observe([holder(0, "10.255.0.1", received=1)], 0.0, waiting=0) == [("10.255.0.1", "sent pieces")]
    drop(g, "10.255.0.2", 0.0)
    t = WINDOW + KICK
    samples = [holder(0, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(slowpeers.MAX_REMEMBERED - 1)]
    g.observe(samples, t, waiting=len(samples))
    assert len(g.observe(samples, t + WINDOW, waiting=len(samples))) == slowpeers.MAX_REMEMBERED - 1
    # the kicked one was forgotten, not the one still banned
    assert g.is_banned("10.255.0.1", t + WINDOW)
    assert len(g.banned(t + WINDOW)) == slowpeers.MAX_REMEMBERED
    drop(g, "10.255.0.2", t + WINDOW)  # its strike forgotten: a kick again
    assert g.ban_length("10.255.0.2", t + 2 * WINDOW) == KICK


def test_a_peer_that_sends_the_seeder_pieces_is_banned_at_once_for_the_longest() -> None:
    """The seeder never asks for a piece; libtorrent's choker ranks first the peers that sent it
    the most in the last round, so one unasked block a round kept a slot whatever the peer read."""
    g = guard()
    # no window, no contention needed, choked or not, once however many swarms
    samples = [holder(10**9, "10.0.0.3", swarm, received=16384, holds=swarm == "a") for swarm in "ab"]
    assert g.observe(samples, 0.0, waiting=0) == [("10.0.0.3", "sent pieces")]
    assert g.dropped == 1
    assert g.is_banned("10.0.0.3", BAN_MAX - 1) and not g.is_banned("10.0.0.3", BAN_MAX)
    # an honest reader beside it is not touched
    assert g.observe([holder(0, "10.0.0.4"), holder(0, "10.0.0.4", "b")], 1.0, waiting=0) == []


def test_a_holder_is_dropped_for_a_waiter_of_its_own_swarm_once_that_swarm_has_all_its_slots() -> None:
    """The session's slots may be free while a swarm has the most one swarm may have (four):
    then only a holder of that swarm stands in its waiters' way."""
    g = guard()
    full = [holder(0, f"10.0.1.{i}") for i in range(4)]
    for samples, dropped in [
        # a full swarm, nobody waiting in it (someone waits elsewhere): kept
        ([*full, waiter("10.0.2.1", "b")], 0),
        # a swarm under its cap with a waiter: the next choker round lets the waiter in
        ([*full[:3], waiter("10.0.2.1")], 0),
        # a full swarm with a waiter: a slow holder goes (one: one waiter)
        ([*full, waiter("10.0.2.1")], 1),
        ([*full, *(waiter(f"10.0.2.{i}") for i in range(4))], 4),
    ]:
        g = guard()
        g.observe(samples, 0.0, waiting=0, swarm_slots=4)
        assert len(g.observe(samples, WINDOW, waiting=0, swarm_slots=4)) == dropped
    # without a cap per swarm (an operator's fixed unchoke_slots_limit) only the session counts
    g = guard()
    g.observe([*full, waiter("10.0.2.1")], 0.0, waiting=0)
    assert g.observe([*full, waiter("10.0.2.1")], WINDOW, waiting=0) == []


def test_the_seeders_own_address_is_never_banned_but_its_slots_count() -> None:
    """`shoal up` runs an agent at the seeder's address."""
    g = SlowPeerGuard(window=WINDOW, floor=FLOOR, spare=["10.9.9.9", "fd00:0:0::7"])
    g.observe([holder(0, "10.9.9.9"), holder(0, "fd00::7")], 0.0, waiting=1)
    assert g.observe([holder(0, "10.9.9.9", received=1), holder(0, "fd00::7")], WINDOW, waiting=1) == []
    assert g.dropped == 0 and g.banned(WINDOW) == []
    # the agent there holds one of a swarm's four slots: the swarm is full, and a slow
    # holder beside it goes for the peer waiting in it
    samples = [holder(0, "10.9.9.9"), *(holder(0, f"10.0.1.{i}") for i in range(3)), waiter("10.0.2.1")]
    g.observe(samples, WINDOW, waiting=0, swarm_slots=4)
    assert len(g.observe(samples, 2 * WINDOW, waiting=0, swarm_slots=4)) == 1
