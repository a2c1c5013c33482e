"""Registering metainfo at the tracker, so it tracks the torrent and serves it by digest."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from shoal import protocol
from shoal.metainfo import Metainfo

log = logging.getLogger(__name__)


class TrackerRegistration:
    def __init__(self, http: aiohttp.ClientSession, tracker: str, token: str) -> None:
        self.http = http
        self.tracker = tracker
        self._token = token
        self.registered: set[str] = set()

    async def register(self, meta: Metainfo, signature: str) -> bool:
        """One attempt; False (logged) if the tracker is unreachable or refuses."""
        url = protocol.REGISTER_METAINFO.url(self.tracker, digest=str(meta.digest))
        try:
            async with self.http.put(
                url, data=meta.raw, headers={"Authorization": f"Bearer {self._token}",
                                             "Content-Type": protocol.TORRENT_TYPE,
                                             protocol.SIGNATURE_HEADER: signature},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                if resp.status == 201:
                    self.registered.add(meta.digest.hex)
                    return True
                log.warning("tracker refused registration of %s: HTTP %d", meta.digest, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("tracker unreachable registering %s: %s", meta.digest, type(exc).__name__)
        self.registered.discard(meta.digest.hex)
        return False

    async def unregister(self, meta: Metainfo) -> None:
        self.registered.discard(meta.digest.hex)
        try:
            async with self.http.delete(
                protocol.UNREGISTER_METAINFO.url(self.tracker, digest=str(meta.digest)),
                headers={"Authorization": f"Bearer {self._token}"}, timeout=aiohttp.ClientTimeout(total=10),
            ):
                pass
        except (aiohttp.ClientError, TimeoutError):
            pass  # the tracker forgets it at its next restart without persistence anyway

    async def keep_registered(self, metas: list[tuple[Metainfo, str]], *, retry: float = 5.0) -> None:
        """Register everything not yet registered, retrying until the tracker takes it."""
        pending = [(m, s) for m, s in metas if m.digest.hex not in self.registered]
        while pending:
            results = await asyncio.gather(*(self.register(m, s) for m, s in pending))
            pending = [ms for ms, ok in zip(pending, results, strict=True) if not ok]
            if pending:
                await asyncio.sleep(retry)
