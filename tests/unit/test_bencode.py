from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import bencode

values = st.recursive(
    st.integers(min_value=-(2**62), max_value=2**62) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.binary(max_size=8), children, max_size=5),
    max_leaves=20,
)


@given(values)
def test_round_trip(value: bencode.Value) -> None:
    assert bencode.decode(bencode.encode(value)) == value


def test_known_encoding() -> None:
    doc: bencode.Value = {b"interval": 30, b"peers": b"\x7f\x00\x00\x02\x1a\xe1", b"list": [1, b"a"]}
    assert bencode.encode(doc) == b"d8:intervali30e4:listli1e1:ae5:peers6:\x7f\x00\x00\x02\x1a\xe1e"


@pytest.mark.parametrize("raw", [
    b"i03e", b"i-0e", b"ie", b"i1", b"01:a", b"5:abc", b"d1:bi1e1:ai2ee", b"d1:ai1e1:ai2ee",
    b"di1ei2ee", b"l", b"x", b"i1ei2e", b"-1:a", b"", b"l" * 100 + b"e" * 100,
])
def test_rejects_non_canonical(raw: bytes) -> None:
    with pytest.raises(bencode.BencodeError):
        bencode.decode(raw)


@given(st.binary(max_size=200))
def test_decode_never_crashes(raw: bytes) -> None:
    try:
        value = bencode.decode(raw)
    except bencode.BencodeError:
        return
    assert bencode.encode(value) == raw  # whatever decodes is canonical


def test_encode_rejects_bool() -> None:
    with pytest.raises(TypeError):
        bencode.encode(True)
