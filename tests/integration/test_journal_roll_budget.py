"""A journal filled to its disk budget takes requests again once the collector has everything.

With a roll size at or above max_disk_bytes the active segment reached the budget before it could
roll: every request got 503 "the pull journal is full" for good, with nothing left to ship
(attack20). A roll size left unset fits half the budget, and a larger one is refused at load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from shoal.clients import OriginClient
from shoal_agent import config as agent_config
from shoal_agent.journal import Journal, JournalError
from shoal_agent.shipper import Shipper
from tests.integration.test_journal_shipping import NODE_KEY, collector_server, record

UP = [{"name": "docker.io", "url": "https://registry-1.docker.io"}]


async def test_a_shipped_journal_at_its_budget_takes_new_requests(tmp_path: Path) -> None:
    cfg = agent_config.load({"data_dir": "/tmp/x", "upstreams": UP, "journal": {"max_disk_bytes": "256KiB"}}).journal
    journal = Journal(tmp_path / "journal", max_segment_bytes=cfg.max_segment_bytes, max_disk_bytes=cfg.max_disk_bytes)
    await journal.open()
    written = 0
    full = False
    while not full:  # at the budget: refused
        assert written < 10_000
        try:
            await asyncio.gather(*(journal.record(record(written + i)) for i in range(50)))
        except JournalError:
            full = True
        written += 50
    server, collector = await collector_server(tmp_path, [0])
    async with aiohttp.ClientSession() as http:
        shipper = Shipper(journal, OriginClient(http, f"http://127.0.0.1:{server.port}", "t"), node="n1",
                          key=NODE_KEY, roll_bytes=cfg.roll_size)
        task = asyncio.create_task(shipper.run())
        taken = False
        try:
            async with asyncio.timeout(30):
                while not taken:  # refused until the shipped segment is rolled away, then taken
                    try:
                        await journal.record(record(10**6))
                        taken = True
                    except JournalError:
                        await asyncio.sleep(0.05)
                while shipper.shipped_records < journal.records_written:  # (no batch in flight at close)
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.close()
    await journal.close()
    await collector.close()
    assert shipper.rolls >= 1
    assert cfg.roll_size == 128 << 10
