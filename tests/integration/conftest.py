"""In-process tests run with a guard that fails a test whose code blocks the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

# A callback or task step holding the loop longer than this is a bug (file I/O, hashing or a
# slow libtorrent call that belongs in a thread).
SLOW_CALLBACK = 0.25


@pytest.fixture(autouse=True)
async def loop_guard(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    slow = [r.getMessage() for r in records if r.name == "asyncio" and " took " in r.getMessage()]
    assert not slow, f"the event loop was blocked: {slow}"
