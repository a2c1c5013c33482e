"""A timeline of a run: every host's NIC bytes and the machine's CPU, sampled from a thread.

Each emulated host's veth has its outer end `shb-<name>` (first 15 characters) in the root
namespace, so its counters are readable from here without entering the namespace (no process per
sample, which at 64 hosts and 2-4 samples a second would cost the CPU being measured). On that
outer end rx_bytes is what the host SENT and tx_bytes what it RECEIVED. The counters include the
Ethernet/IP/TCP headers and the BitTorrent/TLS framing, so they read a little above payload.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.netns import PREFIX

LOW_IDLE = 20.0  # percent: below this the machine, not the emulated links, sets the pace


def cpu_jiffies() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def _counter(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):  # a host torn down under us reads as nothing more sent
        return 0


@dataclass
class Timeline:
    """Cumulative counters per sample (differences give rates), times relative to `t0` (epoch)."""

    t0: float
    interval: float
    t: list[float] = field(default_factory=list)
    cpu_idle: list[int] = field(default_factory=list)  # cumulative idle + iowait jiffies
    cpu_total: list[int] = field(default_factory=list)
    sent: dict[str, list[int]] = field(default_factory=dict)  # host -> cumulative bytes sent
    received: dict[str, list[int]] = field(default_factory=dict)

    def _idle(self, first: int, last: int) -> float:
        """CPU idle (percent) between samples `first` and `last`."""
        return 100 * (self.cpu_idle[last] - self.cpu_idle[first]) / max(self.cpu_total[last] - self.cpu_total[first], 1)

    def idle_percent(self) -> float:
        """CPU idle over the whole timeline."""
        return round(self._idle(0, len(self.t) - 1), 1) if len(self.t) >= 2 else -1.0

    def idle_between(self, start: float, end: float) -> float:
        """CPU idle from the last sample at or before `start` to the first at or after `end`
        (epoch seconds; one interval at least), -1 without two samples."""
        if len(self.t) < 2:
            return -1.0
        first = max(bisect.bisect_right(self.t, start - self.t0) - 1, 0)
        last = min(max(bisect.bisect_left(self.t, end - self.t0), first + 1), len(self.t) - 1)
        return round(self._idle(min(first, last - 1), last), 1)

    def idle_per_second(self) -> list[float]:
        """CPU idle of consecutive one-second windows (as `vmstat 1` prints it)."""
        out: list[float] = []
        start = 0
        for i in range(1, len(self.t)):
            if self.t[i] - self.t[start] >= 1.0 - self.interval / 4:
                out.append(self._idle(start, i))
                start = i
        return out

    def low_idle_share(self) -> float:
        """Share of one-second windows with under LOW_IDLE % idle."""
        seconds = self.idle_per_second()
        return round(sum(1 for s in seconds if s < LOW_IDLE) / len(seconds), 3) if seconds else 0.0

    def delta(self, host: str) -> tuple[int, int]:
        """(sent, received) bytes of `host` from the first sample to the last."""
        s, r = self.sent.get(host, [0]), self.received.get(host, [0])
        return s[-1] - s[0], r[-1] - r[0]

    def to_json(self) -> dict[str, Any]:
        return {"t0": self.t0, "interval": self.interval, "t": self.t, "cpu_idle": self.cpu_idle,
                "cpu_total": self.cpu_total, "sent": self.sent, "received": self.received}


class Sampler:
    """Samples `hosts` (host names of a bench Topology) every `interval` seconds until stopped."""

    def __init__(self, hosts: list[str], interval: float = 0.5) -> None:
        self.paths = {h: (Path(f"/sys/class/net/{(PREFIX + h)[:15]}/statistics/rx_bytes"),
                          Path(f"/sys/class/net/{(PREFIX + h)[:15]}/statistics/tx_bytes")) for h in hosts}
        self.timeline = Timeline(time.time(), interval, sent={h: [] for h in hosts},
                                 received={h: [] for h in hosts})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        tl = self.timeline
        idle, total = cpu_jiffies()
        tl.t.append(round(time.time() - tl.t0, 3))
        tl.cpu_idle.append(idle)
        tl.cpu_total.append(total)
        for host, (rx, tx) in self.paths.items():
            tl.sent[host].append(_counter(rx))
            tl.received[host].append(_counter(tx))

    def _loop(self) -> None:
        # Event.wait is the clock: it returns at once when stopped, so a run ends without waiting
        # out a period. Samples keep their real times, so a late one does not skew the rates.
        while not self._stop.wait(self.timeline.interval):
            self.sample()
