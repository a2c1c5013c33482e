"""This node's membership of the cluster's swarms: the swarm token it keeps from the origin, and
the signed metainfo of a blob (from the tracker, or from the origin after it seeded the blob).
A failure says why, as one of the fixed fallback reasons."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import SwarmPolicy
from agent.metrics import FALLBACK_REASONS, AgentMetrics
from agent.upstreams import Upstream
from shoal import errors, metainfo, protocol, signing
from shoal.flights import Backoff
from shoal.metainfo import Published
from shoal.oci import Digest
from shoal.swarm import Swarm

log = logging.getLogger(__name__)

# Backoff while the origin does not hand out a swarm token.
TOKEN_RETRY_MIN, TOKEN_RETRY_MAX = 1.0, 30.0


class SwarmFailure(errors.SwarmUnavailable):
    def __init__(self, reason: str, message: str) -> None:
        assert reason in FALLBACK_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SwarmAccess:
    """What an agent needs to take part in the swarm."""

    tracker: str
    origin: str
    node: str
    node_token: str = field(repr=False)
    origin_key: Ed25519PublicKey

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.node_token}"}


class Membership:
    def __init__(self, *, http: aiohttp.ClientSession, access: SwarmAccess, swarm: Swarm, policy: SwarmPolicy,
                 metrics: AgentMetrics) -> None:
        self.http = http
        self.access = access
        self.swarm = swarm
        self.policy = policy
        self.metrics = metrics

    async def keep_token(self) -> None:
        """Hold a valid swarm token: the tracker refuses announces without one (runs until cancelled)."""
        swarm, access = self.swarm, self.access
        backoff = Backoff(TOKEN_RETRY_MIN, TOKEN_RETRY_MAX)
        while True:
            try:
                async with self.http.post(protocol.SWARM_TOKEN.url(access.origin),
                                          json=protocol.SwarmTokenRequest(access.node).to_json(),
                                          headers=access.auth, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    if r.status != 200:
                        raise errors.SwarmUnavailable(f"origin answered {r.status} for a swarm token")
                    doc = await r.json()
                answer = protocol.SwarmToken.from_json(doc)
                token, ttl = answer.token, answer.ttl_seconds
                signing.verify_token(access.origin_key, token)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, errors.ShoalError,
                    signing.SignatureError) as exc:
                # Only shoal's own fixed texts are logged (an HTTP status, a signature verdict),
                # never another library's message, which could echo what the origin sent.
                reason = str(exc) if isinstance(exc, (errors.ShoalError, signing.SignatureError)) \
                    else type(exc).__name__
                wait = backoff.next()
                log.warning("no swarm token from the origin yet (%s); retrying in %.0fs", reason, wait)
                await asyncio.sleep(wait)
                continue
            swarm.set_token(token)
            self.metrics.swarm_token_expiry.set(time.time() + ttl)
            backoff.reset()
            await asyncio.sleep(max(ttl / 2, 1.0))

    async def metainfo(self, upstream: Upstream, repo: str, digest: Digest, size: int) -> Published | None:
        """From the tracker, or (for blobs worth a swarm) from the origin after it seeded them.
        Only metainfo the origin signed is accepted, wherever it came from."""
        access = self.access
        if not await self.swarm.wait_token(self.policy.metainfo_timeout):
            # right after start the token is usually a few milliseconds away: wait for it
            raise SwarmFailure("no_swarm_token", "this node has no swarm token from the origin yet")
        try:
            async with self.http.get(protocol.METAINFO.url(access.tracker, digest=str(digest)), headers=access.auth,
                                     timeout=aiohttp.ClientTimeout(total=self.policy.metainfo_timeout)) as r:
                if r.status == 200:
                    return self._verify(await r.read(), r.headers.get(protocol.SIGNATURE_HEADER))
                if r.status != 404:
                    raise SwarmFailure("tracker_error", f"tracker answered {r.status} for metainfo")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SwarmFailure("tracker_unreachable", f"tracker unreachable: {type(exc).__name__}") from None
        if size < self.policy.threshold:
            return None
        try:
            async with self.http.post(
                protocol.SEED_BLOB.url(access.origin, digest=str(digest)),
                json=protocol.SeedRequest(upstream.name, repo).to_json(),
                headers=access.auth, timeout=aiohttp.ClientTimeout(total=self.policy.seed_timeout),
            ) as r:
                if r.status == 200:
                    return self._verify(await r.read(), r.headers.get(protocol.SIGNATURE_HEADER))
                raise SwarmFailure("origin_error", f"origin answered {r.status} to the seed request")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SwarmFailure("origin_unreachable", f"origin unreachable: {type(exc).__name__}") from None

    def _verify(self, raw: bytes, signature: str | None) -> Published:
        try:
            signing.verify_metainfo(self.access.origin_key, raw, signature)
            return Published(metainfo.parse(raw), signature or "")
        except signing.SignatureError as exc:
            raise SwarmFailure("unsigned_metainfo", f"metainfo not signed by the origin: {exc}") from None
        except metainfo.MetainfoError as exc:
            raise SwarmFailure("bad_metainfo", f"unusable metainfo: {exc}") from None
