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


@pytest.mark.parametrize(("raw", "why"), [
    (b"i03e", "non-canonical integer"), (b"i-0e", "non-canonical integer"), (b"ie", "non-canonical integer"),
    (b"i" + b"1" * 65 + b"e", "non-canonical integer"), (b"i-" + b"1" * 64 + b"e", "non-canonical integer"),
    (b"i1", "unterminated integer"), (b"01:a", "bad string length"),
    (b"5:abc", "string runs past the end of the data"), (b"d1:bi1e1:ai2ee", "dict keys not sorted or not unique"),
    (b"d1:ai1e1:ai2ee", "dict keys not sorted or not unique"), (b"di1ei2ee", "dict key is not a string"),
    (b"l", "unexpected end of bencoded data"), (b"x", "unexpected byte b'x' at 0"),
    (b"i1ei2e", "trailing data after bencoded value"), (b"-1:a", "unexpected byte b'-' at 0"),
    (b"", "unexpected end of bencoded data"), (b"3a", "string without length separator"),
    (b"l" * 100 + b"e" * 100, "bencode nested too deeply"),
    # keys are decoded (then refused) before their type is checked: they count as nesting too
    (b"d" * 5000, "bencode nested too deeply"),
])
def test_rejects_non_canonical(raw: bytes, why: str) -> None:
    """The tracker's answer to a refused metainfo registration carries this reason."""
    with pytest.raises(bencode.BencodeError) as exc:
        bencode.decode(raw)
    assert str(exc.value) == why


def test_integer_length_bound_is_exact() -> None:
    assert bencode.decode(b"i" + b"9" * 64 + b"e") == int("9" * 64)
    assert bencode.decode(b"i-" + b"9" * 63 + b"e") == -int("9" * 63)


def test_nesting_is_bounded_exactly() -> None:
    deepest = b"l" * (bencode.MAX_DEPTH + 1) + b"e" * (bencode.MAX_DEPTH + 1)  # depths 0..MAX_DEPTH
    assert bencode.encode(bencode.decode(deepest)) == deepest
    with pytest.raises(bencode.BencodeError, match="nested too deeply"):
        bencode.decode(b"l" + deepest + b"e")
    in_dicts = b"d1:a" * (bencode.MAX_DEPTH + 1) + b"i1e" + b"e" * (bencode.MAX_DEPTH + 1)
    with pytest.raises(bencode.BencodeError, match="nested too deeply"):
        bencode.decode(in_dicts)
    assert bencode.decode(b"d1:a" * bencode.MAX_DEPTH + b"i1e" + b"e" * bencode.MAX_DEPTH)


def test_text_is_encoded_as_utf8_bytes() -> None:
    assert bencode.encode("añ") == b"3:a\xc3\xb1"
    assert bencode.encode({b"k": ["x"]}) == b"d1:kl1:xee"  # type: ignore[list-item]


@given(st.binary(max_size=200))
def test_decode_never_crashes(raw: bytes) -> None:
    try:
        value = bencode.decode(raw)
    except bencode.BencodeError:
        return
    assert bencode.encode(value) == raw  # whatever decodes is canonical


def test_encode_rejects_what_bencode_cannot_say() -> None:
    with pytest.raises(TypeError, match="no booleans"):
        bencode.encode(True)
    with pytest.raises(TypeError, match="dict keys must be bytes"):
        bencode.encode({"text key": 1})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="cannot bencode float"):
        bencode.encode(1.5)  # type: ignore[arg-type]
