"""The origin's Seeder and Preseeder in process: a scripted registry behind them, the real tracker
app and a real libtorrent session. Requests for one blob share one fetch; the torrent is the
deterministic one for the blob, signed, registered and seeded; bad registry bytes are never seeded
or kept; a pre-seed job resolves an image to its blobs and reports each one's fate."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from shoal import errors, metainfo, protocol, signing
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal.swarm import SEEDER_FINGERPRINT, Swarm, SwarmSettings
from shoal_origin.preseed import Preseeder
from shoal_origin.registration import TrackerRegistration
from shoal_origin.seeder import Seeder, SeederMetrics, Upstream
from tests.integration.conftest import NODE_TOKEN, REGISTRATION_TOKEN, Keys, tracker_server
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.procs import free_port

TOKEN, NODE = REGISTRATION_TOKEN, NODE_TOKEN
BLOB = random.Random(8).randbytes(2 * (1 << 20) + 777)
DIGEST = Digest(hashlib.sha256(BLOB).hexdigest())
LAYER = random.Random(9).randbytes(300_000)
CONFIG = b'{"architecture":"amd64","os":"linux"}'
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest())


def serve_blob(server: FakeServer, data: bytes) -> None:
    path = f"/v2/private/app/blobs/{digest_of(data)}"
    server.routes[("HEAD", path)] = Canned(200, {}, declared_length=len(data))
    server.routes[("GET", path)] = Canned(200, {}, data)


def manifest() -> bytes:
    def desc(media: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media, "digest": str(digest_of(data)), "size": len(data)}

    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                       "config": desc("application/vnd.oci.image.config.v1+json", CONFIG),
                       "layers": [desc("application/vnd.oci.image.layer.v1.tar+gzip", d) for d in (BLOB, LAYER)]
                       }).encode()


@pytest.fixture
def registry() -> Iterator[FakeServer]:
    server = FakeServer()
    for data in (BLOB, LAYER, CONFIG):
        serve_blob(server, data)
    server.routes[("GET", "/v2/private/app/manifests/v1")] = Canned(200, {"Content-Type": MANIFEST_TYPE}, manifest())
    yield server
    server.close()


@pytest.fixture
async def tracker(monkeypatch: pytest.MonkeyPatch, keys: Keys) -> AsyncIterator[TestServer]:
    async with tracker_server(keys, monkeypatch) as server:
        yield server


@pytest.fixture
async def seeder(tmp_path: Path, registry: FakeServer, tracker: TestServer, keys: Keys) -> AsyncIterator[Seeder]:
    http = aiohttp.ClientSession()
    store = BlobStore(tmp_path / "origin", max_bytes=64 << 20)
    await store.open()
    swarm = Swarm(SwarmSettings(listen_ip="127.0.0.2", listen_port=free_port("127.0.0.2"),
                                fingerprint=SEEDER_FINGERPRINT))
    await swarm.start()
    tracker_url = str(tracker.make_url("")).rstrip("/")
    client = RegistryClient(http, registry.url, credentials=None, user_agent="t", retry_budget=0)
    seeder = Seeder(store=store, swarm=swarm, registration=TrackerRegistration(http, [tracker_url], TOKEN),
                    upstreams={registry.host: Upstream(registry.host, client)},
                    announce=[protocol.ANNOUNCE.url(tracker_url)],
                    max_blob_size=1 << 30, metrics=SeederMetrics(CollectorRegistry()), key=keys.key,
                    token_ttl=600)
    await seeder.start()
    yield seeder
    await seeder.stop()
    await swarm.stop()
    await store.close()
    await http.close()


async def test_one_fetch_a_deterministic_signed_torrent_registered_and_seeded(
        seeder: Seeder, registry: FakeServer, tracker: TestServer, keys: Keys, tmp_path: Path) -> None:
    published = await asyncio.gather(*(seeder.ensure_seeded(registry.host, "private/app", DIGEST) for _ in range(5)))
    assert sum(1 for s in registry.seen if s.method == "GET") == 1
    assert len({p.meta.raw for p in published}) == 1
    meta = published[0].meta
    # the torrent any origin builds for these bytes
    (tmp_path / DIGEST.hex).write_bytes(BLOB)
    assert meta.raw == metainfo.create(tmp_path / DIGEST.hex, DIGEST, announce=seeder.announce,
                                          root_cert=seeder.root_cert)
    signing.verify_metainfo(keys.key.public_key(), meta.raw, published[0].signature)
    assert seeder.store.path(DIGEST).read_bytes() == BLOB
    assert seeder.swarm.job(DIGEST.hex) is not None
    assert DIGEST.hex in seeder.registration.registered  # the tracker tracks it
    again = await seeder.ensure_seeded(registry.host, "private/app", DIGEST)  # cached: no second fetch
    assert again.meta.raw == meta.raw and sum(1 for s in registry.seen if s.method == "GET") == 1


async def test_bad_bytes_are_never_seeded_or_kept(seeder: Seeder, registry: FakeServer) -> None:
    registry.routes[("GET", f"/v2/private/app/blobs/{DIGEST}")] = Canned(200, {}, BLOB[:-1] + b"\x00")
    with pytest.raises(errors.IntegrityError):
        await seeder.ensure_seeded(registry.host, "private/app", DIGEST)
    assert not seeder.store.has(DIGEST)
    assert list(seeder.store.downloads_dir.iterdir()) == []
    assert seeder.swarm.job(DIGEST.hex) is None
    with pytest.raises(errors.NotFound):
        await seeder.ensure_seeded("elsewhere", "private/app", DIGEST)


async def wait_job(preseeder: Preseeder, job_id: str) -> protocol.PreseedJob:
    async with asyncio.timeout(30):
        while preseeder.jobs[job_id].state in ("resolving", "seeding"):
            await asyncio.sleep(0.05)
    return preseeder.jobs[job_id].summary()


async def test_a_preseed_job_seeds_every_blob_of_an_image(seeder: Seeder, registry: FakeServer) -> None:
    preseeder = Preseeder(seeder, concurrency=2)
    try:
        job = preseeder.submit([f"{registry.host}/private/app:v1"], [])
        summary = await wait_job(preseeder, job.id)
        assert summary.state == "done" and summary.errors == []
        assert summary.manifests == [f"{registry.host}/private/app@{digest_of(manifest())}"]
        assert summary.blobs_total == summary.blobs_done == 3
        assert summary.bytes_done == summary.bytes_total == len(BLOB) + len(LAYER) + len(CONFIG)
        for data in (BLOB, LAYER, CONFIG):
            assert seeder.store.path(digest_of(data)).read_bytes() == data
            assert seeder.swarm.job(digest_of(data).hex) is not None
        # a digest that does not match the manifest, an unknown registry, a failing blob
        registry.routes[("GET", f"/v2/private/app/manifests/sha256:{'0' * 64}")] = Canned(
            200, {"Content-Type": MANIFEST_TYPE}, manifest())  # a registry answering the wrong manifest
        pinned = preseeder.submit([f"{registry.host}/private/app@sha256:{'0' * 64}"], [])
        summary = await wait_job(preseeder, pinned.id)
        assert summary.state == "failed" and "does not match its digest" in str(summary.errors)
        with pytest.raises(errors.NotFound):
            preseeder.submit(["elsewhere.example/private/app:v1"], [])
    finally:
        await preseeder.stop()


async def test_a_failing_blob_fails_the_job_and_names_itself(seeder: Seeder, registry: FakeServer) -> None:
    registry.routes[("GET", f"/v2/private/app/blobs/{digest_of(LAYER)}")] = Canned(500)
    preseeder = Preseeder(seeder, concurrency=2)
    try:
        summary = await wait_job(preseeder, preseeder.submit([f"{registry.host}/private/app:v1"], []).id)
        assert summary.state == "failed"
        states = {b.digest: b.state for b in summary.blobs}
        assert states == {str(digest_of(BLOB)): "done", str(digest_of(CONFIG)): "done",
                          str(digest_of(LAYER)): "failed"}
        assert str(digest_of(LAYER)) in str(summary.errors)
    finally:
        await preseeder.stop()


async def test_a_second_registry_is_vouched_for_only_once_it_sent_the_whole_blob(
        seeder: Seeder, registry: FakeServer, tracker: TestServer) -> None:
    """The origin's word that a registry holds a blob (what lets nodes serve it for that registry)
    comes only after that registry sent exactly the blob: every wrong answer is the same refusal
    (so a liar learns nothing, not even the size), a registry that cannot answer is a 503, and
    nothing of what it sent is kept."""
    await seeder.ensure_seeded(registry.host, "private/app", DIGEST)
    assert await seeder.store.sources(DIGEST) == {registry.host}
    other = FakeServer("127.0.0.45")
    path = f"/v2/private/app/blobs/{DIGEST}"
    try:
        async with aiohttp.ClientSession() as http:
            seeder.upstreams[other.host] = Upstream(other.host, RegistryClient(
                http, other.url, credentials=None, user_agent="t", retry_budget=0))
            for answer in (Canned(200, {}, BLOB[:-1]), Canned(200, {}, BLOB + b"x"), Canned(200, {}, bytes(len(BLOB))),
                           Canned(404)):
                other.routes[("GET", path)] = answer
                with pytest.raises(errors.NotFound):
                    await seeder.ensure_seeded(other.host, "private/app", DIGEST)
            other.routes[("GET", path)] = Canned(503)
            with pytest.raises(errors.UpstreamError):
                await seeder.ensure_seeded(other.host, "private/app", DIGEST)
            assert list(seeder.store.downloads_dir.iterdir()) == []
            assert other.host not in await seeder.store.sources(DIGEST)
            other.routes[("GET", path)] = Canned(200, {}, BLOB)
            await seeder.ensure_seeded(other.host, "private/app", DIGEST)
            assert await seeder.store.sources(DIGEST) == {registry.host, other.host}
    finally:
        await asyncio.to_thread(other.close)  # (its shutdown waits out a poll interval)


@contextlib.asynccontextmanager
async def restarted(seeder: Seeder, keys: Keys, *, trackers: list[str], announce: list[str],
                    registry: FakeServer | None = None) -> AsyncIterator[Seeder]:
    """A new Seeder (its own libtorrent session) over `seeder`'s store, started: the origin after a
    restart. With `registry`, it can fetch from it."""
    swarm = Swarm(SwarmSettings(listen_ip="127.0.0.3", listen_port=free_port("127.0.0.3"),
                                fingerprint=SEEDER_FINGERPRINT))
    await swarm.start()
    async with aiohttp.ClientSession() as http:
        upstreams = {} if registry is None else {registry.host: Upstream(registry.host, RegistryClient(
            http, registry.url, credentials=None, user_agent="t", retry_budget=0))}
        again = Seeder(store=seeder.store, swarm=swarm, registration=TrackerRegistration(http, trackers, TOKEN),
                       upstreams=upstreams, announce=announce, max_blob_size=1 << 30,
                       metrics=SeederMetrics(CollectorRegistry()), key=keys.key, token_ttl=600)
        try:
            await again.start()
            yield again
        finally:
            await again.stop()
            await swarm.stop()


async def test_a_restart_with_other_trackers_rewrites_the_kept_torrents(seeder: Seeder, registry: FakeServer,
                                                                       keys: Keys) -> None:
    """attack15: an origin restarted with new tracker URLs kept announcing - its every-blob token
    included - to the URLs in the metainfo it had stored, and named no replica to fail over to.
    The kept torrent now names the configured trackers, with the same info-hash (the same swarm),
    signed again."""
    await seeder.ensure_seeded(registry.host, "private/app", DIGEST)
    before = seeder.swarm.job(DIGEST.hex)
    assert before is not None
    info_hash = before.meta.info_hash
    new = ["https://tracker-a.example/announce", "https://tracker-b.example/announce"]
    async with restarted(seeder, keys, trackers=["http://127.0.0.1:9"], announce=new) as again:
        job = again.swarm.job(DIGEST.hex)
        assert job is not None and job.meta.info_hash == info_hash
        assert job.meta.trackers == tuple(new)
        assert sorted(e["url"].split("?")[0] for e in job.handle.trackers()) == new
        kept = await seeder.store.load_metainfo(DIGEST)
        assert kept is not None and metainfo.parse(kept[0]).trackers == tuple(new)
        signing.verify_metainfo(keys.key.public_key(), kept[0], kept[1])


async def test_a_kept_torrent_of_another_piece_rule_is_made_again(seeder: Seeder, registry: FakeServer, keys: Keys,
                                                                  tracker: TestServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An origin upgraded across a change of piece_size_for keeps the torrents it made before,
    whose pieces another origin (or this one, for a blob it fetches again) no longer builds: two
    torrents for one blob, whose registrations replace each other at the tracker. It does not
    seed such a torrent after the restart, and makes the current one from the kept blob (no
    registry fetch) when the blob is asked for."""
    first = await seeder.ensure_seeded(registry.host, "private/app", DIGEST)
    assert first.meta.piece_length == metainfo.piece_size_for(len(BLOB)) < 256 << 10
    with monkeypatch.context() as m:  # the torrent of the rule before: 256 KiB pieces
        m.setattr(metainfo, "piece_size_for", lambda size: 256 << 10)
        old = await asyncio.to_thread(metainfo.create, seeder.store.path(DIGEST), DIGEST, announce=seeder.announce,
                                      root_cert=seeder.root_cert)
    await seeder.store.save_metainfo(DIGEST, old, signing.sign_metainfo(keys.key, old))
    tracker_url = str(tracker.make_url("")).rstrip("/")
    async with restarted(seeder, keys, trackers=[tracker_url], announce=seeder.announce,
                         registry=registry) as again:
        assert again.swarm.job(DIGEST.hex) is None and not again.is_seeded(DIGEST)
        published = await again.ensure_seeded(registry.host, "private/app", DIGEST)
        assert published.meta.raw == first.meta.raw  # the torrent every origin builds now
        job = again.swarm.job(DIGEST.hex)
        assert job is not None and job.meta.info_hash == first.meta.info_hash
        kept = await seeder.store.load_metainfo(DIGEST)
        assert kept is not None and kept[0] == first.meta.raw
        assert sum(1 for s in registry.seen if s.method == "GET") == 1  # the first fetch only
