"""The agent answers as distribution does: Range and HEAD on blobs (cached and in flight),
manifests, tags, referrers, and the spec's error codes for malformed requests. `ns` selects
only configured upstreams, with no outbound connection for anything else."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import threading
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import USERS, Images
from tests.support.images import Image
from tests.support.procs import Component
from tests.support.registry import Registry
from tests.support.stack import Stack

AUTH = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
COMPARED = ("content-length", "content-range", "content-type", "docker-content-digest", "etag", "accept-ranges",
            "cache-control", "docker-distribution-api-version")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(hostport: str, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        try:
            body = resp.read()
        except http.client.IncompleteRead as exc:
            # distribution 2.8 sends its 416 with the blob's Content-Length and a short text body
            body = exc.partial
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def at_registry(registry: Registry, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    return fetch(registry.host, method, path, {"Authorization": AUTH, **(headers or {})})


def error_code(answer: Answer) -> str:
    return str(json.loads(answer.body)["errors"][0]["code"])


def parts(answer: Answer) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    boundary = answer.headers["content-type"].split("boundary=")[1].encode()
    out = []
    for chunk in answer.body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.lstrip(b"\r\n").partition(b"\r\n\r\n")
        ranges = [line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-range")]
        out.append((ranges[0], data.removesuffix(b"\r\n")))
    return out


def assert_same(agent: Answer, reg: Answer, what: str) -> None:
    assert agent.status == reg.status, f"{what}: status {agent.status} != registry's {reg.status}"
    if reg.status == 416:
        assert agent.headers.get("content-range") == reg.headers.get("content-range"), what
        return
    if reg.headers.get("content-type", "").startswith("multipart/byteranges"):
        assert agent.headers["content-type"].startswith("multipart/byteranges")
        assert parts(agent) == parts(reg), what
        return
    for h in COMPARED:
        mine, theirs = agent.headers.get(h), reg.headers.get(h)
        assert mine == theirs, f"{what}: {h} {mine!r} != {theirs!r}"
    assert agent.body == reg.body, f"{what}: bodies differ"


RANGE_CASES = [
    None, "bytes=0-99", "bytes=100-", "bytes=-50", "bytes=0-0", "bytes=2000000-9999999", "bytes=9999999-",
    "abc", "bytes=5-1", "bytes=0-1,5-6", "bytes=0-1,0-99999999",
]


@pytest.fixture
def served(stack: Stack, images: Images) -> tuple[Component, Image]:
    image = images.app()
    stack.start(agents=1)
    return stack.agents[0], image


def blob_of_size(image: Image, size_range: tuple[int, int]) -> str:
    return next(b.digest for b in image.blobs.values() if size_range[0] <= b.size < size_range[1])


def test_blob_range_and_head_match_distribution(served: tuple[Component, Image], registry: Registry) -> None:
    agent, image = served
    listen = agent.config["listen"]
    mid = blob_of_size(image, (1 << 20, 10 << 20))  # swarm path
    small = blob_of_size(image, (1, 1 << 20))  # direct path
    # In flight: the first request for each blob is served while it downloads.
    path = f"/v2/private/app/blobs/{mid}"
    assert_same(fetch(listen, "GET", path, {"Range": "bytes=100-"}),
                at_registry(registry, "GET", path, {"Range": "bytes=100-"}), "in-flight range")
    assert_same(fetch(listen, "HEAD", f"/v2/private/app/blobs/{small}"),
                at_registry(registry, "HEAD", f"/v2/private/app/blobs/{small}"), "uncached HEAD")
    for digest in (mid, small):
        path = f"/v2/private/app/blobs/{digest}"
        full = fetch(listen, "GET", path)
        assert "sha256:" + hashlib.sha256(full.body).hexdigest() == digest
        for method in ("GET", "HEAD"):
            for rng in RANGE_CASES:
                headers = {"Range": rng} if rng else {}
                assert_same(fetch(listen, method, path, headers), at_registry(registry, method, path, headers),
                            f"{method} {digest[:15]} Range={rng}")
        etag = full.headers["etag"]
        for headers in ({"If-None-Match": etag}, {"If-Range": etag, "Range": "bytes=0-9"},
                        {"If-Range": '"other"', "Range": "bytes=0-9"}):
            agent_answer, reg_answer = fetch(listen, "GET", path, headers), at_registry(registry, "GET", path, headers)
            assert agent_answer.status == reg_answer.status, headers
            assert agent_answer.body == reg_answer.body, headers


def test_manifests_tags_and_referrers_match(served: tuple[Component, Image], registry: Registry) -> None:
    agent, image = served
    listen = agent.config["listen"]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for ref in ("v1", image.digest):
        for method in ("GET", "HEAD"):
            path = f"/v2/private/app/manifests/{ref}"
            a, r = fetch(listen, method, path, accept), at_registry(registry, method, path, accept)
            assert a.status == r.status == 200
            for h in ("content-type", "docker-content-digest", "content-length"):
                assert a.headers.get(h) == r.headers.get(h), (method, ref, h)
            assert a.body == r.body
            if method == "GET":
                assert "sha256:" + hashlib.sha256(a.body).hexdigest() == image.digest
    for path in ("/v2/private/app/tags/list", "/v2/private/app/tags/list?n=1",
                 f"/v2/private/app/referrers/{image.digest}", "/v2/private/app/manifests/nosuchtag",
                 "/v2/private/nosuch/tags/list"):
        a, r = fetch(listen, "GET", path), at_registry(registry, "GET", path)
        assert (a.status, a.body) == (r.status, r.body), path
    assert json.loads(fetch(listen, "GET", "/v2/private/app/tags/list").body) == {"name": "private/app", "tags": ["v1"]}
    root = fetch(listen, "GET", "/v2/")
    assert root.status == 200 and root.headers["docker-distribution-api-version"] == "registry/2.0"


MALFORMED = [
    ("GET", "/v2/private/app/blobs/sha256:abc", 400, "DIGEST_INVALID"),
    ("GET", "/v2/private/app/blobs/sha512:" + "a" * 128, 400, "DIGEST_INVALID"),
    ("GET", "/v2/private/app/blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
    ("GET", "/v2/private/app/blobs/sha256:../../../etc/passwd", 404, "NAME_UNKNOWN"),
    ("GET", "/v2/private/app/blobs/sha256:..%2f..%2fetc%2fpasswd", 400, "NAME_INVALID"),
    ("GET", "/v2/private%2fapp/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("GET", "/v2/%2e%2e/%2e%2e/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("GET", "/v2/Private/App/blobs/sha256:" + "a" * 64, 400, "NAME_INVALID"),
    ("GET", "/v2/private//app/manifests/v1", 400, "NAME_INVALID"),
    ("GET", "/v2/" + "a" * 300 + "/manifests/v1", 400, "NAME_INVALID"),
    ("GET", "/v2/private/app/blobs/sha256:" + "a" * 64, 404, "BLOB_UNKNOWN"),
    ("GET", "/v2/private/app/manifests/sha256:totallywrong", 400, "DIGEST_INVALID"),
    ("GET", "/v2/private/app/manifests/-notatag", 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/private/app/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"),
    ("POST", "/v2/private/app/blobs/uploads/", 405, "UNSUPPORTED"),
    ("PATCH", "/v2/private/app/blobs/uploads/abc", 405, "UNSUPPORTED"),
    ("PUT", "/v2/private/app/manifests/v1", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/private/app/manifests/v1", 405, "UNSUPPORTED"),
    ("DELETE", "/v2/private/app/blobs/sha256:" + "a" * 64, 405, "UNSUPPORTED"),
    ("POST", "/v2/", 405, "UNSUPPORTED"),
    ("GET", "/v2/_catalog", 404, "NAME_UNKNOWN"),
]


def test_malformed_requests_get_spec_errors(served: tuple[Component, Image]) -> None:
    agent, _ = served
    for method, path, status, code in MALFORMED:
        answer = fetch(agent.config["listen"], method, path)
        assert (answer.status, error_code(answer)) == (status, code), (method, path)
        assert answer.headers["content-type"].startswith("application/json")


def test_blob_is_only_served_under_a_repository_that_links_it(served: tuple[Component, Image],
                                                              registry: Registry, images: Images) -> None:
    agent, image = served
    images.multi()  # another repository exists
    listen = agent.config["listen"]
    digest = blob_of_size(image, (1 << 20, 10 << 20))
    assert fetch(listen, "GET", f"/v2/private/app/blobs/{digest}").status == 200  # now cached
    for repo in ("private/multi", "private/nosuch"):
        a = fetch(listen, "GET", f"/v2/{repo}/blobs/{digest}")
        r = at_registry(registry, "GET", f"/v2/{repo}/blobs/{digest}")
        assert a.status == r.status == 404
        assert error_code(a) == "BLOB_UNKNOWN"
        assert a.body.find(b"\x00") == -1 and len(a.body) < 1000  # no blob bytes


class Listener:
    """A TCP listener that records whether anything connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_ns_selects_configured_upstreams_only(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    trap = Listener()
    try:
        stack.start_tracker()
        stack.start_origin()
        # two upstreams: the real registry and one named after the trap (never to be contacted
        # by a request that does not name it exactly)
        upstreams = [stack.upstream(stack.node_user, stack.node_password),
                     {"name": "trap.example.com", "url": f"http://127.0.0.1:{trap.port}"}]
        agent = stack.start_agent(upstreams=upstreams)
        listen = agent.config["listen"]
        path = "/v2/private/app/manifests/v1"
        ok = fetch(listen, "GET", f"{path}?ns={registry.host}")
        assert ok.status == 200 and "sha256:" + hashlib.sha256(ok.body).hexdigest() == image.digest
        for query in ("", f"?ns=127.0.0.1:{trap.port}", "?ns=169.254.169.254", f"?ns={registry.host}@evil",
                      f"?ns=127.0.0.1:{trap.port}/x?", "?ns=trap.example.com.", f"?ns={registry.host}&ns=x"):
            answer = fetch(listen, "GET", f"{path}{query}")
            assert answer.status == 404, query
            assert error_code(answer) == "NAME_UNKNOWN"
        assert trap.connections == 0
        digest = blob_of_size(image, (1 << 20, 10 << 20))
        assert fetch(listen, "GET", f"/v2/private/app/blobs/{digest}?ns=127.0.0.1:{trap.port}").status == 404
        assert trap.connections == 0
    finally:
        trap.close()
