"""Which repository links which blob: the agent's copy of the registry's repository binding.

The store is content-addressed, but distribution serves a blob only through a repository that
links it (`/v2/other/blobs/<digest>` is 404 even when the bytes exist). The agent serves a blob
under (ns, repository) only after the registry said so: a manifest it fetched from that
repository lists the blob, or a blob HEAD in that repository answered 200. Those facts, with
the blob size, are kept here for `cache.binding_ttl` (in memory, persisted as JSON strings).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diskcache

from shoal.oci import Descriptor, Digest
from shoal.store import NoPickleDisk

MAX_BINDINGS = 200_000


def _key(ns: str, repo: str, digest: Digest) -> str:
    return f"{ns}|{repo}|{digest.hex}"


class Bindings:
    def __init__(self, directory: Path, *, ttl: float) -> None:
        self.directory = directory
        self.ttl = ttl
        self._mem: dict[str, tuple[int, float]] = {}
        self._disk: diskcache.Cache | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bindings")

    async def open(self) -> None:
        def load() -> None:
            self._disk = diskcache.Cache(str(self.directory), disk=NoPickleDisk, eviction_policy="none",
                                         cull_limit=0, size_limit=1 << 40)
            self._disk.expire()
            for key in self._disk.iterkeys():
                raw = self._disk.get(key)
                try:
                    doc = json.loads(raw)
                    self._mem[key] = (int(doc["size"]), float(doc["until"]))
                except (TypeError, ValueError, KeyError):
                    self._disk.delete(key)

        await asyncio.to_thread(load)

    async def close(self) -> None:
        def close() -> None:
            if self._disk is not None:
                self._disk.close()

        await asyncio.get_running_loop().run_in_executor(self._writer, close)
        self._writer.shutdown(wait=True)

    def lookup(self, ns: str, repo: str, digest: Digest) -> int | None:
        """The blob's size if the registry linked it to this repository recently."""
        entry = self._mem.get(_key(ns, repo, digest))
        if entry is None or entry[1] < time.time():
            return None
        return entry[0]

    def learn(self, ns: str, repo: str, descriptors: list[Descriptor] | tuple[Descriptor, ...]) -> None:
        until = time.time() + self.ttl
        writes: list[tuple[str, str]] = []
        for d in descriptors:
            key = _key(ns, repo, d.digest)
            self._mem[key] = (d.size, until)
            writes.append((key, json.dumps({"size": d.size, "until": until})))
        if len(self._mem) > MAX_BINDINGS:
            self._prune()
        disk, ttl = self._disk, self.ttl
        if disk is None or not writes:
            return

        def write() -> None:
            for key, doc in writes:
                disk.set(key, doc, expire=ttl)

        asyncio.get_running_loop().run_in_executor(self._writer, write)

    def _prune(self) -> None:
        now = time.time()
        for key in [k for k, (_s, until) in self._mem.items() if until < now]:
            del self._mem[key]
        # Still too many: drop the oldest facts first (they expire first).
        if len(self._mem) > MAX_BINDINGS:
            oldest = sorted(self._mem.items(), key=lambda kv: kv[1][1])
            for key, _v in oldest[: len(self._mem) - MAX_BINDINGS]:
                del self._mem[key]
