"""Registering metainfo at the tracker, so that it tracks the torrent."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from shoal.clients import ApiError, TrackerClient
from shoal.metainfo import Metainfo

log = logging.getLogger(__name__)


class TrackerRegistration:
    def __init__(self, http: aiohttp.ClientSession, tracker: str, token: str) -> None:
        self.tracker = TrackerClient(http, tracker, token)
        self.registered: set[str] = set()

    async def register(self, meta: Metainfo, signature: str) -> bool:
        """One attempt; False (logged) if the tracker is unreachable or refuses."""
        try:
            await self.tracker.register(meta.digest, meta.raw, signature, within=10)
            self.registered.add(meta.digest.hex)
            return True
        except ApiError as exc:
            log.warning("tracker refused registration of %s: HTTP %d", meta.digest, exc.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("tracker unreachable registering %s: %s", meta.digest, type(exc).__name__)
        self.registered.discard(meta.digest.hex)
        return False

    async def unregister(self, meta: Metainfo) -> None:
        self.registered.discard(meta.digest.hex)
        # (if this fails, the tracker forgets it at its next restart without persistence anyway)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ApiError):
            await self.tracker.unregister(meta.digest, within=10)

    async def keep_registered(self, metas: list[tuple[Metainfo, str]], *, retry: float = 5.0) -> None:
        """Register everything not yet registered, retrying until the tracker takes it."""
        pending = [(m, s) for m, s in metas if m.digest.hex not in self.registered]
        while pending:
            results = await asyncio.gather(*(self.register(m, s) for m, s in pending))
            pending = [ms for ms, ok in zip(pending, results, strict=True) if not ok]
            if pending:
                await asyncio.sleep(retry)
