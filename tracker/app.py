"""The tracker's aiohttp application: announce, scrape, registration, ops."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal import errors, metainfo, protocol, signing
from shoal.config import read_token, split_hostport
from shoal.metrics import Known, component_registry
from shoal.oci import Digest
from shoal.web import Guard, add_ops_routes, add_routes, error_middleware
from shoal_tracker import announce as ann
from shoal_tracker import redisstore
from shoal_tracker.config import TrackerConfig
from shoal_tracker.peers import Peer, PeerStore
from shoal_tracker.store import MemorySwarms, MemoryTorrents, StoreUnavailable, Swarms, Torrents
from shoal_tracker.torrents import TorrentRegistry

log = logging.getLogger(__name__)

BENCODE = "text/plain"  # what opentracker and most trackers send
STATUS_SWEEP_EVERY = 1.0  # seconds: the status route counts afresh at most this often


# Every value exported from the start at 0 (shoal.metrics.Known); only these may be counted.
AnnounceResult = Literal["ok", "bad_request", "bad_token", "unknown_torrent", "not_admitted", "store_unavailable"]
ANNOUNCE_RESULTS: tuple[AnnounceResult, ...] = typing.get_args(AnnounceResult)
RegistrationResult = Literal["ok", "unauthorized", "invalid", "bad_signature", "store_unavailable"]
REGISTRATION_RESULTS: tuple[RegistrationResult, ...] = typing.get_args(RegistrationResult)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.announces = Known(Counter("shoal_tracker_announces_total", "Announces by outcome",
                                       ["result"], registry=registry), ANNOUNCE_RESULTS)
        self.scrapes = Counter("shoal_tracker_scrapes_total", "Scrape requests", registry=registry)
        self.stalled = Counter("shoal_tracker_stalled_announces_total",
                               "Announces of leechers whose download stalled, handed the origins' seeders "
                               "first whatever seeders their swarm has (protocol.ANNOUNCE_STALLED)", registry=registry)
        self.registrations = Known(Counter("shoal_tracker_registrations_total", "Metainfo registrations",
                                           ["result"], registry=registry), REGISTRATION_RESULTS)
        self.peers = Gauge("shoal_tracker_peers", "Peers currently tracked", registry=registry)
        self.swarms = Gauge("shoal_tracker_swarms", "Swarms with at least one peer", registry=registry)
        self.torrents = Gauge("shoal_tracker_torrents", "Registered torrents", registry=registry)
        self.unseeded = Gauge("shoal_tracker_torrents_without_seeders",
                              "Registered torrents no live seeder announces (their pulls fall back to the "
                              "registry unless a leecher completes them)", registry=registry)
        self.announce_seconds = Histogram("shoal_tracker_announce_seconds", "Announce handling time",
                                          registry=registry,
                                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1))


def _peer_address(request: web.Request) -> tuple[str, int] | None:
    """The TCP source address. Never `ip=` or X-Forwarded-For: peers cannot speak for others."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return None
    return ann.normalize_ip(str(peer[0])), int(peer[1])


def _stores(config: TrackerConfig) -> tuple[Swarms, Torrents]:
    if config.redis is None:
        peers = PeerStore(ttl=config.ttl, max_peers=config.max_peers_per_torrent,
                          max_per_address=config.max_peers_per_address, zone_gateways=config.zone_gateways,
                          origin_spare=config.origin_spare, spare_window=config.spare_window)
        return (MemorySwarms(peers),
                MemoryTorrents(TorrentRegistry(Path(config.data_dir) if config.data_dir else None)))
    r = config.redis
    host, port = split_hostport(r.address)
    log.info("peers and registrations in Redis at %s, db %d, keys %s*", r.address, r.db, r.prefix)
    client = redisstore.client(host=host, port=port, db=r.db, username=r.username,
                               password=r.password.read("redis.password"), timeout=r.timeout,
                               max_connections=r.max_connections)
    return (redisstore.RedisSwarms(client, prefix=r.prefix, ttl=config.ttl, max_peers=config.max_peers_per_torrent,
                                   max_per_address=config.max_peers_per_address,
                                   zone_gateways=config.zone_gateways, origin_spare=config.origin_spare,
                                   spare_window=config.spare_window),
            redisstore.RedisTorrents(client, prefix=r.prefix, owner=_fingerprint(config)))


def _fingerprint(config: TrackerConfig) -> str:
    assert config.origin_public_key is not None  # validate() requires it
    return hashlib.sha256(Path(config.origin_public_key).read_bytes().strip()).hexdigest()[:32]


class Tracker:
    def __init__(self, config: TrackerConfig, registry: CollectorRegistry, *, registration_token: str,
                 node_token: str, origin_key: Ed25519PublicKey) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self.peers, self.torrents = _stores(config)
        self.counts = {"torrents": 0, "swarms": 0, "peers": 0}
        self.swept_at = -float("inf")
        self.tokens_by_guard: dict[Guard, str] = {"registration": f"Bearer {registration_token}",
                                                  "node": f"Bearer {node_token}"}
        self.origin_key = origin_key
        self.tokens = signing.VerifiedTokens(origin_key)

    def verify_metainfo(self, raw: bytes, signature: str) -> None:
        signing.verify_metainfo(self.origin_key, raw, signature)

    def _bencoded(self, body: bytes) -> web.Response:
        return web.Response(body=body, content_type=BENCODE, headers={"Cache-Control": "no-store"})

    async def announce(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._announce(request)
        except StoreUnavailable as exc:
            # a failure reason, at once: libtorrent moves to the next tracker and retries on
            # shoal's schedule; the peers a node already has keep serving it
            self.metrics.announces.labels("store_unavailable").inc()
            log.warning("announce not answered: %s", exc)
            return self._bencoded(ann.failure(protocol.TRACKER_STORE_UNAVAILABLE))
        finally:
            self.metrics.announce_seconds.observe(time.perf_counter() - started)

    async def _announce(self, request: web.Request) -> web.Response:
        try:
            a = ann.parse_announce(request.rel_url.raw_query_string)
        except ann.AnnounceError as exc:
            self.metrics.announces.labels("bad_request").inc()
            return self._bencoded(ann.failure(str(exc)))
        try:
            member = self.tokens.verify(a.token)
        except signing.SignatureError as exc:
            self.metrics.announces.labels("bad_token").inc()
            return self._bencoded(ann.failure(f"not a swarm member: {exc}"))
        digest_hex = await self.torrents.digest_hex(a.info_hash)
        if digest_hex is None:
            return self._unknown()
        if not member.admits(digest_hex):
            # a node learns who holds a blob only once the origin admitted it to that blob
            self.metrics.announces.labels("not_admitted").inc()
            return self._bencoded(ann.failure("not admitted to this torrent: the swarm token is for another blob"))
        source = _peer_address(request)
        if source is None:
            return self._bencoded(ann.failure("cannot determine peer address"))
        ip = source[0]
        peer = Peer(ip=ip, port=a.port, peer_id=a.peer_id, left=a.left, last_seen=time.monotonic(), zone=a.zone,
                    node=member.node, origin=member.blob == signing.EVERY_BLOB, stalled=a.stalled,
                    first_copy=a.first_copy)
        want = min(a.numwant if a.numwant is not None else self.config.numwant_default,
                   self.config.numwant_max)
        answer = await self.peers.announce(a.info_hash, peer, a.event, want=want)
        if answer is None:
            return self._unknown()
        self.metrics.announces.labels("ok").inc()
        if a.stalled and a.left:
            self.metrics.stalled.inc()
        log.debug("announce %s from %s (%s:%d) event=%s left=%d zone=%s -> %d peers", a.info_hash.hex()[:12],
                  member.node, ip, a.port, a.event or "-", a.left, a.zone or "-", len(answer.peers))
        return self._bencoded(ann.announce_response(
            answer.peers, compact=a.compact, no_peer_id=a.no_peer_id,
            interval=int(self.config.interval),
            min_interval=int(min(self.config.min_interval, self.config.interval)),
            complete=answer.complete, incomplete=answer.incomplete,
        ))

    def _unknown(self) -> web.Response:
        self.metrics.announces.labels("unknown_torrent").inc()
        return self._bencoded(ann.failure("unregistered torrent: this tracker only serves "
                                          "torrents its origin registered"))

    async def scrape(self, request: web.Request) -> web.Response:
        self.metrics.scrapes.inc()
        try:
            hashes = ann.parse_scrape(request.rel_url.raw_query_string)
        except ann.AnnounceError as exc:
            return self._bencoded(ann.failure(str(exc)))
        if not hashes:
            return self._bencoded(ann.failure("full scrape is not supported; name info_hash values"))
        try:
            known = [h for h in hashes if await self.torrents.digest_hex(h) is not None]
            files = await self.peers.stats(known)
        except StoreUnavailable as exc:
            log.warning("scrape not answered: %s", exc)
            return self._bencoded(ann.failure(protocol.TRACKER_STORE_UNAVAILABLE))
        return self._bencoded(ann.scrape_response(files))

    def _digest(self, request: web.Request) -> Digest:
        return Digest.parse(request.match_info["digest"])

    async def put_metainfo(self, request: web.Request) -> web.Response:
        digest = self._digest(request)
        body = await request.read()  # all of it (client_max_size bounds it): a read(n) gave what had arrived
        try:
            meta = metainfo.parse(body)
        except metainfo.MetainfoError as exc:
            self.metrics.registrations.labels("invalid").inc()
            raise errors.BadRequest(errors.INVALID_REQUEST, f"invalid metainfo: {exc}") from None
        if meta.digest != digest:
            self.metrics.registrations.labels("invalid").inc()
            raise errors.BadRequest(errors.INVALID_REQUEST, "metainfo names a different digest")
        signature = request.headers.get(protocol.SIGNATURE_HEADER, "")
        try:
            self.verify_metainfo(body, signature)
        except signing.SignatureError as exc:
            self.metrics.registrations.labels("bad_signature").inc()
            raise errors.BadRequest(errors.INVALID_REQUEST, f"metainfo not signed by the origin: {exc}") from None
        try:
            await self.torrents.register(meta, signature)
            count = await self.torrents.count()
        except StoreUnavailable as exc:
            self.metrics.registrations.labels("store_unavailable").inc()
            log.warning("registration of %s not stored: %s", digest, exc)
            raise errors.Unavailable("the tracker's store is unavailable") from None
        except redisstore.OtherCluster as exc:
            self.metrics.registrations.labels("store_unavailable").inc()
            log.error("registration of %s refused: %s", digest, exc)
            raise errors.Unavailable(str(exc)) from None
        self.metrics.registrations.labels("ok").inc()
        self.metrics.torrents.set(count)
        log.info("registered %s (info-hash %s, %d bytes)", digest, meta.tracker_hash.hex(), meta.size)
        return web.json_response({"digest": str(digest), "info_hash": meta.info_hash.hex()}, status=201)

    async def delete_metainfo(self, request: web.Request) -> web.Response:
        digest = self._digest(request)
        try:
            info_hash = await self.torrents.unregister(digest)
            if info_hash is not None:
                await self.peers.forget(info_hash)
            count = await self.torrents.count()
        except StoreUnavailable as exc:
            log.warning("unregistration of %s not stored: %s", digest, exc)
            raise errors.Unavailable("the tracker's store is unavailable") from None
        if info_hash is None:
            raise errors.NotFound(errors.NOT_FOUND, "not registered")
        self.metrics.torrents.set(count)
        return web.Response(status=204)

    async def status(self, _: web.Request) -> web.Response:
        # Counting is a sweep (with Redis, a walk of every swarm): at most one a second for this
        # unauthenticated route; between them, the last sweep's counts.
        if time.monotonic() - self.swept_at >= STATUS_SWEEP_EVERY:
            with contextlib.suppress(StoreUnavailable):
                await self.sweep()
        return web.json_response(self.counts)

    async def sweep(self) -> None:
        """Expired peers out, gauges in step (every replica; the work is idempotent)."""
        registered = await self.torrents.hashes()
        totals = await self.peers.sweep(registered)
        if totals.expired:
            log.debug("expired %d peers", totals.expired)
        self.counts = {"torrents": len(registered), "swarms": totals.swarms, "peers": totals.peers}
        self.swept_at = time.monotonic()
        self.metrics.torrents.set(len(registered))
        self.metrics.peers.set(totals.peers)
        self.metrics.swarms.set(totals.swarms)
        self.metrics.unseeded.set(totals.unseeded)

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.interval / 2, 1.0))
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("peer sweep skipped: %s", exc)


def build(config: TrackerConfig) -> web.Application:
    registration = read_token(config.registration_token, "registration_token")
    node = read_token(config.node_token, "node_token")
    assert config.origin_public_key is not None  # validate() requires it
    origin_key = signing.load_public_key(config.origin_public_key, "origin_public_key")
    registry = component_registry("tracker")
    tracker = Tracker(config, registry, registration_token=registration, node_token=node, origin_key=origin_key)
    app = web.Application(client_max_size=metainfo.MAX_METAINFO_BYTES + 1024, middlewares=[error_middleware()])

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await tracker.torrents.load(tracker.verify_metainfo)
        with contextlib.suppress(StoreUnavailable):  # not ready until it answers (ready() below)
            await tracker.sweep()
        task = asyncio.create_task(tracker.expire_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await tracker.peers.close()

    async def ready() -> str | None:
        try:
            await tracker.torrents.ping()
        except StoreUnavailable as exc:
            return str(exc)
        return None

    app.cleanup_ctx.append(lifecycle)
    refused = tracker.metrics.registrations.labels("unauthorized").inc
    add_routes(app, [
        # BEP 3/48: peers prove membership with the swarm token in the query (checked inside)
        (protocol.ANNOUNCE, tracker.announce, "public"),
        (protocol.SCRAPE, tracker.scrape, "node"),  # seeder counts tell what is cached
        (protocol.REGISTER_METAINFO, tracker.put_metainfo, "registration"),
        (protocol.UNREGISTER_METAINFO, tracker.delete_metainfo, "registration"),
        (protocol.STATUS, tracker.status, "public"),
    ], tracker.tokens_by_guard, refused={
        protocol.REGISTER_METAINFO: refused, protocol.UNREGISTER_METAINFO: refused,
    })
    add_ops_routes(app, registry, ready)
    return app
