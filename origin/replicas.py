"""This origin among several: which blobs it owns, and making sure a blob's other owners seed it.

Each blob is owned by `origin_replication` origins, the first of the rendezvous ranking of the
configured origin names for its digest (shoal/rendezvous.py); agents ask the owners first, in
that order. Every owner builds the same torrent (shoal/metainfo.py: the info dict depends only
on the blob and the shared CA), so their seeders are one swarm.

- **Admission.** An owner that admits a node to a blob asks the blob's other owners to seed it
  too (REPLICA, origin to origin with the peer token), once per blob while it runs, again after
  REPLICA_RETRY if that failed. So when one owner dies mid-rollout another is already a seeder,
  and a new node asking the next owner is admitted at once. The registry sends each blob at most
  once per owner (`origin_replication` times).
- **Pre-seed.** A job, submitted at any origin, has each blob seeded by its owners: this origin
  seeds the blobs it owns and asks the owners of the rest. A blob is done when one owner seeds
  it; if no owner can be reached, this origin seeds it itself (the next one in line).
- A non-owner asked for an admission (its owners are down) seeds the blob itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing
from collections.abc import Coroutine
from typing import Any, Literal

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from shoal import errors, protocol, rendezvous
from shoal.clients import ApiError, PeerOriginClient
from shoal.config import OriginEntry
from shoal.flights import SingleFlight
from shoal.metainfo import Published
from shoal.metrics import Known
from shoal.oci import Digest
from shoal_origin.seeder import Seeder

log = logging.getLogger(__name__)

# An owner that could not have another owner seed a blob asks again after this long (at the
# next admission for it), not at every admission.
REPLICA_RETRY = 30.0
# How long another owner may take to fetch, verify and hash a blob it is asked to seed.
REPLICA_TIMEOUT = 3600.0
# Replica requests' results, sent and received: each exported from the start at 0.
ReplicaResult = Literal["ok", "failed"]
REPLICA_RESULTS: tuple[ReplicaResult, ...] = typing.get_args(ReplicaResult)
# Blobs whose spreading is remembered at most (oldest forgotten first: asked again at worst).
MAX_REMEMBERED = 100_000


class Replicas:
    def __init__(self, *, http: aiohttp.ClientSession, name: str, origins: list[OriginEntry], replication: int,
                 peer_token: str, seeder: Seeder, registry: CollectorRegistry) -> None:
        self.name = name
        self.names = [o.name for o in origins]
        self.replication = replication
        self.seeder = seeder
        self.peers = {o.name: PeerOriginClient(http, o.url, peer_token) for o in origins if o.name != name}
        self._spread: dict[Digest, float] = {}  # blob -> when its other owners were last asked (0: they seed it)
        self._asks: SingleFlight[tuple[str, Digest], protocol.Replica] = SingleFlight()
        self._background: set[asyncio.Task[None]] = set()
        self.sent = Known(Counter("shoal_origin_replica_requests_total",
                                  "Requests to another owner of a blob to seed it too, by result", ["result"],
                                  registry=registry), REPLICA_RESULTS)
        self.received = Known(Counter("shoal_origin_replica_requests_received_total",
                                      "Requests from another origin to seed a blob this origin owns too, by result",
                                      ["result"], registry=registry), REPLICA_RESULTS)

    def owners(self, digest: Digest) -> list[str]:
        return rendezvous.owners(self.names, digest.hex, self.replication)

    def owns(self, digest: Digest) -> bool:
        return self.name in self.owners(digest)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._asks.cancel_all()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----- admissions ------------------------------------------------------------------------------

    def spread(self, ns: str, repo: str, digest: Digest) -> None:
        """After this origin admitted a node to `digest` (seeding it): if it owns the blob, have
        the other owners seed it too, in the background."""
        if not self.owns(digest):
            return
        last = self._spread.get(digest)
        now = time.monotonic()
        if last is not None and (last == 0 or now - last < REPLICA_RETRY):
            return
        self._spread.pop(digest, None)
        self._spread[digest] = now  # (re-inserted: the dict's order is the order of last use)
        while len(self._spread) > MAX_REMEMBERED:
            self._spread.pop(next(iter(self._spread)))
        self._spawn(self._spread_to_owners(ns, repo, digest))

    async def _spread_to_owners(self, ns: str, repo: str, digest: Digest) -> None:
        others = [o for o in self.owners(digest) if o != self.name]
        results = await asyncio.gather(*(self.ask(o, ns, repo, digest) for o in others), return_exceptions=True)
        if all(not isinstance(r, BaseException) for r in results):
            self._spread[digest] = 0

    async def ask(self, name: str, ns: str, repo: str, digest: Digest) -> protocol.Replica:
        """Have origin `name` seed `digest` (one request at a time per origin and blob)."""
        async def request() -> protocol.Replica:
            try:
                answer = await self.peers[name].replica(digest, protocol.ReplicaRequest(ns, repo),
                                                        within=REPLICA_TIMEOUT)
            except ApiError as exc:
                self.sent.labels("failed").inc()
                log.warning("origin %s did not seed %s: HTTP %d", name, digest, exc.status)
                raise
            except (aiohttp.ClientError, TimeoutError, errors.ShoalError) as exc:
                self.sent.labels("failed").inc()
                log.warning("origin %s did not seed %s: %s", name, digest, _why(exc))
                raise
            self.sent.labels("ok").inc()
            mine = next((p for p in self.seeder.seeded() if p.meta.digest == digest), None)
            if mine is not None and mine.meta.info_hash.hex() != answer.info_hash:
                # the owners would be two swarms: they do not share the signing key (the CA), or
                # they build torrents by different piece rules (versions)
                log.error("origin %s seeds %s under another torrent (info-hash %s, here %s): do the origins "
                          "share one signing_key, and run one version?", name, digest, answer.info_hash,
                          mine.meta.info_hash.hex())
            else:
                log.info("origin %s seeds %s too", name, digest)
            return answer

        return await self._asks.run((name, digest), request)

    async def serve(self, ns: str, repo: str, digest: Digest) -> Published:
        """REPLICA: seed `digest` because another origin asked (the fetch goes on if it hangs up)."""
        try:
            published = await self.seeder.ensure_seeded(ns, repo, digest)
        except errors.ShoalError:
            self.received.labels("failed").inc()
            raise
        self.received.labels("ok").inc()
        return published

    # ----- pre-seed ----------------------------------------------------------------------------------

    async def preseed(self, ns: str, repo: str, digest: Digest) -> list[str]:
        """Seed `digest` at its owners (this origin, if it is one, and the others, asked); the
        owners that could not seed it, as texts. Raises the last error if no owner seeds it
        and this origin could not seed it either."""
        owners = self.owners(digest)

        async def at(name: str) -> None:
            if name == self.name:
                await self.seeder.ensure_seeded(ns, repo, digest)
            else:
                await self.ask(name, ns, repo, digest)

        results = await asyncio.gather(*(at(o) for o in owners), return_exceptions=True)
        failed = {o: r for o, r in zip(owners, results, strict=True) if isinstance(r, BaseException)}
        for r in failed.values():
            if not isinstance(r, Exception):
                raise r  # cancellation
        missed = [f"origin {o}: {_why(r)}" for o, r in failed.items()]
        if len(failed) < len(owners):
            return missed
        if self.name in owners:
            raise next(iter(failed.values()))
        # no owner could be reached: this origin seeds it (the next in line, as for an admission)
        log.warning("no owner of %s (%s) seeds it: seeding it here", digest, ", ".join(owners))
        await self.seeder.ensure_seeded(ns, repo, digest)
        return missed


def _why(exc: BaseException) -> str:
    if isinstance(exc, errors.ShoalError):
        return str(exc)  # shoal's own text
    return errors.connection_problem(exc, "the owner", what="that origin")
