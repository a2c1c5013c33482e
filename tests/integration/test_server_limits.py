"""shoal/web.py's server limits, in process, with short timeouts: what a hostile or broken client
gets (an oversized or over-long head, a head or body that never ends, a body too large, more
connections than allowed), and that real clients are served alongside."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from shoal import web as shoal_web

MARKER = b"do-not-echo-me"
SLACK = 1.0


@dataclass
class Server:
    url: str
    host: str
    port: int
    release: asyncio.Event
    posted: list[bytes]


async def _serve(max_connections: int) -> AsyncIterator[Server]:
    release = asyncio.Event()
    posted: list[bytes] = []

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def hold(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="held")

    async def post(request: web.Request) -> web.Response:
        posted.append(await request.read())
        return web.Response(text="posted")

    app = web.Application(client_max_size=1024)
    app.router.add_get("/ok", ok)
    app.router.add_get("/hold", hold)
    app.router.add_post("/post", post)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    runner = await shoal_web.start(app, sock, max_connections=max_connections)
    try:
        yield Server(f"http://{host}:{port}", host, port, release, posted)
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    monkeypatch.setattr(shoal_web, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(shoal_web, "BODY_TIMEOUT", 0.8)
    async for s in _serve(max_connections=64):
        yield s


@contextlib.asynccontextmanager
async def connection(s: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(s.host, s.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (failing after `within`)."""
    got = b""
    deadline = time.monotonic() + within
    while True:
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=deadline - time.monotonic())
        except ConnectionError:
            return got
        if not data:
            return got
        got += data


async def exchange(s: Server, raw: bytes, within: float = 5.0) -> bytes:
    async with connection(s) as (reader, writer):
        with contextlib.suppress(ConnectionError):
            writer.write(raw)
            await writer.drain()
        return await until_closed(reader, within)


GET_OK = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_real_requests_are_served(server: Server) -> None:
    assert (await exchange(server, GET_OK)).endswith(b"\r\n\r\nok")
    # two requests on one kept-alive connection, the second after a pause shorter than the
    # keep-alive timeout but longer than the head timeout
    async with connection(server) as (reader, writer):
        writer.write(b"POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        assert b"posted" in await reader.readuntil(b"posted")
        await asyncio.sleep(shoal_web.HEADER_TIMEOUT + 0.2)
        writer.write(GET_OK)
        assert (await until_closed(reader, 5)).endswith(b"ok")
    assert server.posted == [b"hello"]


async def test_an_oversized_head_is_refused_and_not_echoed(server: Server) -> None:
    headers = b"".join(b"X-Pad-%d: %s %s\r\n" % (i, MARKER, b"a" * 7000) for i in range(6))
    answer = await exchange(server, b"GET /ok HTTP/1.1\r\nHost: x\r\n" + headers)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert MARKER not in answer


async def test_an_over_long_header_is_refused_quietly_and_not_echoed(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await exchange(server, b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + MARKER + b"a" * 9000 + b"\r\n\r\n")
    assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), answer[:200]
    assert MARKER not in answer
    assert b'"INVALID_REQUEST"' in answer
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_connection_that_sends_nothing_is_closed(server: Server) -> None:
    started = time.monotonic()
    async with connection(server) as (reader, _):
        assert await until_closed(reader, shoal_web.HEADER_TIMEOUT + SLACK) == b""
    assert time.monotonic() - started >= shoal_web.HEADER_TIMEOUT - 0.1


async def test_a_trickled_head_is_cut_at_the_head_timeout(server: Server) -> None:
    started = time.monotonic()
    async with connection(server) as (reader, writer):
        writer.write(b"GET /ok HTTP/1.1\r\nX-Slow: ")
        closed = asyncio.ensure_future(until_closed(reader, shoal_web.HEADER_TIMEOUT + SLACK))
        while not closed.done():
            with contextlib.suppress(ConnectionError):
                writer.write(b"a")
            await asyncio.wait([closed], timeout=0.05)
        answer = await closed
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert time.monotonic() - started < shoal_web.HEADER_TIMEOUT + SLACK


async def test_a_body_larger_than_the_app_reads_is_refused_before_the_handler(server: Server) -> None:
    answer = await exchange(server, b"POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert server.posted == []


async def test_a_body_that_never_ends_is_cut(server: Server) -> None:
    started = time.monotonic()
    answer = await exchange(server, b"POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this",
                            within=shoal_web.BODY_TIMEOUT + SLACK)
    assert answer == b""
    assert shoal_web.BODY_TIMEOUT - 0.1 <= time.monotonic() - started < shoal_web.BODY_TIMEOUT + SLACK
    assert server.posted == []


async def test_past_the_connection_limit_idle_ones_go_first_busy_ones_never() -> None:
    async for s in _serve(max_connections=4):
        idle = [await asyncio.open_connection(s.host, s.port) for _ in range(4)]
        await asyncio.sleep(0.05)  # each is now waiting for its request
        # a fifth connection: the oldest idle one is closed, the new request is served
        assert (await exchange(s, GET_OK)).endswith(b"ok")
        assert await until_closed(idle[0][0], 1.0) == b""
        for _, w in idle:
            w.close()
        # four connections serving requests are never cut: the fifth is refused
        busy = [await asyncio.open_connection(s.host, s.port) for _ in range(4)]
        for _, w in busy:
            w.write(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.sleep(0.1)
        refused = await exchange(s, GET_OK)
        assert refused.startswith(b"HTTP/1.1 503 "), refused
        s.release.set()
        for r, w in busy:
            assert (await until_closed(r, 5)).endswith(b"held")
            w.close()
