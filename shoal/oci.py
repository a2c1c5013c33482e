"""OCI grammar: repository names, tags, digests, image references, and manifest descriptors.

Everything that turns client input into a file name or an upstream URL goes through here first,
so a digest that reaches the store is always `sha256:` + 64 lowercase hex characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from shoal import errors

# distribution-spec, "Pulling manifests": the name and tag grammar.
NAME_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# The general digest grammar (image-spec descriptor.md), used to tell "a digest we do not
# support" (DIGEST_INVALID) from "not a digest at all".
DIGEST_GRAMMAR_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_HEX_RE = re.compile(r"[a-f0-9]{64}")
# Many clients limit registry host + "/" + name to 255 characters; distribution enforces 255.
MAX_NAME_LENGTH = 255
# containerd refuses manifests above 4 MiB; so do we, before reading more.
MAX_MANIFEST_BYTES = 4 << 20

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_MEDIA_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_MEDIA_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
# What the agent and origin ask the registry for when the client does not say.
DEFAULT_ACCEPT = ", ".join(
    [MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST]
)


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A sha256 digest, the only algorithm shoal stores (distribution's canonical one)."""

    hex: str

    @property
    def algorithm(self) -> str:
        return "sha256"

    def __str__(self) -> str:
        return f"sha256:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `sha256:<64 lowercase hex>`; anything else is DIGEST_INVALID."""
        algo, sep, hexpart = text.partition(":")
        if not sep or algo != "sha256" or not SHA256_HEX_RE.fullmatch(hexpart):
            raise errors.BadRequest(errors.DIGEST_INVALID, detail={"digest": text[:200]})
        return cls(hexpart)


def looks_like_digest(reference: str) -> bool:
    """A manifest reference with a colon is meant as a digest (tags cannot contain one)."""
    return ":" in reference


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise errors.BadRequest(errors.NAME_INVALID, detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        # distribution's router does not match such a path at all and answers 404.
        raise errors.NotFound(errors.MANIFEST_UNKNOWN, detail={"tag": tag[:200]})
    return tag


def parse_manifest_reference(reference: str) -> str | Digest:
    """A manifest reference is a tag or a digest."""
    if looks_like_digest(reference):
        return Digest.parse(reference)
    return validate_tag(reference)


@dataclass(frozen=True, slots=True)
class ImageReference:
    """`host[:port]/name[:tag][@digest]`, the form `shoal seed` and `shoal up` take."""

    registry: str
    name: str
    tag: str | None
    digest: Digest | None

    @property
    def reference(self) -> str:
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.name}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        rest, at, digest_text = text.partition("@")
        digest = Digest.parse(digest_text) if at else None
        registry, slash, path = rest.partition("/")
        if not slash or not registry or not ("." in registry or ":" in registry or registry == "localhost"):
            raise errors.BadRequest(
                errors.NAME_INVALID,
                f"image reference {text!r} must start with a registry host, e.g. registry.example.com/app:v1",
            )
        name, tag = path, None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            name, _, tag = path.rpartition(":")
            validate_tag(tag)
        validate_name(name)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry=registry, name=name, tag=tag, digest=digest)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    """The parts of a manifest or index shoal acts on."""

    media_type: str
    is_index: bool
    children: tuple[Descriptor, ...]  # index entries (manifests)
    blobs: tuple[Descriptor, ...]  # config + layers of an image manifest


def _descriptor(entry: object) -> Descriptor | None:
    if not isinstance(entry, dict):
        return None
    try:
        digest = Digest.parse(str(entry.get("digest", "")))
    except errors.BadRequest:
        return None
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    platform = None
    plat = entry.get("platform")
    if (isinstance(plat, dict) and isinstance(plat.get("os"), str)
            and isinstance(plat.get("architecture"), str)):
        platform = f"{plat['os']}/{plat['architecture']}"
        if isinstance(plat.get("variant"), str) and plat["variant"]:
            platform += f"/{plat['variant']}"
    return Descriptor(str(entry.get("mediaType", "")), digest, size, platform)


def parse_manifest(body: bytes, content_type: str) -> ParsedManifest:
    """Read the descriptors out of a manifest or an index.

    Descriptors that do not parse are skipped: the agent only uses them to learn which blobs a
    repository links and how big they are; the client validates the manifest itself. `urls`
    (foreign layers) are deliberately ignored: shoal never follows them.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # (RecursionError: arrays nested deeper than Python's stack, which the registry's Go
        # parser accepts: a pusher's manifest ended a pre-seed, push-triggered too, with a traceback)
        raise errors.BadRequest(errors.MANIFEST_INVALID, "manifest is not JSON") from exc
    if not isinstance(doc, dict):
        raise errors.BadRequest(errors.MANIFEST_INVALID, "manifest is not a JSON object")
    media_type = str(doc.get("mediaType") or content_type.split(";")[0].strip())
    if "manifests" in doc and isinstance(doc["manifests"], list):
        children = tuple(d for d in map(_descriptor, doc["manifests"]) if d is not None)
        return ParsedManifest(media_type, True, children, ())
    blobs: list[Descriptor] = []
    config = _descriptor(doc.get("config"))
    if config is not None:
        blobs.append(config)
    layers = doc.get("layers")
    if isinstance(layers, list):
        blobs.extend(d for d in map(_descriptor, layers) if d is not None)
    return ParsedManifest(media_type, False, (), tuple(blobs))
