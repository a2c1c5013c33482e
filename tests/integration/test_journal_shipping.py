"""Journal writer and shipper in process, against a collector that can fail: group-committed
records, rotation, resends deduplicated, torn tails of crashed segments skipped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import audit, protocol, signing
from shoal.clients import OriginClient
from shoal_agent.journal import Journal, JournalError, segments
from shoal_agent.shipper import Shipper
from shoal_origin.collector import Collector
from tests.support.procs import free_port

NODE_KEY = Ed25519PrivateKey.generate()


def record(i: int) -> dict[str, Any]:
    return {"event_id": f"{i:032x}", "phase": "start", "ts": audit.now(), "node": "n1", "status": 200,
            "repository": "private/app", "principal": "alice"}


async def collector_server(tmp_path: Path, failures: list[int]) -> tuple[TestServer, Collector]:
    """The origin's collector behind a handler that fails the first `failures[0]` batches
    after storing them (as if the answer was lost)."""
    collector = Collector(tmp_path / "audit.db")
    await collector.open()

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        signing.verify_batch(NODE_KEY.public_key(), raw, request.headers.get(protocol.NODE_SIGNATURE_HEADER))
        batch = protocol.JournalBatch.from_json(json.loads(raw))
        stored = await collector.store(batch.node, batch.records)
        if failures[0] > 0:
            failures[0] -= 1
            return web.Response(status=502)  # stored, but the agent never hears so
        return web.json_response(protocol.JournalAck(stored.accepted, stored.duplicates, stored.rejected).to_json())

    app = web.Application()
    app.router.add_route(protocol.JOURNAL.method, protocol.JOURNAL.pattern, receive)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server, collector


async def ship_all(journal: Journal, tmp_path: Path, count: int) -> tuple[Collector, Shipper]:
    server, collector = await collector_server(tmp_path, [0])
    async with aiohttp.ClientSession() as http:
        shipper = Shipper(journal, OriginClient(http, f"http://127.0.0.1:{server.port}", "t"), node="n1",
                          key=NODE_KEY)
        task = asyncio.create_task(shipper.run())
        try:
            async with asyncio.timeout(30):
                while shipper.shipped_records < count:
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.close()
    return collector, shipper


async def test_group_commit_rotation_and_exactly_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", max_segment_bytes=4096)
    await journal.open()
    for wave in range(10):  # concurrent records share fsyncs; each wave's batch may rotate the segment
        await asyncio.gather(*(journal.record(record(wave * 20 + i)) for i in range(20)))
    assert journal.records_written == 200
    assert len(segments(journal.directory)) > 3
    failures = [3]
    server, collector = await collector_server(tmp_path, failures)
    async with aiohttp.ClientSession() as http:
        shipper = Shipper(journal, OriginClient(http, f"http://127.0.0.1:{server.port}", "t"), node="n1",
                          key=NODE_KEY)
        task = asyncio.create_task(shipper.run())
        try:
            async with asyncio.timeout(30):
                while shipper.shipped_records < 200:
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    events = await collector.query(protocol.AuditQuery(limit=1000))
    assert sorted(e["event_id"] for e in events) == [f"{i:032x}" for i in range(200)]
    assert collector.duplicates > 0  # the lost answers made the agent send again
    assert [seq for seq, _ in segments(journal.directory)] == [journal.active_seq]  # shipped ones removed
    await server.close()
    await collector.close()
    await journal.close()


async def test_torn_tail_of_a_crashed_segment_is_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    lines = [json.dumps(record(i)) for i in range(3)]
    # a segment left by a crash: two whole lines, then half a line (never acknowledged)
    (directory / "segment-0000000001.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:20])
    journal = Journal(directory, max_segment_bytes=1 << 20)
    await journal.open()  # a restarted agent writes a new segment
    assert journal.active_seq == 2
    await journal.record(record(10))
    collector, _ = await ship_all(journal, tmp_path, 3)
    events = await collector.query(protocol.AuditQuery(limit=10))
    assert sorted(e["event_id"] for e in events) == [f"{i:032x}" for i in (0, 1, 10)]
    assert not (directory / "segment-0000000001.jsonl").exists()
    await collector.close()
    await journal.close()


async def test_shipped_records_are_freed_without_waiting_for_rotation(tmp_path: Path) -> None:
    """A quiet collector-side catch-up frees the disk: once everything is acknowledged, the active
    segment is rolled (at roll_bytes, long before max_segment_bytes) and deleted."""
    journal = Journal(tmp_path / "journal", max_segment_bytes=64 << 20)
    await journal.open()
    server, collector = await collector_server(tmp_path, [0])
    async with aiohttp.ClientSession() as http:
        shipper = Shipper(journal, OriginClient(http, f"http://127.0.0.1:{server.port}", "t"), node="n1",
                          key=NODE_KEY, roll_bytes=8192)
        task = asyncio.create_task(shipper.run())
        try:
            for wave in range(3):
                await asyncio.gather(*(journal.record(record(wave * 100 + i)) for i in range(100)))
                async with asyncio.timeout(30):
                    while shipper.shipped_records < 100 * (wave + 1) or journal.disk_bytes() >= 8192:
                        await asyncio.sleep(0.05)
                assert shipper.unshipped_bytes() == 0
                assert [seq for seq, _ in segments(journal.directory)] == [journal.active_seq]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert shipper.rolls >= 3  # each wave is about 12 KiB of records
    events = await collector.query(protocol.AuditQuery(limit=1000))
    assert sorted(e["event_id"] for e in events) == [f"{i:032x}" for i in range(300)]
    assert collector.duplicates == 0
    await server.close()
    await collector.close()
    await journal.close()


async def test_batches_of_non_ascii_records_fit_the_collector(tmp_path: Path) -> None:
    """A batch of journal lines re-encoded with escapes grew about 3x past the collector's 1 MiB:
    413, and the same batch retried forever (shipping stopped for good)."""
    journal = Journal(tmp_path / "journal", max_segment_bytes=64 << 20)
    await journal.open()
    for i in range(300):
        await journal.record({**record(i), "user_agent": "é" * 1500})  # 3 kB a line, 9 kB escaped
    collector, shipper = await ship_all(journal, tmp_path, 300)
    assert shipper.failures == 0 and shipper.rejected_records == 0
    events = await collector.query(protocol.AuditQuery(limit=1000))
    assert len(events) == 300 and all(e["user_agent"] == "é" * 1500 for e in events)
    await journal.close()
    await collector.close()


async def test_over_long_fields_are_cut_not_the_record_lost(tmp_path: Path) -> None:
    """A field over audit.MAX_FIELD made the collector refuse the whole record while the shipper
    counted it shipped: the pull was missing from the audit."""
    journal = Journal(tmp_path / "journal", max_segment_bytes=64 << 20)
    await journal.open()
    long_reference = "v" * 10_000
    await journal.record({**record(1), "reference": long_reference, "status": 404})
    await journal.record({**record(2), **{f: "x" * 3000 for f in ("user_agent", "principal", "error", "range",
                                                                     "credential", "repository", "client_addr")}})
    collector, shipper = await ship_all(journal, tmp_path, 2)
    assert shipper.rejected_records == 0 and collector.rejected == 0
    events = {e["event_id"]: e for e in await collector.query(protocol.AuditQuery(limit=10))}
    assert len(events) == 2
    reference = events[f"{1:032x}"]["reference"]
    assert reference.endswith(audit.CUT_MARK) and len(reference) == audit.MAX_FIELD
    assert reference.startswith("v" * 1000) and events[f"{1:032x}"]["status"] == 404
    assert all(isinstance(v, str) and v.endswith(audit.CUT_MARK) for k, v in events[f"{2:032x}"].items()
               if k in ("user_agent", "principal", "error"))
    await journal.close()
    await collector.close()


async def test_a_full_journal_takes_records_again_once_shipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", max_segment_bytes=4096, max_disk_bytes=16 << 10)
    await journal.open()
    written = 0
    while journal.disk_bytes() + 200 < 16 << 10:  # (a record is about 150 bytes)
        await journal.record(record(written))
        written += 1
    with pytest.raises(JournalError, match="journal is full"):
        await journal.record(record(written))
    assert 16 << 10 >= journal.disk_bytes() > (16 << 10) - 1024
    end = {"event_id": f"{0:032x}", "phase": "end", "ts": audit.now(), "node": "n1", "outcome": "complete"}
    await journal.record(end)  # a response that had started still gets its end
    collector, _ = await ship_all(journal, tmp_path, written + 1)
    assert journal.disk_bytes() < 4096  # shipped segments removed, and counted as gone
    await journal.record(record(written + 1))
    await journal.close()
    await collector.close()


async def test_a_nul_or_a_lone_surrogate_is_stored_marked_in_sqlite_and_exported(tmp_path: Path) -> None:
    """(attack22) A node's JSON escape `\\udcff` decodes to a lone surrogate, which SQLite's insert
    refused: that batch failed every time it was sent again (the node's journal wedged), and an
    operator event holding one (a caller's User-Agent) made every CSV export of its window a 500."""
    collector = Collector(tmp_path / "audit.db")
    await collector.open()
    try:
        start = {"event_id": "e" * 32, "phase": "start", "ts": audit.now(), "status": 200,
                 "principal": "ali\x00ce", "repository": "team/\udcffapp", "user_agent": "pull\udcfe"}
        end = {"event_id": "e" * 32, "phase": "end", "ts": audit.now(), "bytes": 1, "outcome": "complete"}
        stored = await collector.store("node-a", [start, end])
        assert (stored.accepted, stored.rejected) == (2, 0)
        await collector.record_operator(*audit.operator_records(
            principal="node-token", method="GET", action="refused", status=403, outcome="refused", detail={},
            client_addr="127.0.0.1:1", user_agent="probe\udcff", authz_method="origin"))
        events = await collector.query(protocol.AuditQuery(limit=10))
        assert len(events) == 2
        assert await collector.query(protocol.AuditQuery(principal="ali\ufffdce", limit=10)) != []
        assert await collector.query(protocol.AuditQuery(repository="team/\udcffapp", limit=10)) != []
        assert await collector.query(protocol.AuditQuery(repository="team/\ufffdapp", limit=10)) != []
        rows = audit.to_csv(events).encode("utf-8").decode("utf-8").splitlines()  # (strict, as the export's answer)
        assert len(rows) == 3 and "probe\ufffd" in rows[2] and "pull\ufffd" in rows[1]
    finally:
        await collector.close()
