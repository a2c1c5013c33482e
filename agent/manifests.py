"""Manifests kept for `auth.mode: availability`: what a credential was last allowed to see.

Normally every manifest request goes to the registry. When the registry is unreachable and the
agent runs in availability mode, a request is answered from here, but only for a credential
that the registry allowed to fetch exactly this (upstream, repository, reference) within
`auth.stale_decision_max_age`. Bodies are kept by digest; references (tags and digests) map to
digests. Everything is JSON strings in diskcache (never pickles), so it survives restarts.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import diskcache

from shoal.oci import MAX_MANIFEST_BYTES
from shoal.store import NoPickleDisk


@dataclass(frozen=True, slots=True)
class KeptManifest:
    digest: str
    media_type: str
    body: bytes
    principal: str
    at: float


class ManifestKeeper:
    def __init__(self, directory: Path, *, max_age: float) -> None:
        self.directory = directory
        self.max_age = max_age
        self._disk: diskcache.Cache | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifests")

    async def open(self) -> None:
        def load() -> None:
            self._disk = diskcache.Cache(str(self.directory), disk=NoPickleDisk, eviction_policy="none",
                                         cull_limit=0, size_limit=1 << 40)
            self._disk.expire()

        await asyncio.get_running_loop().run_in_executor(self._io, load)

    async def close(self) -> None:
        def close() -> None:
            if self._disk is not None:
                self._disk.close()

        await asyncio.get_running_loop().run_in_executor(self._io, close)
        self._io.shutdown(wait=True)

    async def keep(self, fingerprint: str, ns: str, repo: str, reference: str, *, digest: str, media_type: str,
                   body: bytes | None, principal: str) -> None:
        """Remember that `fingerprint` was allowed this manifest (a HEAD brings no body: then
        only the grant is kept, the body comes with the GET)."""
        disk = self._disk
        if disk is None or (body is not None and len(body) > MAX_MANIFEST_BYTES):
            return
        try:
            text = body.decode() if body is not None else None
        except UnicodeDecodeError:
            return  # manifests are JSON; anything else is not worth keeping
        grant = json.dumps({"digest": digest, "media_type": media_type, "principal": principal, "at": time.time()})
        ttl = self.max_age

        def write() -> None:
            if text is not None:
                disk.set(f"body|{digest}", text, expire=ttl)
            disk.set(f"grant|{fingerprint}|{ns}|{repo}|{reference}", grant, expire=ttl)

        await asyncio.get_running_loop().run_in_executor(self._io, write)

    async def find(self, fingerprint: str, ns: str, repo: str, reference: str) -> KeptManifest | None:
        disk = self._disk
        if disk is None:
            return None

        def read() -> KeptManifest | None:
            raw = disk.get(f"grant|{fingerprint}|{ns}|{repo}|{reference}")
            if raw is None:
                return None
            grant = json.loads(raw)
            if time.time() - float(grant["at"]) > self.max_age:
                return None
            text = disk.get(f"body|{grant['digest']}")
            if text is None:
                return None
            return KeptManifest(grant["digest"], grant["media_type"], text.encode(), grant["principal"],
                                float(grant["at"]))

        return await asyncio.get_running_loop().run_in_executor(self._io, read)
