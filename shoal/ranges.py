"""HTTP `Range` for blobs, with the semantics distribution has (Go's net/http ServeContent).

The agent must answer a `Range` exactly as the registry would, so this is a port of
Go's `parseRange` rules rather than a generic RFC 9110 parser:
- a header that is not `bytes=...` or has a malformed part is an error (416, no Content-Range);
- parts that start at or past the end are dropped; if none is left, 416 with `bytes */size`;
- when the ranges add up to more than the blob, the header is ignored and the whole blob sent.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

# Go parses range numbers as int64: longer or larger numbers are malformed, not "to the end".
_MAX_DIGITS = 19
_MAX_INT64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    length: int

    @property
    def end(self) -> int:
        """Inclusive last offset, as Content-Range writes it."""
        return self.start + self.length - 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(Exception):
    """416. `unsatisfied` is True when the header was valid but no part overlapped the blob
    (then the answer carries `Content-Range: bytes */size`)."""

    def __init__(self, *, unsatisfied: bool) -> None:
        super().__init__("invalid range" if not unsatisfied else "no overlap")
        self.unsatisfied = unsatisfied


def _number(text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > _MAX_DIGITS or int(text) > _MAX_INT64:
        raise RangeNotSatisfiable(unsatisfied=False)
    return int(text)


def parse_range(header: str | None, size: int) -> list[ByteRange] | None:
    """Return the ranges to send, or None for "send the whole blob with 200"."""
    if not header:
        return None
    prefix = "bytes="
    if not header.startswith(prefix):
        raise RangeNotSatisfiable(unsatisfied=False)
    ranges: list[ByteRange] = []
    no_overlap = False
    for raw in header[len(prefix) :].split(","):
        part = raw.strip(" \t")
        if not part:
            continue
        start_text, dash, end_text = part.partition("-")
        if not dash:
            raise RangeNotSatisfiable(unsatisfied=False)
        start_text, end_text = start_text.strip(" \t"), end_text.strip(" \t")
        if not start_text:
            # suffix range: the last N bytes
            suffix = _number(end_text)
            if suffix == 0:
                # RFC 9110 14.1.1: a zero-length suffix cannot be satisfied.
                no_overlap = True
                continue
            suffix = min(suffix, size)
            ranges.append(ByteRange(size - suffix, suffix))
            continue
        start = _number(start_text)
        if start >= size:
            no_overlap = True
            continue
        if not end_text:
            ranges.append(ByteRange(start, size - start))
            continue
        end = _number(end_text)
        if start > end:
            raise RangeNotSatisfiable(unsatisfied=False)
        end = min(end, size - 1)
        ranges.append(ByteRange(start, end - start + 1))
    if not ranges:
        if no_overlap:
            raise RangeNotSatisfiable(unsatisfied=True)
        return None
    if sum(r.length for r in ranges) > size:
        # Go: "probably an attack, or a dumb client. Ignore the range request."
        return None
    return ranges


@dataclass(frozen=True, slots=True)
class MultipartPlan:
    """How a multi-range answer is laid out: per range, the part header before its bytes."""

    boundary: str
    part_headers: tuple[bytes, ...]
    closing: bytes
    content_length: int

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"


def plan_multipart(ranges: list[ByteRange], size: int, content_type: str) -> MultipartPlan:
    """Lay out `multipart/byteranges` the way Go's mime/multipart writer does."""
    boundary = secrets.token_hex(30)
    headers: list[bytes] = []
    total = 0
    for i, r in enumerate(ranges):
        lead = b"" if i == 0 else b"\r\n"
        head = (
            lead
            + f"--{boundary}\r\nContent-Range: {r.content_range(size)}\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        headers.append(head)
        total += len(head) + r.length
    closing = f"\r\n--{boundary}--\r\n".encode()
    total += len(closing)
    return MultipartPlan(boundary, tuple(headers), closing, total)
