"""Budgets of events per key and minute (a fixed window): how often one node, one address or one
user name may make the origin ask the registry something its caches cannot answer, or write a
refusal into the audit."""

from __future__ import annotations

import time

MAX_KEYS = 100_000


class MinuteBudget:
    def __init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (start of its minute, events in it)

    def used(self, key: str) -> int:
        """Events counted for `key` this minute."""
        start, count = self._windows.get(key, (0.0, 0))
        return count if time.monotonic() - start < 60 else 0

    def add(self, key: str) -> None:
        now = time.monotonic()
        start, count = self._windows.pop(key, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        self._windows[key] = (start, count + 1)  # (re-inserted: the first key is the stalest)
        if len(self._windows) > MAX_KEYS:
            self._windows.pop(next(iter(self._windows)))

    def take(self, key: str, limit: int) -> bool:
        """Count one event for `key`; False (not counted) if it already had `limit` this minute."""
        if self.used(key) >= limit:
            return False
        self.add(key)
        return True
