"""The single-flight and backoff helpers every component uses."""

from __future__ import annotations

import asyncio
import gc

import pytest

from shoal.flights import Backoff, SingleFlight


async def test_callers_share_one_computation_and_a_hang_up_does_not_cancel_it() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    started = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal started
        started += 1
        await release.wait()
        return 42

    first = asyncio.create_task(flights.run("k", work))
    second = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    assert len(flights) == 1 and "k" in flights
    first.cancel()  # one caller goes away
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == 42
    assert started == 1
    assert len(flights) == 0  # done: the next caller starts afresh
    assert await flights.run("k", work) == 42 and started == 2


async def test_a_failure_nobody_waits_for_is_consumed(caplog: pytest.LogCaptureFixture) -> None:
    flights: SingleFlight[str, int] = SingleFlight()

    async def fail() -> int:
        await asyncio.sleep(0)
        raise ValueError("boom")

    caller = asyncio.create_task(flights.run("k", fail))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    while "k" in flights:
        await asyncio.sleep(0)
    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_cancel_all_stops_what_runs() -> None:
    flights: SingleFlight[int, None] = SingleFlight()
    task = flights.start(1, lambda: asyncio.sleep(3600))
    await flights.cancel_all()
    assert task.cancelled() and len(flights) == 0


def test_backoff_doubles_up_to_its_ceiling_and_resets() -> None:
    b = Backoff(0.25, 2.0)
    assert [b.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.reset()
    assert b.next() == 0.25
    with pytest.raises(ValueError, match="low"):
        Backoff(0, 1)
    fixed = Backoff(1.0, 1.0)  # low == high: a fixed wait
    assert [fixed.next() for _ in range(3)] == [1.0, 1.0, 1.0]
