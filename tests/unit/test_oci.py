from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import errors
from shoal.oci import Digest, ImageReference, parse_manifest, parse_manifest_reference, validate_name

HEX = "a" * 64


@pytest.mark.parametrize("name", ["app", "private/app", "a/b/c", "my-app_1.x", "a__b", "a--b/c.d"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "", "App", "a//b", "/a", "a/", "../etc", "a/../b", "a/./b", "-a", "a-", "a_", "a%2Fb", "a b", "a:b",
    "a" * 256, "a/.", ".a",
])
def test_invalid_names(name: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        validate_name(name)
    assert exc.value.oci is errors.NAME_INVALID


@pytest.mark.parametrize("text", [
    "sha256:" + HEX[:63], "sha256:" + HEX + "a", "sha256:" + "A" * 64, "sha512:" + "a" * 128, "md5:abc",
    "sha256:../../etc/passwd", "sha256", "sha256:", ":" + HEX, "sha256:" + "g" * 64,
])
def test_invalid_digests(text: str) -> None:
    with pytest.raises(errors.BadRequest) as exc:
        Digest.parse(text)
    assert exc.value.oci is errors.DIGEST_INVALID


@given(st.text(max_size=80))
def test_digest_parse_only_accepts_lower_hex(text: str) -> None:
    try:
        d = Digest.parse(text)
    except errors.BadRequest:
        return
    assert str(d) == text and len(d.hex) == 64 and set(d.hex) <= set("0123456789abcdef")


def test_manifest_reference() -> None:
    assert parse_manifest_reference("v1.0") == "v1.0"
    assert parse_manifest_reference(f"sha256:{HEX}") == Digest(HEX)
    with pytest.raises(errors.BadRequest):
        parse_manifest_reference("sha256:totallywrong")
    with pytest.raises(errors.NotFound):
        parse_manifest_reference("-bad")
    with pytest.raises(errors.NotFound):
        parse_manifest_reference("a" * 129)


@pytest.mark.parametrize(("text", "registry", "name", "tag", "digest"), [
    ("127.0.0.1:5000/private/app:v1", "127.0.0.1:5000", "private/app", "v1", None),
    ("registry.example.com/app", "registry.example.com", "app", "latest", None),
    (f"localhost/app@sha256:{HEX}", "localhost", "app", None, HEX),
    (f"r.io:443/a/b:t@sha256:{HEX}", "r.io:443", "a/b", "t", HEX),
])
def test_image_reference(text: str, registry: str, name: str, tag: str | None, digest: str | None) -> None:
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.name, ref.tag) == (registry, name, tag)
    assert (ref.digest.hex if ref.digest else None) == digest


@pytest.mark.parametrize("text", ["app:v1", "r.io/App:v1", "r.io/app:-x", "r.io/app@sha256:zz", "/app"])
def test_bad_image_reference(text: str) -> None:
    with pytest.raises(errors.ShoalError):
        ImageReference.parse(text)


def test_parse_manifest_and_index() -> None:
    layer = {"mediaType": "x", "digest": f"sha256:{HEX}", "size": 5, "urls": ["http://evil/"]}
    m = parse_manifest(json.dumps({"config": {"digest": "sha256:" + "b" * 64, "size": 2}, "layers": [layer]}).encode(),
                       "application/vnd.oci.image.manifest.v1+json")
    assert not m.is_index
    assert [d.size for d in m.blobs] == [2, 5]
    idx = parse_manifest(json.dumps({"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"digest": f"sha256:{HEX}", "size": 9, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"digest": "sha256:bad", "size": 1},
    ]}).encode(), "")
    assert idx.is_index and [c.platform for c in idx.children] == ["linux/arm64/v8"]
    with pytest.raises(errors.BadRequest):
        parse_manifest(b"not json", "")
