"""The announce contract between the tracker and every peer (origin seeder and agents).

A seeder must never drop out of the tracker while it is alive: that turns every later pull of its
blobs into a registry fallback (the soak in issue 10: libtorrent's own `min_announce_interval`
of 300 s silently overrode the tracker's 30 s interval, the tracker forgot peers after 95 s, and
18 % of blob requests fell back). So the timing is decided in one place and the other side
follows by construction:

- the tracker alone chooses the announce `interval`; peers announce exactly at it (libtorrent's
  floor is set below any interval the tracker accepts, and operators cannot raise it);
- an announce takes at most `ANNOUNCE_TIMEOUT` (set as libtorrent's completion timeout, also
  not overridable), so a peer that announces on time is seen again within `interval +
  ANNOUNCE_TIMEOUT`; the tracker refuses a `peer_ttl` below that, and by default keeps a peer
  for three intervals (two lost announces) plus the timeout;
- after a failed announce a peer retries within `RETRY_MAX` (not libtorrent's backoff, which
  grows to an hour), so a restarted tracker hears from every live seeder again within seconds.
"""

from __future__ import annotations

import random

# Longest an announce may take (libtorrent's tracker_completion_timeout).
ANNOUNCE_TIMEOUT = 10
# Longest silence on an announce connection (libtorrent's tracker_receive_timeout).
ANNOUNCE_RECEIVE_TIMEOUT = 5
# The tracker's smallest allowed interval; libtorrent's min_announce_interval is set to it, so
# whatever interval the tracker gives is the one peers use.
MIN_INTERVAL = 1
# Retries after a failed announce: RETRY_MIN, doubling, at most RETRY_MAX, with +-20 % jitter so
# that the torrents of a node (and the nodes of a cluster) do not retry in lockstep.
RETRY_MIN = 5.0
RETRY_MAX = 30.0
RETRY_JITTER = 0.2

# libtorrent settings that make the contract; `torrent.libtorrent` may not override them (the
# reason is the configuration error an operator sees).
RESERVED_SETTINGS = {
    "min_announce_interval": "set by shoal so that peers announce at the tracker's interval; change the "
                             "tracker's interval instead",
    "tracker_completion_timeout": f"set by shoal to {ANNOUNCE_TIMEOUT}s: the tracker's peer_ttl bounds "
                                  "count on it",
    "tracker_receive_timeout": f"set by shoal to {ANNOUNCE_RECEIVE_TIMEOUT}s: the tracker's peer_ttl "
                               "bounds count on it",
}


def libtorrent_settings() -> dict[str, int]:
    """The peer side of the contract, as libtorrent settings."""
    return {
        "min_announce_interval": MIN_INTERVAL,
        "tracker_completion_timeout": ANNOUNCE_TIMEOUT,
        "tracker_receive_timeout": ANNOUNCE_RECEIVE_TIMEOUT,
    }


def min_peer_ttl(interval: float) -> float:
    """The shortest peer_ttl under which a peer announcing on time is never dropped."""
    return int(interval) + ANNOUNCE_TIMEOUT


def default_peer_ttl(interval: float) -> float:
    """Three intervals (a peer survives two lost announces) plus the announce timeout."""
    return 3 * int(interval) + ANNOUNCE_TIMEOUT


def retry_delay(failures_in_row: int, rng: random.Random | None = None) -> int:
    """Seconds until the next attempt after `failures_in_row` failed announces in a row."""
    base = min(RETRY_MIN * (1 << min(max(failures_in_row - 1, 0), 16)), RETRY_MAX)
    jitter = (rng or random).uniform(-RETRY_JITTER, RETRY_JITTER)
    return max(1, round(base * (1 + jitter)))
