"""Registering metainfo at the tracker, so that it tracks the torrent.

With several tracker replicas (one Redis behind them all), a registration at any one of them is
a registration at all: the origin tries them in order until one takes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from shoal import errors
from shoal.clients import ApiError, TrackerClient
from shoal.metainfo import Metainfo

log = logging.getLogger(__name__)


class TrackerRegistration:
    def __init__(self, http: aiohttp.ClientSession, trackers: list[str], token: str) -> None:
        self.trackers = [TrackerClient(http, t, token) for t in trackers]
        # one replica that does not answer must leave time to try the next
        self.within = 10.0 if len(trackers) == 1 else 5.0
        self.registered: set[str] = set()

    async def register(self, meta: Metainfo, signature: str) -> bool:
        """One attempt per tracker replica, in order, until one takes it; False (logged) if
        none does."""
        for n, tracker in enumerate(self.trackers, 1):
            try:
                await tracker.register(meta.digest, meta.raw, signature, within=self.within)
                self.registered.add(meta.digest.hex)
                return True
            except ApiError as exc:
                log.warning("tracker %d refused registration of %s: HTTP %d", n, meta.digest, exc.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("tracker %d could not register %s: %s", n, meta.digest,
                            errors.connection_problem(exc, tracker.base, what="the tracker"))
        self.registered.discard(meta.digest.hex)
        return False

    async def unregister(self, meta: Metainfo) -> None:
        self.registered.discard(meta.digest.hex)
        # (if this fails, the tracker forgets it at its next restart without persistence anyway)
        for tracker in self.trackers:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ApiError):
                await tracker.unregister(meta.digest, within=self.within)
                return

    async def keep_registered(self, metas: list[tuple[Metainfo, str]], *, retry: float = 5.0) -> None:
        """Register everything not yet registered, retrying until the tracker takes it."""
        pending = [(m, s) for m, s in metas if m.digest.hex not in self.registered]
        while pending:
            results = await asyncio.gather(*(self.register(m, s) for m, s in pending))
            pending = [ms for ms, ok in zip(pending, results, strict=True) if not ok]
            if pending:
                await asyncio.sleep(retry)
