"""Reading cached and partial blob files in chunks, off the event loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path

from shoal import errors

# Chunk of a streamed (not sendfile'd) response. Each client holds about two of them (the one
# being written and the transport's unsent rest): at 1 MiB, 64 clients on in-flight blobs took
# the agent from 65 to about 200 MiB; a piece's size keeps that to a quarter.
FILE_CHUNK = 256 << 10


async def read_file(path: Path, offset: int, length: int) -> AsyncGenerator[bytes, None]:
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
    try:
        end = offset + length
        while offset < end:
            chunk = await asyncio.to_thread(os.pread, fd, min(FILE_CHUNK, end - offset), offset)
            if not chunk:
                raise errors.IntegrityError(f"{path.name} is shorter than its index entry")
            offset += len(chunk)
            yield chunk
    finally:
        await asyncio.to_thread(os.close, fd)
