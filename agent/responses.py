"""Responses shaped exactly like distribution's: headers, Range handling, OCI errors.

Blob answers carry what distribution 2.8 sends (Accept-Ranges, Cache-Control, Content-Length,
Content-Type, Docker-Content-Digest, Docker-Distribution-Api-Version, Etag); Range follows Go's
ServeContent (see shoal.ranges). Cached blobs go out with sendfile; in-flight blobs are written
from verified pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from shoal import errors
from shoal import web as shoal_web
from shoal.oci import Digest
from shoal.ranges import ByteRange, RangeNotSatisfiable, parse_range, plan_multipart
from shoal_agent.files import read_file
from shoal_agent.state import state_of

log = logging.getLogger(__name__)

API_VERSION = {"Docker-Distribution-Api-Version": "registry/2.0"}
OCTET = "application/octet-stream"
# A cached blob (or range of one) this small goes out as one response body (see send_blob)
SMALL_BODY = 64 << 10


def oci_error(oci: errors.OciCode, message: str | None = None, detail: Any = None,
              headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=oci.status, body=errors.error_body(oci, message, detail),
        headers={**API_VERSION, "Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def error_response(exc: BaseException) -> web.Response:
    """shoal's one error answer (shoal.web), with the registry API's version header; a path no
    route matches (e.g. a control character decoded into it) is the spec's NAME_UNKNOWN."""
    if isinstance(exc, web.HTTPNotFound):
        exc = errors.NotFound(errors.NAME_UNKNOWN, exc.reason)
    return shoal_web.error_response(exc, headers=API_VERSION)


def blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Cache-Control": "max-age=31536000",
        "Docker-Content-Digest": str(digest),
        "Etag": f'"{digest}"',
        **API_VERSION,
    }


class BlobBody(Protocol):
    """Where a blob's bytes come from: a cached file or a download in flight."""

    def path(self) -> Path | None:
        """The verified file, if the blob is cached (then sendfile is used)."""

    def stream(self, offset: int, length: int, *, whole: bool) -> AsyncGenerator[bytes, None]:
        """Verified bytes [offset, offset+length). With `whole`, the stream is the entire blob and
        its sha256 is checked before the last chunk is released. Callers close it (aclosing):
        it holds the blob pinned until closed."""


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags


async def send_blob(
    request: web.Request, digest: Digest, size: int, body: BlobBody,
    on_bytes: Callable[[int], None] | None = None,
) -> web.StreamResponse:
    headers = blob_headers(digest)
    etag = headers["Etag"]
    inm = request.headers.get("If-None-Match")
    if inm is not None and _etag_matches(inm, etag):
        return web.Response(status=304, headers=headers)
    range_header = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if range_header and if_range is not None and if_range.strip() != etag:
        range_header = None  # Go: a mismatching If-Range means "send it all"
    try:
        ranges = parse_range(range_header, size)
    except RangeNotSatisfiable as exc:
        extra = {"Content-Range": f"bytes */{size}"} if exc.unsatisfied else {}
        return oci_error(errors.RANGE_INVALID, "requested range not satisfiable",
                         headers={**headers, **extra})

    headers["Accept-Ranges"] = "bytes"
    path = body.path()
    if path is not None and size and request.method != "HEAD" and (ranges is None or len(ranges) == 1):
        part = ranges[0] if ranges is not None else ByteRange(0, size)
        if part.length <= SMALL_BODY:
            return _small_body(path, size, part, partial=ranges is not None, headers=headers, on_bytes=on_bytes)
    resp = web.StreamResponse(headers=headers)
    if ranges is None:
        resp.set_status(200)
        resp.content_type = OCTET
        resp.content_length = size
        parts: list[ByteRange] = [ByteRange(0, size)]
    elif len(ranges) == 1:
        resp.set_status(206)
        resp.content_type = OCTET
        resp.content_length = ranges[0].length
        resp.headers["Content-Range"] = ranges[0].content_range(size)
        parts = ranges
    else:
        plan = plan_multipart(ranges, size, OCTET)
        resp.set_status(206)
        resp.headers["Content-Type"] = plan.content_type
        resp.content_length = plan.content_length
        await _start(request, resp)
        if request.method == "HEAD":
            return resp
        with _abort_on_error(request):
            for head, part in zip(plan.part_headers, ranges, strict=True):
                await resp.write(head)
                await _write_range(request, resp, body, part, whole=False, on_bytes=on_bytes)
            await resp.write(plan.closing)
            await resp.write_eof()
        return resp

    if request.method == "HEAD" or size == 0:
        await _start(request, resp)
        await resp.write_eof()
        return resp
    part = parts[0]
    if path is None:
        # In flight: wait for the first verified bytes before the status line, so a download that
        # fails early is a clean error (containerd then tries the next host), not a cut body.
        # Closed here, not by the garbage collector, when the client hangs up: the stream
        # holds the blob pinned, and a collector may run in any thread (see BlobStore.pinned).
        async with contextlib.aclosing(body.stream(part.start, part.length, whole=ranges is None)) as chunks:
            first = await anext(chunks)
            await _start(request, resp)
            with _abort_on_error(request):
                await resp.write(first)
                if on_bytes is not None:
                    on_bytes(len(first))
                async for chunk in chunks:
                    await resp.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                await resp.write_eof()
        return resp
    await _start(request, resp)
    with _abort_on_error(request):
        await _sendfile(request, path, part.start, part.length)
        if on_bytes is not None:
            on_bytes(part.length)
        await resp.write_eof()
    return resp


def _small_body(path: Path, size: int, part: ByteRange, *, partial: bool, headers: dict[str, str],
                on_bytes: Callable[[int], None] | None) -> web.Response:
    """A small cached blob (a config, a tiny layer) or range of one as one response with its
    body: one write, and the journal takes its start and end records in one fsync before it goes
    out, where sendfile needed a start record's fsync, several writes and an end record after
    it. The read is on the loop: microseconds from the page cache, less than a thread hop."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, part.length, part.start)
    finally:
        os.close(fd)
    if len(data) != part.length:
        raise errors.IntegrityError(f"{path.name} is shorter than its index entry")
    if on_bytes is not None:
        on_bytes(len(data))
    if partial:
        headers["Content-Range"] = part.content_range(size)
    return web.Response(status=206 if partial else 200, body=data, content_type=OCTET, headers=headers)


async def _start(request: web.Request, resp: web.StreamResponse) -> None:
    state = state_of(request)
    if state.before_start is not None:
        await state.before_start(resp.status)  # the journal's start record is on disk before any byte
    await resp.prepare(request)
    state.response_started = True


@contextlib.contextmanager
def _abort_on_error(request: web.Request) -> Iterator[None]:
    """Once a status line went out, an error can only be told by cutting the connection: the
    client then sees a short body, never a complete one (and never a second response written
    into the body, which is what returning an error response would do)."""
    try:
        yield
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away (reset, broken pipe, or asyncio's "closed by peer")
    except Exception as exc:
        abort(request, exc)
        raise ConnectionResetError("response aborted") from exc


def abort(request: web.Request, exc: BaseException) -> None:
    log.warning("aborting %s %s mid-response: %s", request.method, request.rel_url.path, exc)
    state_of(request).aborted = True
    if request.transport is not None:
        request.transport.abort()


async def _write_range(request: web.Request, resp: web.StreamResponse, body: BlobBody, part: ByteRange,
                       *, whole: bool, on_bytes: Callable[[int], None] | None) -> None:
    path = body.path()
    chunks = read_file(path, part.start, part.length) if path is not None else \
        body.stream(part.start, part.length, whole=whole)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            await resp.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))


async def _sendfile(request: web.Request, path: Path, offset: int, count: int) -> None:
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    # Opening and closing a local cache file take microseconds: done on the loop, as a thread
    # hop each way cost more than the whole send of a small blob.
    with open(path, "rb") as f:  # noqa: ASYNC230 (see above)
        await asyncio.get_running_loop().sendfile(transport, f, offset, count)


