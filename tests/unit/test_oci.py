from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal import errors
from shoal.oci import (
    Descriptor,
    Digest,
    ImageReference,
    ParsedManifest,
    parse_manifest,
    parse_manifest_reference,
    validate_name,
)

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


def test_image_reference_str_round_trips() -> None:
    """`shoal seed` jobs list the images as str(ref), and the origin's errors name them so."""
    for text in ["127.0.0.1:5000/private/app:v1", f"localhost/app@sha256:{HEX}", f"r.io:443/a/b:t@sha256:{HEX}"]:
        assert str(ImageReference.parse(text)) == text
    assert str(ImageReference.parse("registry.example.com/app")) == "registry.example.com/app:latest"


def test_registry_host_with_a_port_but_no_dot() -> None:
    ref = ImageReference.parse("myregistry:5000/app")
    assert (ref.registry, ref.name, ref.tag, ref.digest) == ("myregistry:5000", "app", "latest", None)


NO_HOST = "must start with a registry host, e.g. registry.example.com/app:v1"


@pytest.mark.parametrize(("text", "kind", "oci", "message"), [
    # the answer a `shoal seed` user or an audit query reads (origin's 400 body)
    ("app:v1", errors.BadRequest, errors.NAME_INVALID, f"image reference 'app:v1' {NO_HOST}"),
    ("r.io:5000", errors.BadRequest, errors.NAME_INVALID, f"image reference 'r.io:5000' {NO_HOST}"),
    ("docker/app:v1", errors.BadRequest, errors.NAME_INVALID, f"image reference 'docker/app:v1' {NO_HOST}"),
    ("/app", errors.BadRequest, errors.NAME_INVALID, f"image reference '/app' {NO_HOST}"),
    ("r.io/App:v1", errors.BadRequest, errors.NAME_INVALID, "invalid repository name"),
    # a colon before the last path component is not a tag separator: the name is invalid
    ("r.io/a:b/c", errors.BadRequest, errors.NAME_INVALID, "invalid repository name"),
    ("r.io/a/b:c/d", errors.BadRequest, errors.NAME_INVALID, "invalid repository name"),
    ("r.io/a:x/b:t", errors.BadRequest, errors.NAME_INVALID, "invalid repository name"),
    ("r.io/app:-x", errors.NotFound, errors.MANIFEST_UNKNOWN, "manifest unknown"),
    ("r.io/app@sha256:zz", errors.BadRequest, errors.DIGEST_INVALID, "provided digest is invalid"),
])
def test_bad_image_reference(text: str, kind: type[errors.ShoalError], oci: errors.OciCode, message: str) -> None:
    with pytest.raises(kind) as exc:
        ImageReference.parse(text)
    assert exc.value.oci is oci and exc.value.message == message


def test_error_details_name_the_input_truncated() -> None:
    """The detail is part of the OCI error body the client reads; long input is cut."""
    with pytest.raises(errors.BadRequest) as exc:
        Digest.parse("md5:abc")
    assert exc.value.detail == {"digest": "md5:abc"}
    long_digest = "sha256:" + "z" * 300
    with pytest.raises(errors.BadRequest) as exc:
        Digest.parse(long_digest)
    assert exc.value.detail == {"digest": long_digest[:200]}
    with pytest.raises(errors.BadRequest) as exc:
        validate_name("A" * 400)
    assert exc.value.detail == {"name": "A" * 300}
    with pytest.raises(errors.NotFound) as not_found:
        parse_manifest_reference("-" * 300)
    assert not_found.value.detail == {"tag": "-" * 200}


def test_name_length_bound_is_inclusive() -> None:
    assert validate_name("a" * 255) == "a" * 255


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


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_parse_manifest_fields_exactly() -> None:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "b" * 64, "size": 2}
    layers = [
        {"digest": f"sha256:{HEX}", "size": 0},  # an empty layer is a blob like any other; no mediaType: ""
        {"digest": f"sha256:{HEX}", "size": True}, {"digest": f"sha256:{HEX}", "size": "5"},
        {"digest": f"sha256:{HEX}", "size": -1}, {"size": 1},
    ]
    m = parse_manifest(json.dumps({"config": config, "layers": layers}).encode(), f"{OCI_MANIFEST}; charset=utf-8")
    assert m == ParsedManifest(OCI_MANIFEST, False, (), (
        Descriptor("application/vnd.oci.image.config.v1+json", Digest("b" * 64), 2, None),
        Descriptor("", Digest(HEX), 0, None),
    ))
    assert m.is_index is False and m.blobs[0].platform is None
    # the document's own mediaType wins over the Content-Type
    m = parse_manifest(json.dumps({"mediaType": "x/y", "layers": []}).encode(), OCI_MANIFEST)
    assert m == ParsedManifest("x/y", False, (), ())


def test_parse_index_fields_exactly() -> None:
    children = [
        {"mediaType": OCI_MANIFEST, "digest": f"sha256:{HEX}", "size": 9,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"digest": "sha256:" + "c" * 64, "size": 3, "platform": {"os": "linux", "architecture": "arm", "variant": ""}},
    ]
    idx = parse_manifest(json.dumps({"manifests": children}).encode(), "application/vnd.oci.image.index.v1+json")
    assert idx == ParsedManifest("application/vnd.oci.image.index.v1+json", True, (
        Descriptor(OCI_MANIFEST, Digest(HEX), 9, "linux/amd64"),
        Descriptor("", Digest("c" * 64), 3, "linux/arm"),
    ), ())


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "manifest is not JSON"), (b"\x80", "manifest is not JSON"),
    (b"[1]", "manifest is not a JSON object"),
])
def test_parse_manifest_refusals(body: bytes, message: str) -> None:
    """A pre-seed job reports this message to the operator."""
    with pytest.raises(errors.BadRequest) as exc:
        parse_manifest(body, OCI_MANIFEST)
    assert exc.value.oci is errors.MANIFEST_INVALID and exc.value.message == message


def test_a_manifest_nested_past_pythons_stack_is_invalid_not_a_500() -> None:
    # a registry (Go: 10,000 levels) stores what Python's parser cannot read: anyone who may push
    # ended the pre-seed of it (on push, too) with a RecursionError and its traceback (attack17)
    body = b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(errors.BadRequest):
        parse_manifest(body, "application/vnd.oci.image.manifest.v1+json")
