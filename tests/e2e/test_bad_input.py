"""Bad input from every side, answered with a clear OCI error and nothing else: a registry that
redirects to or names token realms on other hosts (server-side request forgery), oversized
manifests, blobs longer than declared or not matching their digest, and header injection."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakeregistry import Canned, FakeServer
from tests.support.procs import Component, free_port

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DATA = b"layer bytes " * 100
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
BLOB_PATH = f"/v2/app/blobs/{DIGEST}"


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer("127.0.0.3")  # another host than the trap's
    server.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
    yield server
    server.close()


@pytest.fixture
def trap() -> Iterator[FakeServer]:
    """Where an attacker would like requests to go: it must never be contacted."""
    server = FakeServer("127.0.0.1")
    yield server
    server.close()


def agent_for(tmp_path: Path, registry: FakeServer, **upstream: object) -> Component:
    """An agent in front of the fake registry (node credentials, no swarm)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "pw").write_text("node-password")
    ip = "127.0.0.2"
    return Component("agent", tmp_path, {
        "listen": f"{ip}:{free_port(ip)}", "data_dir": str(tmp_path / "agent"),
        "upstreams": [{"name": registry.host, "url": registry.url, "username": "node",
                       "password": {"file": str(tmp_path / "pw")}, **upstream}],
        "auth": {"unauthenticated": "node"}, "log": {"level": "debug"},
    }).start()


def raw_get(agent: Component, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, complete): complete is False when the connection was cut."""
    host, port = agent.config["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    complete = int(headers.get("content-length", "-1")) == len(body)
    return int(lines[0].split()[1]), headers, body, complete


def blob_routes(fake: FakeServer, get: Canned) -> None:
    fake.routes[("HEAD", BLOB_PATH)] = Canned(200, {"Docker-Content-Digest": DIGEST}, declared_length=len(DATA))
    fake.routes[("GET", BLOB_PATH)] = get


def test_redirect_to_a_host_not_allowed_is_refused(tmp_path: Path, fake: FakeServer, trap: FakeServer) -> None:
    blob_routes(fake, Canned(307, {"Location": f"{trap.url}/metadata"}))
    agent = agent_for(tmp_path, fake)
    try:
        status, _headers, body, _ = raw_get(agent, BLOB_PATH)
        assert status == 503
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert trap.seen == []
        assert agent.running()
    finally:
        agent.stop()


def test_redirect_to_allowed_storage_carries_no_credentials(tmp_path: Path, fake: FakeServer) -> None:
    storage = FakeServer("127.0.0.1")
    try:
        storage.routes[("GET", "/bucket/blob")] = Canned(200, {}, DATA)
        # "localhost" names the storage host; the registry itself is 127.0.0.3
        blob_routes(fake, Canned(307, {"Location": f"http://localhost:{storage.port}/bucket/blob?sig=x"}))
        fake.require_basic = True
        agent = agent_for(tmp_path, fake, redirect_hosts=["localhost"])
        try:
            status, _, body, complete = raw_get(agent, BLOB_PATH)
            assert status == 200
            assert complete
            assert "sha256:" + hashlib.sha256(body).hexdigest() == DIGEST
            assert storage.seen
            assert all("Authorization" not in s.headers for s in storage.seen)
            assert any("Authorization" in s.headers for s in fake.seen if s.path == BLOB_PATH)
        finally:
            agent.stop()
    finally:
        storage.close()


def test_token_realm_elsewhere_gets_no_credentials(tmp_path: Path, fake: FakeServer, trap: FakeServer) -> None:
    challenge = {"WWW-Authenticate": f'Bearer realm="{trap.url}/token",service="fake"',
                 "Content-Type": "application/json"}
    fake.routes[("GET", "/v2/app/manifests/v1")] = Canned(401, challenge, b'{"errors":[]}')
    agent = agent_for(tmp_path, fake)
    try:
        status, _, _, _ = raw_get(agent, "/v2/app/manifests/v1", f"Accept: {MANIFEST}\r\n")
        assert status == 503  # the node credentials would have gone to the trap: the agent refuses
        assert trap.seen == []
        assert agent.running()
    finally:
        agent.stop()
    # allowed realms are used (the trap stands in for a real token server here)
    agent = agent_for(tmp_path / "b", fake, token_realms=[f"{trap.url}/token"])
    try:
        raw_get(agent, "/v2/app/manifests/v1", f"Accept: {MANIFEST}\r\n")
        assert [s.path.split("?")[0] for s in trap.seen] == ["/token"]
    finally:
        agent.stop()


def test_oversized_manifest_is_refused(tmp_path: Path, fake: FakeServer) -> None:
    big = json.dumps({"schemaVersion": 2, "padding": "x" * (5 << 20)}).encode()
    fake.routes[("GET", "/v2/app/manifests/v1")] = Canned(200, {"Content-Type": MANIFEST}, big)
    agent = agent_for(tmp_path, fake)
    try:
        status, _, body, _ = raw_get(agent, "/v2/app/manifests/v1", f"Accept: {MANIFEST}\r\n")
        assert status == 503
        assert "exceeds" in json.loads(body)["errors"][0]["message"]
    finally:
        agent.stop()


@pytest.mark.parametrize("case", ["longer than declared", "wrong bytes", "wrong bytes, large"])
def test_blob_bytes_that_do_not_match_never_complete(tmp_path: Path, fake: FakeServer, case: str) -> None:
    if case == "longer than declared":
        blob_routes(fake, Canned(200, {}, DATA + b"extra" * 1000))
        digest_path, data_len = BLOB_PATH, len(DATA)
    elif case == "wrong bytes":
        blob_routes(fake, Canned(200, {}, b"X" * len(DATA)))
        digest_path, data_len = BLOB_PATH, len(DATA)
    else:  # several chunks: the response has started before the mismatch is known
        real = bytes(range(256)) * 16384  # 4 MiB
        digest = "sha256:" + hashlib.sha256(real).hexdigest()
        digest_path, data_len = f"/v2/app/blobs/{digest}", len(real)
        fake.routes[("HEAD", digest_path)] = Canned(200, {}, declared_length=len(real))
        fake.routes[("GET", digest_path)] = Canned(200, {}, b"Y" * len(real))
    agent = agent_for(tmp_path, fake)
    try:
        status, _, body, complete = raw_get(agent, digest_path)
        if status == 200:
            assert not complete, "a complete 200 with bytes that do not match the digest"
            assert len(body) < data_len
        else:
            assert status == 503
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        cache = tmp_path / "agent" / "cache" / "blobs" / "sha256"
        assert not [p for p in cache.rglob("*") if p.is_file()], "the bad blob was cached"
        assert not list((tmp_path / "agent" / "cache" / "downloads").iterdir())
        assert agent.running()
    finally:
        agent.stop()


def test_header_injection(tmp_path: Path, fake: FakeServer) -> None:
    agent = agent_for(tmp_path, fake)
    try:
        for path in ("/v2/app/manifests/v1?ns=x%0d%0aX-Injected:%20yes",
                     "/v2/app/manifests/v1%0d%0aX-Injected:%20yes",
                     "/v2/app/blobs/sha256:abc%0d%0aX-Injected:%20yes",
                     "/v2/app/tags/list?last=a%0d%0aX-Injected:%20yes"):
            status, headers, body, _ = raw_get(agent, path)
            assert status in (400, 404), path
            assert "x-injected" not in headers, path
            assert json.loads(body)["errors"][0]["code"] in ("NAME_UNKNOWN", "NAME_INVALID", "DIGEST_INVALID",
                                                            "MANIFEST_UNKNOWN", "UNSUPPORTED"), path
        # a Range header with garbage is a range error, not a crash
        status, _, _, _ = raw_get(agent, BLOB_PATH, "Range: bytes=0-1\x0bX\r\n")
        assert status in (404, 416, 400)
        assert agent.running()
    finally:
        agent.stop()
