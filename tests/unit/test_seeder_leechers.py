"""The origin's per-swarm leecher counts (Swarm._leechers) do not outlive their torrents (attack20).

A state_update_alert that libtorrent built before a removal (post_torrent_updates is posted every
second, and the alert reaches _dispatch at the next _drain) still carries the removed handle with
its peers; libtorrent never reports that torrent again. Counted, it kept an upload slot for good,
and the seeder's slots grew with every eviction of a busy torrent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import libtorrent as lt
import pytest

from shoal import swarm as swarm_module
from shoal.swarm import SEEDER_FINGERPRINT, SEEDER_SLOTS, Swarm, SwarmSettings


class FakeStateUpdate:
    def __init__(self, status: list[Any]) -> None:
        self.status = status


class FakeRemoved:
    def __init__(self, name: str) -> None:
        self.torrent_name = name


class StubSession:
    """Only what remove() and _set_unchoke_slots() call. libtorrent handles its calls in order on its
    network thread: the post_torrent_updates of the last recount is answered before the removal,
    and both alerts arrive after remove() has already dropped the count."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.limit = SEEDER_SLOTS
        self.names: dict[object, str] = {}  # handle -> torrent name

    def apply_settings(self, settings: dict[str, int]) -> None:
        self.limit = settings.get("unchoke_slots_limit", self.limit)

    def remove_torrent(self, handle: object, flags: int = 0) -> None:
        dispatch = cast(Any, self.swarm._dispatch)
        loop = asyncio.get_running_loop()
        # the state update taken at the last recount, while three leechers were connected
        status = SimpleNamespace(handle=handle, num_peers=3, num_seeds=0, num_uploads=1)
        loop.call_soon(dispatch, FakeStateUpdate([status]))
        loop.call_soon(dispatch, FakeRemoved(self.names[handle]))


@pytest.fixture
def fake_alerts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lt, "state_update_alert", FakeStateUpdate, raising=False)
    monkeypatch.setattr(lt, "torrent_removed_alert", FakeRemoved, raising=False)


def test_removed_torrents_do_not_keep_upload_slots(fake_alerts: None) -> None:
    async def run() -> tuple[int, int, int]:
        seeder = Swarm(SwarmSettings("127.0.0.1", 1, SEEDER_FINGERPRINT))
        session = StubSession(seeder)
        seeder._session = cast(Any, session)
        for i in range(8):
            handle = object()  # (torrent_handle hashes by its torrent: any distinct key will do)
            session.names[handle] = f"{i:064x}"
            seeder._jobs[f"{i:064x}"] = cast(Any, SimpleNamespace(handle=handle, _on_error=lambda _m: None))
        # every swarm being downloaded: eight slots
        cast(Any, seeder._dispatch)(FakeStateUpdate([SimpleNamespace(handle=h, num_peers=3, num_seeds=0, num_uploads=1)
                                                     for h in session.names]))
        assert seeder.unchoke_slots == 8
        for name in list(session.names.values()):  # the store evicts them all (Seeder._on_evict -> Swarm.remove)
            await seeder.remove(name)
        await asyncio.sleep(0)
        seeder._session = None
        return len(seeder._jobs), len(seeder._leechers), session.limit

    jobs, counted, limit = asyncio.run(run())
    assert jobs == 0
    # no torrent left in the session: back to one swarm's four, and nothing counted
    assert (counted, limit) == (0, SEEDER_SLOTS), f"{counted} removed torrents still counted, {limit} slots"


def test_a_tick_that_fails_does_not_end_the_balancing(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """One exception in a tick (a libtorrent call on a torrent going away) ended the task for good:
    the slots were no longer balanced, and the bans of the moment never lifted (attack23 #8)."""
    monkeypatch.setattr(swarm_module, "SLOTS_RECOUNT", 0.001)
    monkeypatch.setattr(swarm_module, "GUARD_EVERY", 1)
    calls: list[int] = []

    def drop_slow_peers(self: Swarm) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("invalid torrent handle used")

    monkeypatch.setattr(Swarm, "_drop_slow_peers", drop_slow_peers)

    async def run() -> None:
        seeder = Swarm(SwarmSettings("127.0.0.1", 1, SEEDER_FINGERPRINT))
        seeder._session = cast(Any, SimpleNamespace(post_torrent_updates=lambda _flags: None))
        task = asyncio.create_task(seeder._balance_slots())
        try:
            async with asyncio.timeout(10):
                while len(calls) < 3 and not task.done():
                    await asyncio.sleep(0.01)
            assert not task.done()
        finally:
            task.cancel()
            seeder._session = None

    asyncio.run(run())
    assert len(calls) >= 3
    assert "seeder slot balancing failed" in caplog.text
