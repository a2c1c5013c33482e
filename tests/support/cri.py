"""A small CRI image-service client (what kubelet calls), over containerd's gRPC unix socket.

Debian 12 packages neither crictl nor kubelet, so the tests speak CRI themselves: grpcio carries
the calls, and the few protobuf messages are encoded and decoded by hand here (no codegen step at
test time). Field numbers and service names are those of kubernetes/cri-api
`pkg/apis/runtime/v1/api.proto` (package runtime.v1; containerd 1.6 serves it):

    service ImageService { ListImages, ImageStatus, PullImage, ... }
    message ImageSpec          { string image = 1; }
    message AuthConfig         { string username = 1; string password = 2; string auth = 3;
                                 string server_address = 4; string identity_token = 5;
                                 string registry_token = 6; }
    message PullImageRequest   { ImageSpec image = 1; AuthConfig auth = 2; PodSandboxConfig sandbox_config = 3; }
    message PullImageResponse  { string image_ref = 1; }
    message ImageStatusRequest { ImageSpec image = 1; bool verbose = 2; }
    message ImageStatusResponse{ Image image = 1; map<string, string> info = 2; }
    message ImageFilter        { ImageSpec image = 1; }
    message ListImagesRequest  { ImageFilter filter = 1; }
    message ListImagesResponse { repeated Image images = 1; }
    message Image              { string id = 1; repeated string repo_tags = 2; repeated string repo_digests = 3;
                                 uint64 size = 4; ... }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc

SERVICE = "/runtime.v1.ImageService/"

# protobuf wire types
VARINT, LEN = 0, 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string or embedded message)."""
    return _varint(number << 3 | LEN) + _varint(len(payload)) + payload


def _string(number: int, value: str) -> bytes:
    # proto3 leaves fields at their default (empty) out of the encoding
    return _field(number, value.encode()) if value else b""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    n, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return n, pos
        shift += 7


def decode(data: bytes) -> dict[int, list[bytes | int]]:
    """One message's fields by number: varints as ints, length-delimited fields as bytes
    (the caller knows which are strings and which are messages); fixed-width ones are skipped."""
    fields: dict[int, list[bytes | int]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(value)
        elif wire == LEN:
            size, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(data[pos:pos + size])
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _strings(fields: dict[int, list[bytes | int]], number: int) -> list[str]:
    return [v.decode() for v in fields.get(number, []) if isinstance(v, bytes)]


@dataclass(frozen=True)
class Auth:
    """AuthConfig as kubelet fills it from a pull secret: username and password, and
    `server_address` left empty unless the test sets it (kubelet's keyring leaves it empty:
    containerd then answers any host's challenge with these credentials, see ParseAuth in
    containerd's pkg/cri/server/image_pull.go)."""

    username: str = ""
    password: str = ""
    server_address: str = ""

    def encode(self) -> bytes:
        return _string(1, self.username) + _string(2, self.password) + _string(4, self.server_address)


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    size: int = 0

    @classmethod
    def decode(cls, data: bytes) -> CriImage:
        f = decode(data)
        size = f.get(4, [0])[0]
        return cls(id=_strings(f, 1)[0], repo_tags=_strings(f, 2), repo_digests=_strings(f, 3),
                   size=size if isinstance(size, int) else 0)


def _image_spec(ref: str) -> bytes:
    return _string(1, ref)


class ImageService:
    """runtime.v1.ImageService on a containerd socket (unary calls, raw bytes in and out)."""

    def __init__(self, socket: Path, *, timeout: float = 180.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.timeout = timeout

    def _call(self, method: str, request: bytes) -> bytes:
        # no serializers: grpcio passes the bytes through as they are
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(SERVICE + method)
        return stub(request, timeout=self.timeout)

    def pull(self, ref: str, auth: Auth | None = None) -> str:
        """PullImage; returns the image_ref (the config digest). Raises grpc.RpcError on failure."""
        request = _field(1, _image_spec(ref)) + (_field(2, auth.encode()) if auth else b"")
        return _strings(decode(self._call("PullImage", request)), 1)[0]

    def status(self, ref: str) -> CriImage | None:
        """ImageStatus: the image, or None when the runtime does not have it."""
        images = decode(self._call("ImageStatus", _field(1, _image_spec(ref)))).get(1, [])
        return CriImage.decode(images[0]) if images and isinstance(images[0], bytes) else None

    def list(self) -> list[CriImage]:
        return [CriImage.decode(v) for v in decode(self._call("ListImages", b"")).get(1, []) if isinstance(v, bytes)]

    def close(self) -> None:
        self.channel.close()
