"""Typed clients of the origin's and the tracker's APIs, built on shoal.protocol (the agent, the
origin's registration and the journal shipper use them; nobody builds these requests by hand).

A call returns the answer's typed body, or raises:
- `ApiError` when the server answered with a status the call does not expect (it carries the
  status, never the body, which is the server's text and could echo anything);
- aiohttp.ClientError / TimeoutError when the server could not be reached or did not answer in
  time, so callers can tell "down" from "refused".
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from shoal import errors, protocol
from shoal.oci import Digest


class ApiError(errors.ShoalError):
    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"{what}: HTTP {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class SignedMetainfo:
    raw: bytes
    signature: str | None  # SIGNATURE_HEADER as sent (verified by the caller, not here)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class OriginClient:
    """The origin's API as a cluster node uses it (with the node token)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, node_token: str) -> None:
        self.http, self.base, self._auth = http, base, _bearer(node_token)

    async def swarm_token(self, node: str, *, within: float) -> protocol.SwarmToken:
        async with self.http.post(protocol.SWARM_TOKEN.url(self.base), json=protocol.SwarmTokenRequest(node).to_json(),
                                  headers=self._auth, timeout=aiohttp.ClientTimeout(total=within)) as r:
            if r.status != 200:
                raise ApiError("origin refused a swarm token", r.status)
            return protocol.SwarmToken.from_json(await r.json())

    async def seed(self, digest: Digest, request: protocol.SeedRequest, *, within: float) -> SignedMetainfo:
        async with self.http.post(protocol.SEED_BLOB.url(self.base, digest=str(digest)), json=request.to_json(),
                                  headers=self._auth, timeout=aiohttp.ClientTimeout(total=within)) as r:
            if r.status != 200:
                raise ApiError("origin refused to seed the blob", r.status)
            return SignedMetainfo(await r.read(), r.headers.get(protocol.SIGNATURE_HEADER))

    async def ship_journal(self, batch: protocol.JournalBatch, *, within: float) -> protocol.JournalAck:
        async with self.http.post(protocol.JOURNAL.url(self.base), json=batch.to_json(), headers=self._auth,
                                  timeout=aiohttp.ClientTimeout(total=within)) as r:
            if not 200 <= r.status < 300:
                raise ApiError("collector refused a journal batch", r.status)
            return protocol.JournalAck.from_json(await r.json())


class TrackerClient:
    """The tracker's metainfo API: nodes read it (node token), the origin writes it
    (registration token)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str) -> None:
        self.http, self.base, self._auth = http, base, _bearer(token)

    async def metainfo(self, digest: Digest, *, within: float) -> SignedMetainfo | None:
        """None when the tracker has no torrent for the blob."""
        async with self.http.get(protocol.METAINFO.url(self.base, digest=str(digest)), headers=self._auth,
                                 timeout=aiohttp.ClientTimeout(total=within)) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                raise ApiError("tracker refused metainfo", r.status)
            return SignedMetainfo(await r.read(), r.headers.get(protocol.SIGNATURE_HEADER))

    async def register(self, digest: Digest, raw: bytes, signature: str, *, within: float) -> None:
        async with self.http.put(protocol.REGISTER_METAINFO.url(self.base, digest=str(digest)), data=raw,
                                 headers={**self._auth, "Content-Type": protocol.TORRENT_TYPE,
                                          protocol.SIGNATURE_HEADER: signature},
                                 timeout=aiohttp.ClientTimeout(total=within)) as r:
            if r.status != 201:
                raise ApiError("tracker refused the registration", r.status)

    async def unregister(self, digest: Digest, *, within: float) -> None:
        async with self.http.delete(protocol.UNREGISTER_METAINFO.url(self.base, digest=str(digest)),
                                    headers=self._auth, timeout=aiohttp.ClientTimeout(total=within)) as r:
            if r.status not in (204, 404):
                raise ApiError("tracker refused to unregister", r.status)
