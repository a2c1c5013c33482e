"""Bencode (BEP 3), strict: canonical integers, sorted unique dict keys, bounded nesting.

Used by the tracker for announce/scrape answers and by whoever inspects metainfo. Input from
the network is untrusted, so decoding rejects anything non-canonical instead of guessing.
"""

from __future__ import annotations

from typing import TypeAlias

Value: TypeAlias = int | bytes | list["Value"] | dict[bytes, "Value"]

MAX_DEPTH = 64


class BencodeError(ValueError):
    """The input is not canonical bencode."""


def encode(value: Value | str) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Value | str, out: list[bytes]) -> None:
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        out.append(b"i%de" % value)
    elif isinstance(value, bytes):
        out.append(b"%d:" % len(value))
        out.append(value)
    elif isinstance(value, str):
        _encode(value.encode(), out)
    elif isinstance(value, list):
        out.append(b"l")
        for item in value:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(value, dict):
        out.append(b"d")
        for key in sorted(value):
            if not isinstance(key, bytes):
                raise TypeError("bencode dict keys must be bytes")
            _encode(key, out)
            _encode(value[key], out)
        out.append(b"e")
    else:
        raise TypeError(f"cannot bencode {type(value).__name__}")


def decode(data: bytes) -> Value:
    value, end = _decode(data, 0, 0)
    if end != len(data):
        raise BencodeError("trailing data after bencoded value")
    return value


def _decode(data: bytes, pos: int, depth: int) -> tuple[Value, int]:
    if depth > MAX_DEPTH:
        raise BencodeError("bencode nested too deeply")
    if pos >= len(data):
        raise BencodeError("unexpected end of bencoded data")
    lead = data[pos : pos + 1]
    if lead == b"i":
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise BencodeError("unterminated integer")
        digits = data[pos + 1 : end]
        if not _canonical_int(digits):
            raise BencodeError("non-canonical integer")
        return int(digits), end + 1
    if lead == b"l":
        items: list[Value] = []
        pos += 1
        while data[pos : pos + 1] != b"e":
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos + 1
    if lead == b"d":
        result: dict[bytes, Value] = {}
        pos += 1
        last: bytes | None = None
        while data[pos : pos + 1] != b"e":
            key, pos = _decode(data, pos, depth + 1)
            if not isinstance(key, bytes):
                raise BencodeError("dict key is not a string")
            if last is not None and key <= last:
                raise BencodeError("dict keys not sorted or not unique")
            last = key
            result[key], pos = _decode(data, pos, depth + 1)
        return result, pos + 1
    if lead.isdigit():
        colon = data.find(b":", pos)
        if colon < 0:
            raise BencodeError("string without length separator")
        digits = data[pos:colon]
        if not _canonical_int(digits) or digits.startswith(b"-"):
            raise BencodeError("bad string length")
        length = int(digits)
        start = colon + 1
        if start + length > len(data):
            raise BencodeError("string runs past the end of the data")
        return data[start : start + length], start + length
    raise BencodeError(f"unexpected byte {lead!r} at {pos}")


def _canonical_int(digits: bytes) -> bool:
    if not digits or len(digits) > 64:
        return False
    body = digits[1:] if digits.startswith(b"-") else digits
    if not body.isdigit():
        return False
    if body.startswith(b"0") and len(body) > 1:
        return False
    return not (digits.startswith(b"-") and body == b"0")
