"""This node's membership of the cluster's swarms, blob by blob.

- **Enrollment and renewal**: the node enrolls with the origin (its name bound to its key) and, at
  half-life, has the grant of every blob it holds renewed by showing the admission receipts.
- **Admission**: before it joins a blob's swarm the node presents, for the puller it serves, the
  credential the registry accepted (the puller's own, its registry login in node mode, or none);
  the origin asks the registry with it and, on a yes, answers with the blob's signed metainfo, its
  word that the registry holds the blob, and a grant for that swarm only (origin/admission.py).

A failure says why, as one of the fixed fallback reasons.

With several origins (shoal/rendezvous.py) a blob's admission is asked of its owners in
rendezvous order, then of the other origins in the same order, moving on when one cannot be
reached or answers 5xx, all within the one admission budget; a refusal (401/403/400/404) is
the cluster's answer and final. The node enrolls at every origin it talks to (each origin keeps
its own enrollments unless they share an audit store), before the first request it sends there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shoal import errors, metainfo, peercerts, protocol, rendezvous, signing
from shoal.clients import ApiError, OriginClient
from shoal.config import OriginEntry
from shoal.flights import Backoff
from shoal.metainfo import Metainfo, Published
from shoal.oci import Digest
from shoal.registry import OWN, Authorization
from shoal.swarm import Grant, Swarm
from shoal_agent.config import SwarmPolicy
from shoal_agent.metrics import FALLBACK_REASONS, AgentMetrics, FallbackReason
from shoal_agent.upstreams import Upstream

log = logging.getLogger(__name__)

# Backoff while the origin does not enroll this node or renew its grants.
RETRY_MIN, RETRY_MAX = 1.0, 30.0
# An origin that does not take the connection within this long is passed over for the next one
# (a dead host behind a firewall that drops packets would otherwise hold the whole budget).
CONNECT_TIMEOUT = 2.0
# Budget of the enrollment at another origin made right before a request to it.
ENROLL_TIMEOUT = 5.0


class SwarmFailure(errors.SwarmUnavailable):
    def __init__(self, reason: FallbackReason, message: str) -> None:
        assert reason in FALLBACK_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SwarmAccess:
    """What an agent needs to take part in the swarm."""

    origins: tuple[OriginEntry, ...]
    node: str
    node_token: str = field(repr=False)
    origin_key: Ed25519PublicKey
    replication: int = rendezvous.DEFAULT_REPLICATION

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.origins]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A blob's verified metainfo and this node's grant for its swarm; and where to take this
    node's share of the blob's first copy, if the origin hands one out (origin/firstcopy.py)."""

    published: Published
    grant: Grant
    receipt: str
    first_copy: tuple[OriginClient, str] | None = None


@dataclass(frozen=True, slots=True)
class Relayed:
    """The origin is still to fetch the blob: its bytes can be streamed from `origin` meanwhile,
    with `ticket` (unverified: see protocol.RelayTicket); the metainfo comes with the next
    admission, once the blob is seeded."""

    origin: OriginClient
    ticket: protocol.RelayTicket


class Membership:
    def __init__(self, *, http: aiohttp.ClientSession, access: SwarmAccess, swarm: Swarm, policy: SwarmPolicy,
                 metrics: AgentMetrics) -> None:
        self.origins = {o.name: OriginClient(http, o.url, access.node_token) for o in access.origins}
        self.access = access
        # the origins this node enrolled at since it started (an origin keeps an enrollment)
        self._enrolled_at: set[str] = set()
        self.swarm = swarm
        self.policy = policy
        self.metrics = metrics
        self.enrolled = asyncio.Event()
        # The receipt of every blob this node takes part in (digest hex -> receipt), and the
        # cached blobs waiting for their first grant after a restart (digest hex -> what to seed).
        self._receipts: dict[str, str] = {}
        self._waiting: dict[str, tuple[Metainfo, Path]] = {}

    # ----- enrollment and renewal ----------------------------------------------------------------

    def resume(self, meta: Metainfo, save_path: Path, receipt: str) -> None:
        """Seed a cached blob again once its grant is renewed (at enrollment)."""
        self._receipts[meta.digest.hex] = receipt
        self._waiting[meta.digest.hex] = (meta, save_path)

    def forget(self, digest: Digest) -> None:
        self._receipts.pop(digest.hex, None)
        self._waiting.pop(digest.hex, None)

    async def keep_enrolled(self) -> None:
        """Stay enrolled and keep every grant valid (runs until cancelled)."""
        backoff = Backoff(RETRY_MIN, RETRY_MAX)
        while True:
            try:
                ttl = await self._renew()
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, errors.ShoalError) as exc:
                # Only shoal's own fixed texts are logged (ApiError's HTTP status, a protocol field
                # name), never a token and never another library's message, which could echo what
                # the origin sent.
                reason = str(exc) if isinstance(exc, errors.ShoalError) else type(exc).__name__
                if isinstance(exc, ApiError) and exc.status == 403:
                    reason += ": the origin refuses this node's name and key (another key enrolled the name, the " \
                              "key is banned, or max_nodes is reached; the origin's log says which)"
                wait = backoff.next()
                log.warning("no enrollment or renewal at the origin (%s); retrying in %.0fs", reason, wait)  # log-safe
                await asyncio.sleep(wait)
                continue
            backoff.reset()
            self.enrolled.set()
            await asyncio.sleep(max(ttl / 2, 1.0))

    def ranked_for_node(self) -> list[str]:
        """The origins in the rendezvous order of this node's name (renewal, the journal)."""
        return rendezvous.ranked(self.access.names, self.access.node)

    def forget_enrollment(self, name: str) -> None:
        """Origin `name` no longer holds this node's enrollment: the next request enrolls first."""
        self._enrolled_at.discard(name)

    async def enroll_at(self, name: str, *, within: float = ENROLL_TIMEOUT) -> None:
        """Enroll at origin `name` unless this node did since it started (its grants are renewed
        at one origin: any of them verifies the receipts, as they share the signing key)."""
        if name in self._enrolled_at:
            return
        await self.origins[name].grants(protocol.GrantsRequest(self.access.node, self.swarm.key.public_pem, []),
                                        self.swarm.key.private_key, within=within)
        self._enrolled_at.add(name)

    async def _renew(self) -> float:
        """Enroll and renew every grant at the first origin (in the order of this node's name)
        that answers, then enroll at the others; the grants' lifetime."""
        failure: BaseException | None = None
        for name in self.ranked_for_node():
            try:
                ttl = await self._renew_at(name)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = exc
                continue
            except ApiError as exc:
                if exc.status < 500:
                    raise
                failure = exc
                continue
            for other in self.ranked_for_node():
                if other != name and other not in self._enrolled_at:
                    # (best effort: an admission there enrolls first anyway)
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError,
                                             errors.ShoalError):
                        await self.enroll_at(other)
            return ttl
        assert failure is not None
        raise failure

    async def _renew_at(self, name: str) -> float:
        """Enroll and renew every grant at origin `name`, MAX_RENEWALS at a time; the grants' lifetime."""
        # (receipts of blobs this node no longer takes part in, e.g. an admission whose download
        # failed, or one only asked to confirm a registry, are dropped)
        self._receipts = {h: r for h, r in self._receipts.items() if h in self._waiting or self.swarm.job(h)}
        receipts = [protocol.Receipt(f"sha256:{h}", r) for h, r in self._receipts.items()]
        ttl = None
        for start in range(0, max(len(receipts), 1), protocol.MAX_RENEWALS):
            answer = await self.origins[name].grants(
                protocol.GrantsRequest(self.access.node, self.swarm.key.public_pem,
                                       receipts[start : start + protocol.MAX_RENEWALS]),
                self.swarm.key.private_key, within=30)
            ttl = answer.ttl_seconds
            for grant in answer.grants:
                try:
                    digest = Digest.parse(grant.digest)
                    self._use(digest.hex, self._check(grant, digest))
                except (errors.ShoalError, SwarmFailure) as exc:
                    log.warning("unusable renewed grant for %s: %s", grant.digest, exc)
            for refused in answer.refused:
                await self._drop(refused.removeprefix("sha256:"), "the origin does not renew its grant")
        assert ttl is not None
        self._enrolled_at.add(name)
        self.metrics.swarm_token_expiry.set(time.time() + ttl)
        return ttl

    def _use(self, name: str, grant: Grant) -> None:
        waiting = self._waiting.pop(name, None)
        if waiting is not None:
            meta, save_path = waiting
            self.swarm.add(meta, save_path, seed=True, grant=grant)
        else:
            self.swarm.set_grant(name, grant)

    async def _drop(self, name: str, why: str) -> None:
        self._receipts.pop(name, None)
        self._waiting.pop(name, None)
        if self.swarm.job(name) is not None:
            log.warning("leaving the swarm of sha256:%s: %s", name, why)
            await self.swarm.remove(name)

    # ----- admission -----------------------------------------------------------------------------

    async def admit(self, upstream: Upstream, repo: str, digest: Digest, authorization: Authorization, *,
                    seeded_only: bool = False, relay: bool = False) -> Admitted | Relayed | None:
        """The blob's metainfo and this node's grant for its swarm, once the origin had the
        registry accept `authorization` (as the agent authenticates to the registry for the
        puller) for this blob; with the origin's word that `upstream` holds the blob. With
        `seeded_only`, None if the origin does not seed the blob already; with `relay`, perhaps
        Relayed (at once) if the origin is still to fetch it."""
        if not self.enrolled.is_set():
            # right after start the enrollment is usually a few milliseconds away: wait for it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.enrolled.wait(), self.policy.metainfo_timeout)
            if not self.enrolled.is_set():
                raise SwarmFailure("not_enrolled", "this node is not enrolled with the origin yet")
        request = protocol.AdmissionRequest(self.access.node, upstream.name, repo, seeded_only, relay)
        # (the origin fetches nothing for a seeded_only request: a short budget will do)
        budget = self.policy.metainfo_timeout if seeded_only else self.policy.seed_timeout
        deadline = time.monotonic() + budget
        credential = self._credential(upstream, authorization)
        failure: SwarmFailure | None = None
        order = rendezvous.ranked(self.access.names, digest.hex)
        answered, answer = False, None
        for name in order:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if failure is not None:
                owner = "an owner" if order.index(name) < self.access.replication else "not an owner"
                log.info("admission to %s: moving on to origin %s, %s of the blob (%s)", digest, name, owner,
                         failure)
            try:
                try:
                    await self.enroll_at(name, within=min(left, ENROLL_TIMEOUT))
                    answer = await self.origins[name].admission(
                        digest, request, credential, self.swarm.key.private_key,
                        within=max(deadline - time.monotonic(), 0.001), connect=min(left, CONNECT_TIMEOUT))
                except ApiError as exc:
                    if not exc.not_enrolled:
                        raise
                    # the origin lost this node's enrollment (its audit store moved to
                    # PostgreSQL, say): enroll again and ask once more
                    log.info("origin %s holds no enrollment of this node: enrolling again", name)
                    self.forget_enrollment(name)
                    await self.enroll_at(name, within=max(min(deadline - time.monotonic(), ENROLL_TIMEOUT), 0.001))
                    answer = await self.origins[name].admission(
                        digest, request, credential, self.swarm.key.private_key,
                        within=max(deadline - time.monotonic(), 0.001), connect=min(left, CONNECT_TIMEOUT))
            except ApiError as exc:
                if exc.status in (401, 403):
                    raise SwarmFailure("not_admitted", f"the origin did not admit this node to the blob's swarm: "
                                                       f"HTTP {exc.status}") from None
                if exc.status in (400, 404):
                    raise SwarmFailure("origin_refused", f"the origin does not vouch for {upstream.name}: "
                                                         f"HTTP {exc.status}") from None
                failure = SwarmFailure("origin_error", f"origin answered {exc.status} to the admission")
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = SwarmFailure("origin_unreachable",
                                       errors.connection_problem(exc, self.origins[name].base, what="the origin"))
                continue
            answered = True
            if name != order[0]:
                self.metrics.origin_failovers.inc()
            break
        if not answered:
            raise failure or SwarmFailure("origin_unreachable", "origin unreachable: no time left")
        if answer is None:
            return None
        if isinstance(answer, protocol.RelayTicket):
            return Relayed(self.origins[name], answer)
        key = self.access.origin_key
        try:
            signing.verify_metainfo(key, answer.metainfo, answer.signature)
            published = Published(metainfo.parse(answer.metainfo), answer.signature)
            signing.verify_source(key, str(digest), upstream.name, answer.source)
        except signing.SignatureError as exc:
            raise SwarmFailure("unsigned_metainfo", f"the admission is not signed by the origin: {exc}") from None
        except metainfo.MetainfoError as exc:
            raise SwarmFailure("bad_metainfo", f"unusable metainfo: {exc}") from None
        if published.meta.digest != digest or answer.grant.digest != str(digest):
            raise SwarmFailure("bad_metainfo", "the origin's admission is for another blob")
        grant = self._check(answer.grant, digest)
        self._receipts[digest.hex] = answer.grant.receipt
        first_copy = (self.origins[name], answer.first_copy) if answer.first_copy is not None else None
        return Admitted(published, grant, answer.grant.receipt, first_copy)

    def _credential(self, upstream: Upstream, authorization: Authorization) -> str | None:
        """What the registry accepted for the puller, as the origin can present it again."""
        if authorization is OWN:
            credentials = upstream.client.credentials
            return credentials.basic() if credentials is not None else None
        assert authorization is None or isinstance(authorization, str)
        return authorization

    def _check(self, grant: protocol.Grant, digest: Digest) -> Grant:
        """A grant the origin signed, for this blob and this node's key."""
        try:
            claims = signing.verify_token(self.access.origin_key, grant.token)
            if claims.blob != digest.hex:
                raise SwarmFailure("bad_metainfo", "the swarm token is for another blob")
            peercerts.check_node_certificate(grant.certificate, self.access.origin_key, self.swarm.key.public_key)
        except signing.SignatureError as exc:
            raise SwarmFailure("unsigned_metainfo", f"the grant is not the origin's: {exc}") from None
        except errors.IntegrityError as exc:
            raise SwarmFailure("unsigned_metainfo", str(exc)) from None
        return Grant(grant.token, grant.certificate)
