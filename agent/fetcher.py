"""The agent's downloads: one flight per digest (every local reader of a blob attaches to the
same `Download`), seeding again what the cache kept, and leaving the swarm of evicted blobs.
How one download goes is agent/download.py; swarm membership is agent/membership.py."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from shoal import metainfo, signing
from shoal.oci import Digest
from shoal.registry import Authorization
from shoal.store import BlobStore
from shoal.swarm import Swarm
from shoal_agent.config import SwarmPolicy
from shoal_agent.download import Collaborators, Download
from shoal_agent.membership import Membership, SwarmAccess
from shoal_agent.metrics import AgentMetrics
from shoal_agent.upstreams import Upstream

log = logging.getLogger(__name__)


class Fetcher:
    def __init__(
        self, *, store: BlobStore, swarm: Swarm | None, http: aiohttp.ClientSession, access: SwarmAccess | None,
        policy: SwarmPolicy, metrics: AgentMetrics,
    ) -> None:
        self.store = store
        self.swarm = swarm
        self.membership = None if swarm is None or access is None else Membership(
            http=http, access=access, swarm=swarm, policy=policy, metrics=metrics)
        self.deps = Collaborators(store=store, metrics=metrics, policy=policy, swarm=swarm, membership=self.membership)
        self._flights: dict[Digest, Download] = {}
        self._token_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Enroll with the origin, and seed again what the cache kept (each blob once its grant
        is renewed)."""
        membership = self.membership  # there with a swarm and the access to it, else None
        if membership is None:
            return
        self.store.add_evict_hook(self._on_evict)
        resumed = unadmitted = 0
        for digest in self.store.digests():
            kept = await self.store.load_metainfo(digest)
            if kept is None:
                continue
            receipt = await self.store.load_receipt(digest)
            if receipt is None:  # cached by an earlier version, before admissions: not seeded
                unadmitted += 1
                continue
            try:
                signing.verify_metainfo(membership.access.origin_key, kept[0], kept[1])
                meta = metainfo.parse(kept[0])
            except (signing.SignatureError, metainfo.MetainfoError) as exc:
                log.warning("not seeding %s: its metainfo on disk is unusable (%s)", digest, exc)
                continue
            membership.resume(meta, self.store.blob_dir(digest), receipt)
            resumed += 1
        self._token_task = asyncio.create_task(membership.keep_enrolled())
        log.info("seeding %d cached blobs once their grants are renewed%s", resumed,
                 f" ({unadmitted} without an admission receipt are served from the cache only)" if unadmitted else "")

    async def stop(self) -> None:
        tasks = [d.task for d in self._flights.values() if d.task is not None]
        if self._token_task is not None:
            tasks.append(self._token_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_evict(self, digest: Digest) -> None:
        if self.membership is not None:
            self.membership.forget(digest)
        if self.swarm is not None:
            await self.swarm.remove(digest.hex)

    def in_flight(self) -> int:
        return len(self._flights)

    def get(self, upstream: Upstream, repo: str, digest: Digest, size: int, *,
            authorization: Authorization, instead_of: Download | None = None) -> Download:
        """The download of `digest`, started if none is running (callers are authorized), or if
        the one running is `instead_of` (one that ended without the blob, still finishing)."""
        download = self._flights.get(digest)
        if download is not None and download is not instead_of:
            return download
        download = Download(self.deps, upstream, repo, digest, size, authorization)
        self._flights[digest] = download
        task = asyncio.create_task(download.run())
        download.task = task

        def done(_t: asyncio.Task[None]) -> None:
            if self._flights.get(digest) is download:  # (not a download started instead of it)
                del self._flights[digest]

        task.add_done_callback(done)
        return download

