"""Replacing a small file so that a reader sees the old one or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_text(path: Path, text: str, *, mode: int) -> None:
    """Write `text` to `path` through a new temporary file in its directory (O_EXCL, so a name
    planted there is never followed), with `mode` whatever the umask, fsync'd, renamed over
    `path`, and the directory fsync'd (durable)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dirfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # a directory that cannot be opened for reading: the rename is all there is
    try:
        os.fsync(dirfd)  # a failure here is the caller's to know (the write is not durable)
    finally:
        os.close(dirfd)
