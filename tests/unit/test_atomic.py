"""shoal/atomic.py: the new file or the old one, the exact mode, and a failure to make it durable
is the caller's to know."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shoal import atomic


def test_replaces_with_the_exact_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    old_umask = os.umask(0o077)
    try:
        atomic.write_text(path, "new ✓", mode=0o644)
    finally:
        os.umask(old_umask)
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert path.stat().st_mode & 0o777 == 0o644
    atomic.write_text(path, "secret", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_directory_fsync_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the directory's
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic.write_text(tmp_path / "f", "x", mode=0o600)
