"""shoal/sdnotify.py against a real unix datagram socket, and the one decision of READY=1
(shoal.web.service_ready): the /readyz check, and the Event an app may add to delay it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from shoal import sdnotify
from shoal import web as shoal_web


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's end of $NOTIFY_SOCKET (non-blocking: a test reads what has arrived)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


async def received(sock: socket.socket, timeout: float) -> str | None:
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None
    return data.decode()


def test_nothing_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_notify_to_a_path_and_to_an_abstract_socket(systemd: socket.socket) -> None:
    assert sdnotify.notify("READY=1")
    assert systemd.recv(100) == b"READY=1"
    name = f"shoal-unit-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"STOPPING=1"


def test_a_socket_nobody_listens_on_is_no_error(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "10000000"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),  # systemd watches another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == interval


async def test_ready_waits_for_readyz_and_for_the_apps_event(systemd: socket.socket,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    app = web.Application()
    state: dict[str, str | None] = {"reason": "starting"}

    async def ready() -> str | None:
        return state["reason"]

    shoal_web.add_ops_routes(app, CollectorRegistry(), ready)
    gate = app[shoal_web.SERVICE_READY_KEY] = asyncio.Event()

    async def window(seconds: float, stop: str | None = None) -> list[str]:
        """Everything that arrives within `seconds` (up to `stop`, if it comes)."""
        deadline = asyncio.get_running_loop().time() + seconds
        got: list[str] = []
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            m = await received(systemd, left)
            if m is not None:
                got.append(m)
                if m == stop:
                    break
        return got

    async def until(message: str, seconds: float) -> list[str]:
        got = await window(seconds, stop=message)
        if message not in got:
            raise AssertionError(f"no {message} within {seconds}s: {got}")
        return got

    async with sdnotify.service(lambda: shoal_web.service_ready(app)):
        first = await window(0.4)  # /readyz not ready: pings only
        assert first and set(first) == {"WATCHDOG=1"}, first
        state["reason"] = None
        second = await window(0.4)  # /readyz ready, the app's Event not set: still pings only
        assert second and set(second) == {"WATCHDOG=1"}, second
        gate.set()
        await until("READY=1", 2.0)
    await until("STOPPING=1", 1.0)
    assert await window(0.2) == []  # and no ping after it


async def test_without_notify_socket_the_service_context_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    async with sdnotify.service(lambda: asyncio.sleep(0, True)):
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
