"""The agent's mirror API in process (the app as `build` makes it, lifecycle included) over a
scripted registry: what a client sees for manifests, blobs, ranges, HEAD, unknown blobs and push
verbs, that a second pull comes from the cache, and that every answer is journaled."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shoal import protocol
from shoal_agent import app as agent_app
from shoal_agent import config as agent_config
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.procs import metric_sum, parse_metrics

Client = TestClient[web.Request, web.Application]
BLOB = random.Random(3).randbytes(700_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST,
                                  "size": len(BLOB)}, "layers": []}).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@pytest.fixture
def registry() -> Iterator[FakeServer]:
    server = FakeServer()
    server.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
    server.routes[("*", "/v2/private/app/manifests/v1")] = Canned(
        200, {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": MANIFEST_DIGEST}, MANIFEST)
    server.routes[("HEAD", f"/v2/private/app/blobs/{DIGEST}")] = Canned(200, {}, declared_length=len(BLOB))
    server.routes[("GET", f"/v2/private/app/blobs/{DIGEST}")] = Canned(200, {}, BLOB)
    yield server
    server.close()


@pytest.fixture
async def client(tmp_path: Path, registry: FakeServer, aiohttp_client: Callable[..., Any]) -> Client:
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1", "auth": {"unauthenticated": "node"},
                             "upstreams": [{"name": registry.host, "url": registry.url}]})
    c: Client = await aiohttp_client(agent_app.build(cfg))
    return c


async def raw_get(client: Client, head: bytes) -> bytes:
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head + b"Host: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_client_pulls_through_the_mirror(client: Client, registry: FakeServer) -> None:
    r = await client.get("/v2/")
    assert r.status == 200 and r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    r = await client.get("/v2/private/app/manifests/v1", headers={"Accept": MANIFEST_TYPE})
    assert r.status == 200 and await r.read() == MANIFEST
    assert r.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    blob_path = f"/v2/private/app/blobs/{DIGEST}"
    r = await client.get(blob_path)
    assert r.status == 200 and "sha256:" + hashlib.sha256(await r.read()).hexdigest() == DIGEST
    assert r.headers["Docker-Content-Digest"] == DIGEST
    r = await client.get(blob_path, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and await r.read() == BLOB[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(BLOB)}"
    r = await client.head(blob_path)
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(BLOB) and await r.read() == b""
    gets = sum(1 for s in registry.seen if s.method == "GET" and s.path == blob_path)
    assert gets == 1  # the range, the HEAD and a second pull come from the cache
    r = await client.get(blob_path)
    assert hashlib.sha256(await r.read()).hexdigest() == DIGEST.removeprefix("sha256:")
    samples = parse_metrics(await (await client.get(protocol.METRICS.path())).text())
    assert metric_sum(samples, "shoal_agent_cache_hits_total") >= 3
    assert metric_sum(samples, "shoal_agent_downloads_total", source="registry", result="ok") == 1
    status = await (await client.get(protocol.STATUS.path())).json()
    assert status["cached_blobs"] == 1 and status["journal_records"] >= 6


async def test_what_a_mirror_refuses(client: Client) -> None:
    unknown = "sha256:" + "e" * 64
    r = await client.get(f"/v2/private/app/blobs/{unknown}")
    assert r.status == 404 and (await r.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        r = await client.request(method, f"/v2/private/app/blobs/{DIGEST}")
        assert r.status == 405, method
        assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"
    r = await client.get("/v2/private/app/blobs/sha256:../../etc/passwd")
    assert r.status in (400, 404)
    assert (await r.json())["errors"][0]["code"] in ("DIGEST_INVALID", "NAME_UNKNOWN", "NAME_INVALID")
    r = await client.get(f"/v2/private/app/blobs/{DIGEST}", headers={"Range": "bytes=9999999-"})
    assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(BLOB)}"


async def test_credentials_that_are_not_ascii_are_refused_quietly(client: Client,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    answer = await raw_get(client, f"GET /v2/private/app/blobs/{DIGEST} HTTP/1.1\r\n".encode()
                           + b"Authorization: Bearer \xff\xfe\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "UNAUTHORIZED"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_text_that_is_not_utf8_is_served_and_journaled(client: Client, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp hands bytes that are not UTF-8 on as lone surrogates, which cannot be written as
    UTF-8: a User-Agent or a Range with a byte 0xff made the journal's record fail, so every
    such request was a 500 with a traceback. Each such byte is journaled as U+FFFD."""
    blob = await raw_get(client, f"GET /v2/private/app/blobs/{DIGEST} HTTP/1.1\r\n".encode()
                         + b"User-Agent: pull\xff\xfe\r\n")
    head, _, body = blob.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and "sha256:" + hashlib.sha256(body).hexdigest() == DIGEST
    bad_range = await raw_get(client, f"GET /v2/private/app/blobs/{DIGEST} HTTP/1.1\r\n".encode()
                              + b"Range: bytes=0-9\xff\r\n")
    head, _, body = bad_range.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status in (200, 416)  # (Go's ServeContent: a Range it cannot parse)
    assert status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() == DIGEST
    await client.close()
    starts = journaled_starts(tmp_path / "agent")
    assert [(d["user_agent"], d["range"], d["status"]) for d in starts] == [
        ("pull\ufffd\ufffd", None, 200), (None, "bytes=0-9\ufffd", status)]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.fixture
def two_registries() -> Iterator[tuple[FakeServer, FakeServer]]:
    a, b = FakeServer(), FakeServer()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize(("length", "claimed"), [(5000, 1000), (300_000, 1000), (300_000, 100_000),
                                                 (5000, 6000)])
async def test_a_download_another_registry_started_is_sent_whole_whatever_this_registry_claims(
        tmp_path: Path, aiohttp_client: Callable[..., Any], two_registries: tuple[FakeServer, FakeServer],
        length: int, claimed: int) -> None:
    """(attack22 F1) Registry A's download of a blob is in flight; a client of registry B, whose
    HEAD claims another size, joins it, and the download finishes while the origin confirms that
    B holds the blob. The verified file went out cut to B's claim: a 200 of 1,000 bytes under the
    blob's digest, journaled verified and complete (small-body and sendfile paths alike)."""
    data = random.Random(length + claimed).randbytes(length)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    a, b = two_registries
    for server, declared in ((a, length), (b, claimed)):
        server.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
        server.routes[("GET", f"/v2/private/app/blobs/{digest}")] = Canned(200, {}, data)
        server.routes[("HEAD", f"/v2/private/app/blobs/{digest}")] = Canned(200, {}, declared_length=declared)
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1", "auth": {"unauthenticated": "node"},
                             "upstreams": [{"name": a.host, "url": a.url}, {"name": b.host, "url": b.url}]})
    client: Client = await aiohttp_client(agent_app.build(cfg))
    api = client.app[agent_app.API_KEY]
    joined = asyncio.Event()
    real_get = api.fetcher.get

    def get(*args: Any, **kwargs: Any) -> Any:
        joined.set()
        return real_get(*args, **kwargs)

    async def known(up: Any, blob: Any) -> bool:
        if up.name != b.host:
            return True
        for _ in range(500):  # the origin's round trip, during which A's download finishes
            if api.store.has(blob):
                break
            await asyncio.sleep(0.01)
        assert api.store.has(blob)
        return False

    async def confirm(*args: Any, **kwargs: Any) -> None:
        return None  # the origin vouches that B holds the blob

    api.fetcher.get = get  # type: ignore[method-assign]
    api.provenance.known = known  # type: ignore[method-assign,assignment]
    api.provenance.confirm = confirm  # type: ignore[method-assign]
    first = asyncio.create_task(client.get(f"/v2/private/app/blobs/{digest}?ns={a.host}"))
    await joined.wait()
    r = await client.get(f"/v2/private/app/blobs/{digest}?ns={b.host}")
    body = await r.read()
    r1 = await first
    assert r1.status == 200 and hashlib.sha256(await r1.read()).hexdigest() == digest.removeprefix("sha256:")
    assert r.status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == digest
    assert int(r.headers["Content-Length"]) == length
    await client.close()
    ends = [doc for doc in map(json.loads, b"".join(
        p.read_bytes() for p in sorted((tmp_path / "agent" / "journal").glob("segment-*"))).splitlines())
        if doc["phase"] == "end"]
    assert sorted(doc["bytes"] for doc in ends) == [length, length]


@pytest.mark.parametrize("claimed", [0, 1000, len(BLOB) + 1])
async def test_a_cached_blob_is_sent_whole_whatever_the_registry_head_claims(
        tmp_path: Path, registry: FakeServer, aiohttp_client: Callable[..., Any], claimed: int) -> None:
    """The registry's HEAD says yes (and its Content-Length); the bytes and their length are the
    verified file's. A HEAD claiming 0 or 1000 bytes for a 700 kB blob made the agent answer 200
    with an empty body or the first 1000 bytes."""
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1",
                             "auth": {"unauthenticated": "node", "decision_ttl": "0s", "stale_decision_max_age": "0s"},
                             "upstreams": [{"name": registry.host, "url": registry.url}]})
    client: Client = await aiohttp_client(agent_app.build(cfg))
    blob_path = f"/v2/private/app/blobs/{DIGEST}"
    r = await client.get(blob_path)
    assert r.status == 200 and await r.read() == BLOB  # now cached, verified
    registry.routes[("HEAD", blob_path)] = Canned(200, {}, declared_length=claimed)
    r = await client.get(blob_path)
    body = await r.read()
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(BLOB)
    assert hashlib.sha256(body).hexdigest() == DIGEST.removeprefix("sha256:")
    r = await client.head(blob_path)
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(BLOB)
    r = await client.get(blob_path, headers={"Range": "bytes=-10"})
    assert r.status == 206 and await r.read() == BLOB[-10:]
    assert r.headers["Content-Range"] == f"bytes {len(BLOB) - 10}-{len(BLOB) - 1}/{len(BLOB)}"
    heads = [s for s in registry.seen if s.method == "HEAD" and s.path == blob_path]
    assert len(heads) >= 4  # the registry was asked every time (TTL 0): its yes still counts


async def test_a_registry_claiming_zero_bytes_for_an_uncached_blob_gets_no_empty_200(
        client: Client, registry: FakeServer) -> None:
    blob_path = f"/v2/private/app/blobs/{DIGEST}"
    registry.routes[("HEAD", blob_path)] = Canned(200, {}, declared_length=0)
    for method in ("GET", "HEAD"):
        r = await client.request(method, blob_path)
        assert r.status == 503, method
        if method == "GET":
            assert "claims 0 bytes" in (await r.json())["errors"][0]["message"]


async def test_a_full_journal_stops_serving_with_a_reason(tmp_path: Path, registry: FakeServer,
                                                          aiohttp_client: Callable[..., Any]) -> None:
    """Past its disk budget (shipping behind) the journal takes no more records, and the agent
    serves nothing unrecorded: a 503 that says why, not a full disk. (8 KB references from
    unauthenticated clients wrote 13 MB/s of journal.)"""
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1", "auth": {"unauthenticated": "node"},
                             "journal": {"max_disk_bytes": "8KiB"},
                             "upstreams": [{"name": registry.host, "url": registry.url}]})
    client: Client = await aiohttp_client(agent_app.build(cfg))
    statuses = []
    for _ in range(100):
        r = await client.get("/v2/private/app/manifests/" + "x" * 1000, headers={"Accept": MANIFEST_TYPE})
        statuses.append(r.status)
        if r.status == 503:
            error = (await r.json())["errors"][0]
            assert error["code"] == "UNAVAILABLE" and "journal is full" in error["message"]
            break
    assert statuses[-1] == 503 and len(statuses) > 3  # served (404s) while it had room
    journal = tmp_path / "agent" / "journal"
    assert sum(p.stat().st_size for p in journal.glob("segment-*")) <= 8 << 10
    for _ in range(20):  # smaller records fit a little longer; then a blob too gets a 503
        r = await client.get(f"/v2/private/app/blobs/{DIGEST}")
        if r.status == 503:
            break
        assert r.status == 200 and await r.read() == BLOB
    assert r.status == 503 and "journal is full" in (await r.json())["errors"][0]["message"]
    # the budget, and the end records of responses that had started (one here)
    assert sum(p.stat().st_size for p in journal.glob("segment-*")) <= (8 << 10) + 1024


def journaled_starts(data_dir: Path) -> list[dict[str, Any]]:
    lines = b"".join(p.read_bytes() for p in sorted((data_dir / "journal").glob("segment-*"))).splitlines()
    return [doc for doc in map(json.loads, lines) if doc["phase"] == "start"]


@pytest.mark.parametrize(("ping_status", "confirmed"), [(200, False), (401, True)])
async def test_a_principal_is_marked_claimed_when_the_registry_checks_no_credentials(
        tmp_path: Path, registry: FakeServer, aiohttp_client: Callable[..., Any], ping_status: int,
        confirmed: bool) -> None:
    """A registry without auth answers 200 to any Authorization: the user name in a Basic header
    is then the client's claim, not the registry's word, and the journal says so."""
    registry.routes[("GET", "/v2/")] = Canned(ping_status, {"WWW-Authenticate": 'Basic realm="r"'}
                                              if ping_status == 401 else {}, b"{}")
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1",
                             "upstreams": [{"name": registry.host, "url": registry.url}]})
    client: Client = await aiohttp_client(agent_app.build(cfg))
    basic = "Basic " + base64.b64encode(b"mallory:anything").decode()
    r = await client.get(f"/v2/private/app/blobs/{DIGEST}", headers={"Authorization": basic})
    assert r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == DIGEST.removeprefix("sha256:")
    r = await client.get(f"/v2/private/app/blobs/{DIGEST}")  # anonymous: nothing is claimed
    await r.read()
    await client.close()
    starts = journaled_starts(tmp_path / "agent")
    assert [(d["principal"], d["principal_confirmed"]) for d in starts] == [("mallory", confirmed),
                                                                           ("anonymous", True)]


async def test_a_cookie_the_registry_sets_for_one_client_is_never_sent_for_another(
        tmp_path: Path, registry: FakeServer, aiohttp_client: Callable[..., Any]) -> None:
    """A registry (or the load balancer or token server before it) that sets a session cookie
    on one client's pull must not see it again on anyone's: the agent's one HTTP session serves
    every client, so a kept cookie would speak for the first client on the pulls of the next.
    (aiohttp keeps cookies of a host named by name, not of an IP address: the registry is named
    "localhost" here, as a production registry is named.)"""
    registry.routes[("*", "/v2/private/app/manifests/v1")] = Canned(
        200, {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": MANIFEST_DIGEST,
              "Set-Cookie": "session=alice-only; Path=/"}, MANIFEST)
    named = f"localhost:{registry.port}"
    cfg = agent_config.load({"data_dir": str(tmp_path / "agent"), "node": "n1",
                             "upstreams": [{"name": named, "url": f"http://{named}"}]})
    client: Client = await aiohttp_client(agent_app.build(cfg))
    for user in (b"alice", b"bob", b"alice"):
        basic = "Basic " + base64.b64encode(user + b":secret").decode()
        r = await client.get("/v2/private/app/manifests/v1",
                             headers={"Accept": MANIFEST_TYPE, "Authorization": basic})
        assert r.status == 200 and await r.read() == MANIFEST
        assert "Set-Cookie" not in r.headers  # nor is the registry's cookie handed to the client
    await client.close()
    manifests = [s for s in registry.seen if s.path == "/v2/private/app/manifests/v1"]
    assert len(manifests) == 3
    assert [s.headers.get("Cookie") for s in manifests] == [None, None, None]
