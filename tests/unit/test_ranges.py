"""Range semantics as Go's ServeContent (what distribution uses), checked against a model."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.ranges import ByteRange, RangeNotSatisfiable, parse_range, plan_multipart

SIZE = 100_000


@pytest.mark.parametrize(("header", "expected"), [
    (None, None),
    ("", None),
    ("bytes=0-99", [ByteRange(0, 100)]),
    ("bytes=100-", [ByteRange(100, SIZE - 100)]),
    ("bytes=-50", [ByteRange(SIZE - 50, 50)]),
    ("bytes=-200000", [ByteRange(0, SIZE)]),
    ("bytes=0-99999", [ByteRange(0, SIZE)]),  # the whole blob, asked as a range: 206, as Go answers
    ("bytes=0-", [ByteRange(0, SIZE)]),
    ("bytes=99999-200000", [ByteRange(99999, 1)]),
    ("bytes=0-1,5-6", [ByteRange(0, 2), ByteRange(5, 2)]),
    ("bytes=0-1, 100000-", [ByteRange(0, 2)]),
    ("bytes=0-1,0-99999", None),  # more than the blob in total: ignored, whole blob
    ("bytes= 0-9 ,", [ByteRange(0, 10)]),
    # every part is read, whatever comes before it (empty, unsatisfiable, open-ended, suffix)
    ("bytes=,0-9", [ByteRange(0, 10)]),
    ("bytes=-0,0-9", [ByteRange(0, 10)]),
    ("bytes=100000-,0-9", [ByteRange(0, 10)]),
    ("bytes=99990-,0-9", [ByteRange(99990, 10), ByteRange(0, 10)]),
    ("bytes=-10,0-9", [ByteRange(SIZE - 10, 10), ByteRange(0, 10)]),
    ("bytes=,", None),  # no part at all: Go serves the whole blob
    ("bytes=0-9223372036854775807", [ByteRange(0, SIZE)]),  # the largest int64 is still a number
])
def test_satisfiable(header: str | None, expected: list[ByteRange] | None) -> None:
    assert parse_range(header, SIZE) == expected


@pytest.mark.parametrize(("header", "unsatisfied"), [
    ("bytes=100000-", True),
    ("bytes=200000-300000", True),
    ("bytes=-0", True),
    ("abc", False),
    ("bytes=5-1", False),
    ("bytes=a-b", False),
    ("bytes=-", False),
    ("bytes=1", False),
    ("items=0-1", False),
    ("bytes=--1", False),
    ("bytes=0-99999999999999999999", False),
    ("bytes=0-9223372036854775808", False),  # past int64: Go's ParseInt fails
    ("bytes=\v0-9", False),  # Go trims only spaces and tabs
    ("bytes=0-9\v", False),
    ("bytes=X0-9", False),
    ("bytes=0-9X", False),
    ("bytes=\u0660-\u0669", False),  # digits, but not ASCII ones (Python's int() would take them)
])
def test_not_satisfiable(header: str, unsatisfied: bool) -> None:
    with pytest.raises(RangeNotSatisfiable) as exc:
        parse_range(header, SIZE)
    assert exc.value.unsatisfied is unsatisfied
    assert str(exc.value) == ("no overlap" if unsatisfied else "invalid range")


@given(st.integers(0, 2 * SIZE) | st.just(0), st.integers(0, 2 * SIZE) | st.sampled_from([SIZE - 1, SIZE]))
def test_single_range_model(start: int, end: int) -> None:
    header = f"bytes={start}-{end}"
    if start > end and start < SIZE:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, SIZE)
        return
    if start >= SIZE:
        with pytest.raises(RangeNotSatisfiable) as exc:
            parse_range(header, SIZE)
        assert exc.value.unsatisfied
        return
    # A satisfiable single range is always a 206 with that range, even when it covers the whole
    # blob (None would mean "ignore the header, answer 200").
    ranges = parse_range(header, SIZE)
    assert ranges is not None
    [r] = ranges
    assert r.start == start and r.end == min(end, SIZE - 1)


@given(st.text(max_size=40))
def test_never_crashes_and_stays_in_bounds(header: str) -> None:
    try:
        ranges = parse_range(header, SIZE)
    except RangeNotSatisfiable:
        return
    for r in ranges or []:
        assert 0 <= r.start < SIZE and r.length >= 1 and r.start + r.length <= SIZE


def test_multipart_layout() -> None:
    plan = plan_multipart([ByteRange(0, 2), ByteRange(5, 2)], SIZE, "application/octet-stream")
    body = plan.part_headers[0] + b"xx" + plan.part_headers[1] + b"yy" + plan.closing
    assert len(body) == plan.content_length
    assert len(plan.boundary) == 60 and int(plan.boundary, 16) >= 0  # 30 random bytes, as Go's writer
    assert body == (f"--{plan.boundary}\r\nContent-Range: bytes 0-1/{SIZE}\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\nxx"
                    f"\r\n--{plan.boundary}\r\nContent-Range: bytes 5-6/{SIZE}\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\nyy"
                    f"\r\n--{plan.boundary}--\r\n").encode()
    assert body.startswith(f"--{plan.boundary}\r\nContent-Range: bytes 0-1/{SIZE}\r\n".encode())
    assert body.endswith(f"\r\n--{plan.boundary}--\r\n".encode())
