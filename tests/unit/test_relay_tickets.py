"""The origin's relay tickets (origin/relay.py): one use, one blob, one registry, a bounded number
per blob and in all, and a relay that sends only what the fetch wrote, and stops when it ends."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shoal.oci import Digest
from shoal_origin import relay
from shoal_origin.relay import FetchProgress, Relays

A = Digest(hashlib.sha256(b"a").hexdigest())
B = Digest(hashlib.sha256(b"b").hexdigest())


def relays(fetching: dict[Digest, FetchProgress] | None = None, running: bool = True) -> Relays:
    table = fetching if fetching is not None else {}
    return Relays(table.get, lambda _d: running, CollectorRegistry())


def test_a_ticket_is_for_one_blob_and_good_once() -> None:
    r = relays()
    ticket = r.issue("node-1", "registry:5000", A)
    assert ticket is not None and len(ticket) >= 40
    assert r.redeem(ticket, B) is None  # another blob: refused, and used up
    assert r.redeem(ticket, A) is None
    fresh = r.issue("node-1", "registry:5000", A)
    assert fresh is not None and fresh != ticket
    assert r.redeem(fresh, A) == "registry:5000"
    assert r.redeem(fresh, A) is None
    assert r.redeem("", A) is None


def test_tickets_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    r = relays()
    ticket = r.issue("node-1", "registry:5000", A)
    assert ticket is not None
    monkeypatch.setattr(relay, "TICKET_TTL", -1.0)
    late = r.issue("node-2", "registry:5000", B)
    assert late is not None
    assert r.redeem(late, B) is None  # issued already expired
    assert r.redeem(ticket, A) == "registry:5000"  # (the first one was still good)


def test_tickets_are_bounded_per_blob_and_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    r = relays()
    issued = [r.issue(f"node-{i}", "registry:5000", A) for i in range(relay.MAX_TICKETS_PER_BLOB)]
    assert None not in issued
    assert r.issue("node-x", "registry:5000", A) is None
    assert r.issue("node-x", "registry:5000", B) is not None  # another blob has its own share
    monkeypatch.setattr(relay, "MAX_TICKETS", relay.MAX_TICKETS_PER_BLOB + 1)
    assert r.issue("node-y", "registry:5000", Digest(hashlib.sha256(b"c").hexdigest())) is None


def test_a_redeemed_ticket_counts_against_the_bound_until_its_relay_ends() -> None:
    """(attack16b) The bound is on relays, not on unused tickets: a node that redeemed each
    ticket at once had as many streams of the blob as it asked for."""
    r = relays()
    issued = [r.issue(f"node-{i}", "registry:5000", A) for i in range(relay.MAX_TICKETS_PER_BLOB)]
    for ticket in issued:
        assert ticket is not None and r.redeem(ticket, A) == "registry:5000"
    assert r.issue("node-x", "registry:5000", A) is None
    assert r.tickets.labels("declined")._value.get() == 1
    assert issued[0] is not None
    r.release(issued[0])
    assert r.issue("node-x", "registry:5000", A) is not None


def test_one_relay_per_node_and_blob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "MAX_TICKETS_PER_BLOB", 2)  # (one in all by default)
    r = relays()
    ticket = r.issue("node-1", "registry:5000", A)
    assert ticket is not None
    assert r.issue("node-1", "registry:5000", A) is None  # an unused ticket already
    assert r.redeem(ticket, A) == "registry:5000"
    assert r.issue("node-1", "registry:5000", A) is None  # its relay still runs
    assert r.issue("node-1", "registry:5000", B) is not None  # another blob
    assert r.issue("node-2", "registry:5000", A) is not None  # another node
    r.release(ticket)
    assert r.issue("node-1", "registry:5000", A) is not None


async def test_a_relay_sends_only_the_fetch_of_the_tickets_registry(tmp_path: Path) -> None:
    progress = FetchProgress("other-registry:5000", tmp_path / "final", 10)
    r = relays({A: progress})
    assert await r.progress("registry:5000", A) is None  # the fetch is from another registry
    assert await r.progress("other-registry:5000", A) is progress


async def test_a_relay_follows_the_fetch_and_stops_when_it_ends(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    tmp, final = tmp_path / "download.1234", tmp_path / "final"
    progress = FetchProgress("registry:5000", final, len(data))
    progress.moved(tmp)
    r = relays({A: progress})
    sent: list[bytes] = []
    first = asyncio.Event()

    async def write(chunk: bytes) -> None:
        sent.append(chunk)
        if sum(map(len, sent)) >= 1 << 20:
            first.set()

    streaming = asyncio.create_task(r.stream(progress, write))
    with open(tmp, "wb") as f:
        f.write(data[: 1 << 20])
    f = open(tmp, "ab")  # noqa: SIM115 (written in steps, as the seeder's fetch does)
    progress.advance(1 << 20)
    await asyncio.wait_for(first.wait(), 10)
    assert b"".join(sent) == data[: 1 << 20]
    f.write(data[1 << 20 : 2 << 20])
    f.close()
    progress.advance(1 << 20)
    tmp.rename(final)  # the fetch completes into the store: the relay finds the file there
    progress.end()  # ... and is seeded: the relay ends where it stands, short of the whole
    total = await asyncio.wait_for(streaming, 10)
    assert total == len(b"".join(sent)) <= 2 << 20
    assert data.startswith(b"".join(sent))
