"""A budget of events per key and minute (a fixed window): how often one node, or one address,
may make the origin ask the registry something its caches cannot answer."""

from __future__ import annotations

import time

MAX_KEYS = 100_000


class MinuteBudget:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (start of its minute, events in it)

    def take(self, key: str, limit: int) -> bool:
        """Count one event for `key`; False (not counted) if it already had `limit` this minute."""
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= limit:
            return False
        self._windows.pop(key, None)
        self._windows[key] = (start, count + 1)  # (re-inserted: the oldest key is the stalest)
        if len(self._windows) > MAX_KEYS:
            self._windows.pop(next(iter(self._windows)))
        return True
