"""Process footprint: RSS and CPU time from /proc, and the peak RSS while something runs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stats(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds: user + system) of a running process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / CLK_TCK


class PeakRss:
    """`with PeakRss([pid, ...]) as peak:` samples every 0.1 s; `peak.bytes` is the largest RSS
    any one of the processes had."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max([self.bytes, *(proc_stats(pid)[0] for pid in self.pids)])
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
