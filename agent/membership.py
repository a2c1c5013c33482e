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

from shoal import errors, metainfo, peercerts, protocol, signing
from shoal.clients import ApiError, OriginClient, SignedMetainfo, TrackerClient
from shoal.flights import Backoff
from shoal.metainfo import Published
from shoal.oci import Digest
from shoal.swarm import Swarm
from shoal_agent.config import SwarmPolicy
from shoal_agent.metrics import FALLBACK_REASONS, AgentMetrics
from shoal_agent.upstreams import Upstream

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


class Membership:
    def __init__(self, *, http: aiohttp.ClientSession, access: SwarmAccess, swarm: Swarm, policy: SwarmPolicy,
                 metrics: AgentMetrics) -> None:
        self.origin = OriginClient(http, access.origin, access.node_token)
        self.tracker = TrackerClient(http, access.tracker, access.node_token)
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
                answer = await self.origin.swarm_token(
                    protocol.SwarmTokenRequest(access.node, swarm.key.public_pem), within=10)
                token, ttl = answer.token, answer.ttl_seconds
                signing.verify_token(access.origin_key, token)
                peercerts.check_node_certificate(answer.certificate, access.origin_key, swarm.key.public_key)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, errors.ShoalError,
                    signing.SignatureError) as exc:
                # Only shoal's own fixed texts are logged (ApiError's HTTP status, a protocol field
                # name, a signature verdict), never the token and never another library's message,
                # which could echo what the origin sent.
                reason = str(exc) if isinstance(exc, (errors.ShoalError, signing.SignatureError)) \
                    else type(exc).__name__
                if isinstance(exc, ApiError) and exc.status == 403:
                    reason += ": the origin refuses this node's name and key (another key enrolled the name, the " \
                              "key is banned, or max_nodes is reached; the origin's log says which)"
                wait = backoff.next()
                log.warning("no swarm token from the origin yet (%s); retrying in %.0fs", reason, wait)  # log-safe
                await asyncio.sleep(wait)
                continue
            swarm.set_token(token, answer.certificate)
            self.metrics.swarm_token_expiry.set(time.time() + ttl)
            backoff.reset()
            await asyncio.sleep(max(ttl / 2, 1.0))

    async def metainfo(self, upstream: Upstream, repo: str, digest: Digest, size: int) -> Published | None:
        """From the tracker, or (for blobs worth a swarm) from the origin after it seeded them.
        Only metainfo the origin signed is accepted, wherever it came from."""
        if not await self.swarm.wait_token(self.policy.metainfo_timeout):
            # right after start the token is usually a few milliseconds away: wait for it
            raise SwarmFailure("no_swarm_token", "this node has no swarm token from the origin yet")
        try:
            found = await self.tracker.metainfo(digest, within=self.policy.metainfo_timeout)
        except ApiError as exc:
            raise SwarmFailure("tracker_error", f"tracker answered {exc.status} for metainfo") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SwarmFailure("tracker_unreachable", f"tracker unreachable: {type(exc).__name__}") from None
        if found is not None:
            # That `upstream` holds the blob is the origin's word (agent/provenance.py): the
            # tracker hands it out with the metainfo once the origin knows it, so peers serve
            # each other with the origin away; else the origin is asked (and fetches the blob
            # from `upstream` if it has not yet).
            vouched = self._vouched(found, upstream, digest)
            if vouched is not None:
                return vouched
        elif size < self.policy.threshold:
            return None  # small blobs the swarm does not carry come from the registry
        return await self.vouch(upstream, repo, digest)

    async def confirm(self, upstream: Upstream, repo: str, digest: Digest) -> None:
        """That `upstream` holds the blob, on the origin's word: from the tracker if it has it
        (the origin may be away), else from the origin (SwarmFailure if it does not vouch)."""
        try:
            found = await self.tracker.metainfo(digest, within=self.policy.metainfo_timeout)
            if found is not None and self._vouched(found, upstream, digest) is not None:
                return
        except (ApiError, aiohttp.ClientError, TimeoutError, SwarmFailure):
            pass  # the origin decides
        await self.vouch(upstream, repo, digest)

    async def vouch(self, upstream: Upstream, repo: str, digest: Digest) -> Published:
        """The blob's signed metainfo, from the origin, with its signed word that `upstream` holds
        the blob (seeding it first if needed). SwarmFailure("origin_refused") if it says no."""
        try:
            seeded = await self.origin.seed(digest, protocol.SeedRequest(upstream.name, repo),
                                            within=self.policy.seed_timeout)
        except ApiError as exc:
            if exc.status in (400, 403, 404):
                raise SwarmFailure("origin_refused", f"the origin does not vouch for {upstream.name}: "
                                                     f"HTTP {exc.status}") from None
            raise SwarmFailure("origin_error", f"origin answered {exc.status} to the seed request") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SwarmFailure("origin_unreachable", f"origin unreachable: {type(exc).__name__}") from None
        published = self._verify(seeded)
        if published.meta.digest != digest:
            raise SwarmFailure("bad_metainfo", "the origin's metainfo is for another blob")
        try:
            signing.verify_source(self.access.origin_key, str(digest), upstream.name, seeded.sources.get(upstream.name))
        except signing.SignatureError as exc:
            raise SwarmFailure("unsigned_metainfo", str(exc)) from None
        return published

    def _vouched(self, found: SignedMetainfo, upstream: Upstream, digest: Digest) -> Published | None:
        """The tracker's metainfo, if it carries the origin's word that `upstream` holds the blob."""
        try:
            signing.verify_source(self.access.origin_key, str(digest), upstream.name, found.sources.get(upstream.name))
        except signing.SignatureError:
            return None
        published = self._verify(found)
        return published if published.meta.digest == digest else None

    def _verify(self, signed: SignedMetainfo) -> Published:
        try:
            signing.verify_metainfo(self.access.origin_key, signed.raw, signed.signature)
            return Published(metainfo.parse(signed.raw), signed.signature or "")
        except signing.SignatureError as exc:
            raise SwarmFailure("unsigned_metainfo", f"metainfo not signed by the origin: {exc}") from None
        except metainfo.MetainfoError as exc:
            raise SwarmFailure("bad_metainfo", f"unusable metainfo: {exc}") from None
