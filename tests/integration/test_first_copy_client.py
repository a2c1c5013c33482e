"""The agent's client of the origin's first copy (shoal/clients.py first_copy_piece) against an
origin that answers wrongly (hostile, broken, or something else at its address): an error before
anything is read, never a piece with a made-up index or length. libtorrent then checks the
bytes of a piece that passes against the signed merkle tree (tests/integration/test_swarm.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shoal import errors, protocol
from shoal.clients import OriginClient
from shoal.oci import Digest

DIGEST = Digest("cd" * 32)
PIECE = 16 << 10


@pytest.fixture
async def origin() -> AsyncIterator[tuple[TestServer, list[web.StreamResponse]]]:
    """A server whose next answer to FIRST_COPY is the test's (appended to the list)."""
    answers: list[web.StreamResponse] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        assert request.headers[protocol.FIRST_COPY_TICKET_HEADER] == "ticket-1"
        return answers.pop(0)

    app = web.Application()
    app.router.add_route("GET", protocol.FIRST_COPY.pattern, answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, answers
    await server.close()


def piece(index: str, body: bytes) -> web.Response:
    return web.Response(body=body, headers={protocol.FIRST_COPY_PIECE_HEADER: index})


async def test_a_first_copy_answer_is_taken_only_as_a_piece_of_the_blob(
        origin: tuple[TestServer, list[web.StreamResponse]]) -> None:
    server, answers = origin
    async with aiohttp.ClientSession() as http:
        client = OriginClient(http, str(server.make_url("")).rstrip("/"), "t" * 32)

        async def ask() -> tuple[int, bytes] | None:
            return await client.first_copy_piece(DIGEST, "ticket-1", piece_length=PIECE, within=10)

        answers.append(piece("7", b"x" * PIECE))
        assert await ask() == (7, b"x" * PIECE)
        answers.append(web.Response(status=204))
        assert await ask() is None
        chunked = web.StreamResponse(headers={protocol.FIRST_COPY_PIECE_HEADER: "1"})
        chunked.enable_chunked_encoding()
        for wrong in (piece("1" * 11, b"x"),  # (int() of 4,301 digits raises ValueError)
                      piece("\u0663", b"x"),  # an Arabic-Indic three: a digit to str.isdigit
                      piece("-1", b"x"), piece("", b"x"),
                      piece("2", b"x" * (PIECE + 1)),  # longer than a piece: refused unread
                      piece("2", b""), chunked):
            answers.append(wrong)
            with pytest.raises(errors.IntegrityError):
                await ask()
        answers.append(web.json_response({"errors": [{"code": "DENIED", "message": "no"}]}, status=403))
        with pytest.raises(errors.ShoalError):
            await ask()
