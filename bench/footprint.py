"""The peak RSS of processes while something runs (RSS and CPU time: tests.support.procs)."""

from __future__ import annotations

import threading
from types import TracebackType

from tests.support.procs import proc_stats


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
