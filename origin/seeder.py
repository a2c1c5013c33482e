"""Blob -> verified file -> torrent -> registered at the tracker -> seeded. One flight per digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import typing
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry, Counter, Histogram

from shoal import errors, metainfo, peercerts, signing
from shoal.flights import SingleFlight
from shoal.metainfo import Published
from shoal.metrics import Known
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal.swarm import Grant, Swarm
from shoal_origin.registration import TrackerRegistration
from shoal_origin.relay import FetchProgress

log = logging.getLogger(__name__)

# A registry confirms it holds a blob within this long, plus the blob's size at this rate.
CONFIRM_DEADLINE = 60.0
CONFIRM_RATE = 1 << 20
# An admission for a seeded blob registers it at the tracker again at most this often.
REGISTER_AGAIN = 10.0


# Seed requests' results, each exported from the start at 0: how a blob was had, or the class of
# the error that failed it (one of shoal/errors.py's fixed hierarchy; see error_result).
SeedOutcome = Literal["cached", "fetched", "source_refused"]
SEED_ERRORS: tuple[str, ...] = tuple(
    name for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.ShoalError) and cls is not errors.ConfigError)
SEED_RESULTS: tuple[str, ...] = (*typing.get_args(SeedOutcome), *SEED_ERRORS)


def error_result(exc: errors.ShoalError) -> str:
    """The seed result for a failure: its class, or the nearest one shoal/errors.py defines
    (a subclass from elsewhere is not a new series)."""
    for cls in type(exc).__mro__:
        if cls.__module__ == errors.__name__ and cls.__name__ in SEED_ERRORS:
            return cls.__name__
    return errors.ShoalError.__name__


class SeederMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Known(Counter("shoal_origin_seed_requests_total", "Seed requests by outcome",
                                      ["result"], registry=registry), SEED_RESULTS)
        self.registry_bytes = Counter("shoal_origin_registry_bytes_total",
                                      "Blob bytes fetched from the origin registry", registry=registry)
        self.fetch_seconds = Histogram("shoal_origin_fetch_seconds",
                                       "Time to fetch, verify and hash a blob into a torrent",
                                       registry=registry, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300))


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    client: RegistryClient


class Seeder:
    def __init__(
        self, *, store: BlobStore, swarm: Swarm, registration: TrackerRegistration,
        upstreams: dict[str, Upstream], announce: list[str], max_blob_size: int, metrics: SeederMetrics,
        key: Ed25519PrivateKey, token_ttl: float,
    ) -> None:
        self.store = store
        self.swarm = swarm
        self.registration = registration
        self.upstreams = upstreams
        self.announce = announce
        self.max_blob_size = max_blob_size
        self.metrics = metrics
        self.key = key
        self.token_ttl = token_ttl
        self.root_cert = peercerts.ca_certificate(key)
        self._flights: SingleFlight[Digest, Published] = SingleFlight()
        self._confirmations: SingleFlight[tuple[str, Digest], None] = SingleFlight()
        self._metas: dict[Digest, Published] = {}
        self._registered_at: dict[Digest, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        # The blobs being fetched now, for relays to follow (origin/relay.py)
        self.fetching: dict[Digest, FetchProgress] = {}
        # With several origins another owner may still seed an evicted blob: its torrent stays
        # registered at the tracker (registering it again is idempotent).
        self.unregister_on_evict = True

    async def start(self) -> None:
        """Seed every blob the store kept across a restart and register it again."""
        self._admit_self()
        self._spawn(self._renew_own_token())
        for digest in self.store.digests():
            kept = await self.store.load_metainfo(digest)
            if kept is None:
                continue
            raw, signature = kept
            try:
                meta = metainfo.parse(raw)
                if meta.piece_length != metainfo.piece_size_for(meta.size):
                    # made by a version with another piece rule: every origin must build the
                    # same torrent (the tracker keeps one per blob, and two owners with two
                    # torrents would replace each other's registration). The next admission
                    # builds it anew from the kept blob.
                    log.info("%s: its kept torrent has %d-byte pieces, not %d: made again when asked",
                             digest, meta.piece_length, metainfo.piece_size_for(meta.size))
                    continue
                if meta.trackers != tuple(self.announce):
                    # the trackers changed since it was made: a torrent kept as it was would go
                    # on sending this origin's every-blob token (and the agents' tokens) to the
                    # old address, and name no replica to fail over to
                    raw = metainfo.with_trackers(raw, self.announce)
                    fresh = metainfo.parse(raw)
                    if fresh.info_hash != meta.info_hash:
                        continue
                    meta, signature = fresh, signing.sign_metainfo(self.key, raw)
                    await self.store.save_metainfo(digest, raw, signature)
            except metainfo.MetainfoError:
                continue
            self._metas[digest] = Published(meta, signature)
            self.swarm.add(meta, self.store.blob_dir(digest), seed=True)
        self.store.add_evict_hook(self._on_evict)
        self.swarm.on_tracker_error = self._on_tracker_error
        self._spawn(self._register(list(self._metas.values())))
        log.info("seeding %d blobs from the cache", len(self._metas))

    def _admit_self(self) -> None:
        """The origin takes part in every swarm (it seeds them all): its own grant is for `*`."""
        token, certificate = peercerts.issue_grant(self.key, "origin", self.swarm.key.public_key,
                                                   signing.EVERY_BLOB, self.token_ttl)
        self.swarm.set_default_grant(Grant(token, certificate))

    async def _renew_own_token(self) -> None:
        while True:
            await asyncio.sleep(self.token_ttl / 2)
            self._admit_self()

    async def _register(self, published: list[Published]) -> None:
        """Register (retrying while the tracker is away), then announce at once: an announce
        refused before registration makes libtorrent back off for a whole interval."""
        await self.registration.keep_registered([(p.meta, p.signature) for p in published])
        for p in published:
            job = self.swarm.job(p.meta.digest.hex)
            if job is not None:
                self.swarm.force_reannounce(job)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._flights.cancel_all()

    def _on_tracker_error(self, name: str, reason: str) -> None:
        # A tracker that restarted without persistence forgets registrations: register again.
        if "unregistered" in reason:
            published = next((p for p in self._metas.values() if p.meta.digest.hex == name), None)
            if published is not None and published.meta.digest.hex in self.registration.registered:
                self.registration.registered.discard(published.meta.digest.hex)
                self._spawn(self._register([published]))

    async def _on_evict(self, digest: Digest) -> None:
        self._registered_at.pop(digest, None)
        published = self._metas.pop(digest, None)
        await self.swarm.remove(digest.hex)
        if published is not None:
            if self.unregister_on_evict:
                await self.registration.unregister(published.meta)
            else:
                self.registration.registered.discard(published.meta.digest.hex)

    def seeded(self) -> list[Published]:
        return list(self._metas.values())

    def is_seeded(self, digest: Digest) -> bool:
        return digest in self._metas and self.store.has(digest)

    async def ensure_seeded(self, ns: str, repo: str, digest: Digest) -> Published:
        """The signed metainfo of `digest`, fetching and seeding it first if needed, once the
        registry `ns` is known to hold it (the blob came from there, or was fetched from there
        again and matched its digest): the answer vouches for (ns, digest)."""
        published = self._metas.get(digest)
        if published is not None and self.store.has(digest):
            await self._confirm_source(ns, repo, digest, published.meta.size)
            self.store.touch(digest)
            # A tracker that restarted without persistence has forgotten the torrent, and the
            # seeder hears of it only at its next announce: register again (at most every
            # REGISTER_AGAIN per blob, not at every admission) and announce, so the seeder is
            # listed by the time the admitted node announces.
            now = time.monotonic()
            if now - self._registered_at.get(digest, -REGISTER_AGAIN) >= REGISTER_AGAIN:
                self._registered_at[digest] = now
                if await self.registration.register(published.meta, published.signature):
                    job = self.swarm.job(digest.hex)
                    if job is not None:
                        self.swarm.force_reannounce(job)
            self.metrics.requests.labels("cached").inc()
            return published
        upstream = self.upstreams.get(ns)
        if upstream is None:
            raise errors.NotFound(errors.NAME_UNKNOWN, f"no upstream registry named {ns!r}")
        try:
            # every request for the blob while it is fetched shares one fetch (from the first
            # requester's registry and repository: each was authorized for it the same way)
            published = await self._flights.run(digest, lambda: self._seed(upstream, repo, digest))
        except errors.ShoalError as exc:
            self.metrics.requests.labels(error_result(exc)).inc()
            log.warning("cannot seed %s from %s/%s: %s", digest, ns, repo, exc)
            raise
        self.metrics.requests.labels("fetched").inc()
        if ns not in await self.store.sources(digest):  # another request's fetch, from another registry
            await self._confirm_source(ns, repo, digest, published.meta.size)
        return published

    def is_seeding(self, digest: Digest) -> bool:
        """Whether a fetch-and-seed of `digest` runs now."""
        return digest in self._flights

    def seed_soon(self, ns: str, repo: str, digest: Digest) -> None:
        """ensure_seeded in the background (an admission that answered with a relay ticket); a
        failure is logged there, and the node's next admission runs it again."""
        async def seed() -> None:
            with contextlib.suppress(errors.ShoalError):
                await self.ensure_seeded(ns, repo, digest)

        self._spawn(seed())

    def source_signature(self, digest: Digest, ns: str) -> str:
        return signing.sign_source(self.key, str(digest), ns)

    async def _confirm_source(self, ns: str, repo: str, digest: Digest, size: int) -> None:
        """Make sure registry `ns` holds `digest` before vouching for it: a registry's yes to a
        HEAD proves nothing (a lying or intercepted one could claim another's private blob), so
        the blob is read from it once and hashed as it arrives (nothing kept). Every wrong
        answer (other bytes, too few, too many, 404) is the same refusal, so that it tells the
        registry nothing about the blob; one that cannot be had in time is a 503."""
        if ns in await self.store.sources(digest):
            return
        upstream = self.upstreams.get(ns)
        if upstream is None:
            raise errors.NotFound(errors.NAME_UNKNOWN, f"no upstream registry named {ns!r}")

        async def confirm() -> None:
            h, got = hashlib.sha256(), 0
            try:
                async with asyncio.timeout(CONFIRM_DEADLINE + size / CONFIRM_RATE):
                    async for chunk in upstream.client.stream_blob(repo, digest):
                        got += len(chunk)
                        if got > size:
                            break
                        h.update(chunk)
                        self.metrics.registry_bytes.inc(len(chunk))
            except errors.NotFound:
                got = -1
            except (TimeoutError, errors.ShoalError) as exc:
                why = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
                raise errors.UpstreamError(f"cannot confirm that {ns} holds the blob now ({why})") from None
            if got != size or h.hexdigest() != digest.hex:
                self.metrics.requests.labels("source_refused").inc()
                log.warning("registry %s says it has %s in %s but does not send it: not vouched for", ns, digest,
                            repo)
                raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
            await self.store.add_source(digest, ns)
            log.info("registry %s holds %s too (read and checked)", ns, digest)

        await self._confirmations.run((ns, digest), confirm)

    @contextlib.contextmanager
    def _followed(self, ns: str, digest: Digest, size: int) -> Iterator[FetchProgress]:
        """The fetch of `digest` from `ns`, visible to relays until the blob is seeded (or the
        fetch failed)."""
        progress = FetchProgress(ns, self.store.path(digest), size)
        self.fetching[digest] = progress
        try:
            yield progress
        finally:
            progress.end()
            if self.fetching.get(digest) is progress:
                del self.fetching[digest]

    async def _seed(self, upstream: Upstream, repo: str, digest: Digest) -> Published:
        started = time.monotonic()
        size = await upstream.client.blob_size(repo, digest)
        if size is None:
            raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
        if size > self.max_blob_size:
            raise errors.BadRequest(errors.SIZE_INVALID, f"blob of {size} bytes exceeds max_blob_size")
        if size == 0:
            raise errors.BadRequest(errors.SIZE_INVALID, "empty blobs are not seeded (nothing to share)")
        followed = self._followed(upstream.name, digest, size)
        with self.store.pinned(digest), self.store.reservation(size), followed as progress:
            await self.store.make_room()
            if not self.store.has(digest):
                tmp = self.store.download_path(digest)
                progress.moved(tmp)

                def arrived(n: int) -> None:
                    self.metrics.registry_bytes.inc(n)
                    progress.advance(n)

                got = await upstream.client.download_blob(repo, digest, tmp, max_size=size, progress=arrived)
                if got != size:
                    await asyncio.to_thread(tmp.unlink, missing_ok=True)
                    raise errors.IntegrityError(f"registry sent {got} bytes for a {size}-byte blob")
                await self.store.commit_file(digest, tmp)
                await self.store.add_source(digest, upstream.name)
            elif upstream.name in await self.store.sources(digest):
                progress.advance(size)
            else:
                # Kept from another registry (this one is confirmed only after the seeding, in
                # ensure_seeded): its bytes must not be relayed to a node admitted for this one.
                progress.end()
            raw = await asyncio.to_thread(metainfo.create, self.store.path(digest), digest,
                                          announce=self.announce, root_cert=self.root_cert)
            meta = metainfo.parse(raw)
            published = Published(meta, signing.sign_metainfo(self.key, raw))
            await self.store.save_metainfo(digest, raw, published.signature)
            # Register first: the seeder's first announce must find the torrent known, or
            # libtorrent backs off and agents see no seeder for a whole announce interval.
            await self.registration.register(meta, published.signature)
            self._metas[digest] = published
            self.swarm.add(meta, self.store.blob_dir(digest), seed=True)
        self.metrics.fetch_seconds.observe(time.monotonic() - started)
        log.info("seeding %s from %s/%s (%d bytes, %d pieces) after %.2fs", digest, upstream.name, repo,
                 size, meta.num_pieces, time.monotonic() - started)
        return published
