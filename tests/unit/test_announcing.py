"""The announce contract: retries after failures stay within shoal's bound, with jitter."""

from __future__ import annotations

import random

from shoal import announcing


def test_retry_delay_doubles_up_to_the_bound_with_jitter() -> None:
    rng = random.Random(1)
    low, high = 1 - announcing.RETRY_JITTER, 1 + announcing.RETRY_JITTER
    for failures, base in ((1, 5), (2, 10), (3, 20), (4, 30), (10, 30), (127, 30)):
        delays = {announcing.retry_delay(failures, rng) for _ in range(200)}
        assert min(delays) >= round(base * low) and max(delays) <= round(base * high), (failures, delays)
        assert len(delays) > 1  # jittered: a node's torrents do not retry in lockstep
    # libtorrent's own backoff after 10 failures would be 5 + 100 x 12.5 s = 21 minutes
    assert announcing.retry_delay(10, rng) <= announcing.RETRY_MAX * high


def test_retry_delay_scales_the_base_by_the_rngs_draw() -> None:
    for failures, base in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 30.0), (9, 30.0)):
        rng, same = random.Random(failures), random.Random(failures)
        draw = same.uniform(-announcing.RETRY_JITTER, announcing.RETRY_JITTER)
        assert announcing.retry_delay(failures, rng) == round(base * (1 + draw)), failures
    assert 4 <= announcing.retry_delay(1) <= 6  # without one, the module's random draws


def test_ttl_bounds() -> None:
    assert announcing.min_peer_ttl(30) == 30 + announcing.ANNOUNCE_TIMEOUT
    assert announcing.default_peer_ttl(30) == 90 + announcing.ANNOUNCE_TIMEOUT
    for interval in (1, 2, 5, 30, 300):
        assert announcing.default_peer_ttl(interval) >= announcing.min_peer_ttl(interval)
