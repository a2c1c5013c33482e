"""How the CLI shows things to people: tables, and a pre-seed job's progress, drawn with `rich`
on a terminal and as plain lines otherwise (CI logs, pipes), where bars and cursor moves would
be noise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from time import monotonic
from typing import TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from shoal import protocol
from shoal.cli.common import size_text

# A plain progress line at most this often (and on every change of state): a CI log of an hour's
# job stays readable.
PLAIN_EVERY = 5.0
ALL_IMAGES = "all images"


def is_terminal(stream: TextIO) -> bool:
    return stream.isatty()


def console(stream: TextIO | None = None) -> Console:
    """A console for `stream`: on a terminal its width and colours; elsewhere no colour and no
    width limit, so a table's rows are never wrapped or cut in a file or a pipe."""
    out = stream or sys.stdout
    if is_terminal(out):
        return Console(file=out, highlight=False)
    return Console(file=out, width=100_000, no_color=True, highlight=False, force_terminal=False, soft_wrap=True)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], *, stream: TextIO | None = None,
          right: Sequence[str] = ()) -> None:
    """Rows under column headers, aligned; `right`: the columns of numbers."""
    out = console(stream)
    t = Table(box=box.SIMPLE_HEAD if out.is_terminal else None, show_edge=False, pad_edge=False,
              header_style="bold" if out.is_terminal else "")
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    if out.is_terminal:
        out.print(t)
        return
    with out.capture() as captured:
        out.print(t)
    # a file or a pipe: no padding after the last column (diffs and `cut` see the values)
    (stream or sys.stdout).write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _per_image(job: protocol.PreseedJob) -> dict[str, tuple[int, int]]:
    """image -> (bytes done, bytes total); blobs of an origin that does not say: ALL_IMAGES."""
    sums: dict[str, tuple[int, int]] = {}
    for blob in job.blobs:
        key = blob.image or ALL_IMAGES
        done, total = sums.get(key, (0, 0))
        finished = blob.state in ("done", "skipped")
        sums[key] = (done + (blob.size if finished else 0), total + blob.size)
    return sums


def plain_line(job: protocol.PreseedJob, rate: float | None) -> str:
    """One line of progress for a log: counts, bytes, percent, and rate and ETA once known."""
    total, done = job.bytes_total, job.bytes_done
    pct = 100.0 * done / total if total else (100.0 if job.state == "done" else 0.0)
    line = (f"[{job.state}] {job.blobs_done}/{job.blobs_total} blobs, "
            f"{size_text(done)} / {size_text(total)} ({pct:.0f}%)")
    if rate is not None and rate > 0:
        line += f", {size_text(rate)}/s"
        if not job.finished and total > done:
            line += f", ETA {_duration((total - done) / rate)}"
    return line


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _Rate(ProgressColumn):
    """The rate in the binary units the sizes use (rich's own column counts in MB)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{size_text(speed)}/s", style="progress.data.speed")


class SeedProgress:
    """Follows a job: `update(job)` after every poll, `close()` at the end (also on Ctrl-C)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = is_terminal(self.stream)
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._last_line = ""
        self._last_state = ""
        self._last_print = 0.0
        self._first: tuple[float, int] | None = None  # (when, bytes done) at the first poll with blobs

    def update(self, job: protocol.PreseedJob) -> None:
        if job.blobs_total == 0:
            # resolving manifests (or failed to): nothing to count (no "0/0 blobs" line)
            if job.state != self._last_state:
                self._say(f"[{job.state}] {', '.join(job.images)}")
                self._last_state = job.state
            return
        if self.tty:
            self._draw(job)
        else:
            self._plain(job)
        self._last_state = job.state

    def _say(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, file=self.stream, flush=True)

    def _rate(self, job: protocol.PreseedJob) -> float | None:
        now = monotonic()
        if self._first is None:
            self._first = (now, job.bytes_done)
            return None
        when, first = self._first
        return (job.bytes_done - first) / (now - when) if now > when and job.bytes_done > first else None

    def _plain(self, job: protocol.PreseedJob) -> None:
        line = plain_line(job, self._rate(job))
        now = monotonic()
        changed_state = job.state != self._last_state
        if line != self._last_line and (changed_state or job.finished or now - self._last_print >= PLAIN_EVERY):
            print(line, file=self.stream, flush=True)
            self._last_line, self._last_print = line, now

    def _draw(self, job: protocol.PreseedJob) -> None:
        if self._progress is None:
            self._progress = Progress(
                # a long image name gives way (cut with an ellipsis) before the numbers do
                TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                BarColumn(bar_width=24), DownloadColumn(binary_units=True), _Rate(), TimeRemainingColumn(),
                console=Console(file=self.stream, highlight=False), transient=False)
            self._progress.start()
        progress = self._progress
        images = _per_image(job)
        rows = [("total", (job.bytes_done, job.bytes_total))]
        if len(images) > 1 or ALL_IMAGES not in images:
            rows += sorted(images.items())
        for name, (done, total) in rows:
            label = f"{job.blobs_done}/{job.blobs_total} blobs" if name == "total" else f"  {name}"
            task = self._tasks.get(name)
            if task is None:
                task = self._tasks[name] = progress.add_task(label, total=total or None)
            progress.update(task, description=label, completed=done, total=total or None)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
