"""`shoal seed`'s progress: plain lines with rate and ETA where stdout is not a terminal (CI
logs), bars per image on a terminal, and no empty `0/0 blobs` line while the job resolves."""

from __future__ import annotations

import io
import re

import pytest

from shoal import protocol
from shoal.cli import display

MIB = 1 << 20


def job(state: str, done: list[int], pending: list[int], *, images: tuple[str, ...] = ("r.test/a:v1",),
        elapsed: float = 1.0) -> protocol.PreseedJob:
    blobs = [protocol.PreseedBlob(f"sha256:{i:064x}", size, "done", None, images[i % len(images)])
             for i, size in enumerate(done)]
    blobs += [protocol.PreseedBlob(f"sha256:{i + 100:064x}", size, "seeding", None, images[i % len(images)])
              for i, size in enumerate(pending)]
    return protocol.PreseedJob(id="j1", state=state, images=list(images), platforms=[], manifests=[],
                               blobs_total=len(blobs), blobs_done=len(done), blobs_failed=0,
                               bytes_total=sum(done) + sum(pending), bytes_done=sum(done), errors=[],
                               elapsed_seconds=elapsed, blobs=blobs)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_with_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(display, "monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = display.SeedProgress(out)
    progress.update(job("resolving", [], []))
    progress.update(job("resolving", [], []))  # said once
    progress.update(job("seeding", [], [10 * MIB, 10 * MIB]))
    clock[0] += 1.0
    progress.update(job("seeding", [4 * MIB], [6 * MIB, 10 * MIB]))  # within PLAIN_EVERY: not printed
    clock[0] += display.PLAIN_EVERY
    progress.update(job("seeding", [10 * MIB], [10 * MIB]))
    clock[0] += 2.0
    progress.update(job("done", [10 * MIB, 10 * MIB], []))
    progress.close()
    lines = out.getvalue().splitlines()
    assert "0/0 blobs" not in out.getvalue()
    assert lines[0] == "[resolving] r.test/a:v1"
    assert lines[1] == "[seeding] 0/2 blobs, 0 B / 20.0 MiB (0%)"
    # 10 MiB in 6 s since the first count: the rate, and the other 10 MiB's ETA at that rate
    assert lines[2] == "[seeding] 1/2 blobs, 10.0 MiB / 20.0 MiB (50%), 1.7 MiB/s, ETA 6s"
    assert re.fullmatch(r"\[done\] 2/2 blobs, 20\.0 MiB / 20\.0 MiB \(100%\), 2\.5 MiB/s", lines[3])
    assert len(lines) == 4
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # no cursor moves in a log


def test_a_job_that_fails_resolving_counts_nothing() -> None:
    out = io.StringIO()
    progress = display.SeedProgress(out)
    progress.update(job("resolving", [], []))
    progress.update(job("failed", [], []))
    assert out.getvalue().splitlines() == ["[resolving] r.test/a:v1", "[failed] r.test/a:v1"]


def test_bars_per_image_on_a_terminal() -> None:
    out = Terminal()
    progress = display.SeedProgress(out)
    images = ("r.test/a:v1", "r.test/b:v2")
    progress.update(job("seeding", [], [10 * MIB, 6 * MIB, 4 * MIB], images=images))
    progress.update(job("seeding", [10 * MIB, 6 * MIB], [4 * MIB], images=images))
    progress.close()
    text = out.getvalue()
    assert "\x1b[" in text  # drawn, with cursor control
    assert "r.test/a:v1" in text and "r.test/b:v2" in text
    assert "2/3 blobs" in text
    assert "10.0/14.0 MiB" in text and "6.0/6.0 MiB" in text  # a: 10 of 10+4, b: 6 of 6 (binary units)


def test_a_table_in_a_pipe_is_plain_and_never_wrapped() -> None:
    out = io.StringIO()
    long = "registry.test/" + "x" * 300
    display.table(["NAME", "BYTES"], [[long, "12"], ["b", "3456"]], stream=out, right=("BYTES",))
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["NAME", "BYTES"]
    assert lines[1].split() == [long, "12"] and lines[2].split() == ["b", "3456"]
    assert lines[1].endswith("  12") and lines[2].endswith("3456")  # numbers right-aligned
    assert "\x1b" not in out.getvalue()
    assert all(line == line.rstrip() for line in lines)  # no padding after the last column
