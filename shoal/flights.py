"""Two patterns every component uses, written once: one computation per key however many
callers want it (single flight), and doubling waits between retries (backoff)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Callers asking for the same key while its computation runs share it. A caller that is
    cancelled (a client hanging up) does not cancel the computation for the others, and an
    outcome nobody waits for any more is consumed, never reported as "never retrieved"."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def start(self, key: K, work: Callable[[], Awaitable[V]]) -> asyncio.Task[V]:
        """The running computation for `key`, started with `work()` if there is none."""
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        return task

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        return await asyncio.shield(self.start(key, work))

    def _landed(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Backoff:
    """Waits that double from `low` up to `high`; `reset()` after a success."""

    def __init__(self, low: float, high: float) -> None:
        if not 0 < low <= high:
            raise ValueError("backoff needs 0 < low <= high")
        self.low, self.high = low, high
        self._next = low

    def next(self) -> float:
        wait = self._next
        self._next = min(wait * 2, self.high)
        return wait

    def reset(self) -> None:
        self._next = self.low
