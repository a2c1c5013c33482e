"""Admission to a blob's swarm: a node joins it only after the registry let one of its pullers
pull that blob (issue 13).

The node presents the puller's credential (its own registry login in node mode; nothing for an
anonymous pull) with the blob's registry, repository and digest. The origin asks the registry
with exactly that credential (`HEAD /v2/<repo>/blobs/<digest>`, which the registry authorizes and
audits under the puller's name) and keeps the answer for `ttl`, keyed by a fingerprint of the
credential under a key of this process (never the credential; it is neither stored nor logged).
On a yes the node gets the blob's metainfo and a grant for that blob only (shoal.swarm.Grant:
a swarm token and a certificate naming the blob, for the key the node enrolled with) and a
receipt to have the grant renewed. So a node reaches what its pullers could pull, and a stolen
node identity reaches what that node's pullers could.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal import errors, peercerts, presented, protocol, signing
from shoal.flights import SingleFlight
from shoal.logs import fingerprint
from shoal.oci import Digest
from shoal_origin.budget import MinuteBudget
from shoal_origin.seeder import Upstream

log = logging.getLogger(__name__)

MAX_DECISIONS = 100_000
# Questions to the registry one node may cause per minute (answers from the cache are free): a
# rollout asks once per blob and credential; a node guessing passwords through the origin, so
# that the registry sees the origin's address rather than its own, is cut off.
MAX_ASKS_PER_NODE = 600
# Refusals of one registry user's login (any node, any blob) per minute before that user's
# logins are no longer tried: nodes enrolled under many names cannot guess one password faster.
MAX_FAILED_LOGINS_PER_USER = 30


@dataclass(frozen=True, slots=True)
class _Decision:
    allowed: bool
    principal: str
    at: float


class Admissions:
    def __init__(self, *, key: Ed25519PrivateKey, upstreams: dict[str, Upstream], ttl: float,
                 grant_ttl: float) -> None:
        self.key = key
        self.upstreams = upstreams
        self.ttl = ttl
        self.grant_ttl = grant_ttl
        self._fingerprint_key = secrets.token_bytes(32)
        self._decisions: OrderedDict[str, _Decision] = OrderedDict()
        self._flights: SingleFlight[str, _Decision] = SingleFlight()
        self.checks = {"allowed": 0, "denied": 0, "cached": 0, "rate_limited": 0}
        self._asks = MinuteBudget()  # registry questions per node
        self._failures = MinuteBudget()  # refused Basic logins per registry and user

    async def check(self, node: str, ns: str, repo: str, digest: Digest, credential: str | None) -> str:
        """The principal the registry accepted `credential` as, for pulling `digest` through `repo`
        at `ns`. Denied (403) when it does not, whatever it said (401, 403 or 404: the answer
        does not tell whether the blob exists); UpstreamError (503) when it cannot say now."""
        upstream = self.upstreams.get(ns)
        if upstream is None:
            raise errors.NotFound(errors.NAME_UNKNOWN, f"no upstream registry named {ns!r}")
        credential = presented.check(credential, "puller credential")
        key = f"{fingerprint(credential or '', self._fingerprint_key)}|{ns}|{repo}|{digest.hex}"
        decision = self._decisions.get(key)
        if decision is not None and time.monotonic() - decision.at < self.ttl:
            self.checks["cached"] += 1
        else:
            self._count_ask(node)
            user = _login_of(ns, credential)
            if user is not None and self._failures.used(user) >= MAX_FAILED_LOGINS_PER_USER:
                self.checks["rate_limited"] += 1
                raise errors.RateLimited("too many refused logins for this registry user in the last minute")
            decision = await self._flights.run(key, lambda: self._ask(upstream, repo, digest, credential))
            if user is not None and not decision.allowed:
                self._failures.add(user)
            self._decisions[key] = decision
            while len(self._decisions) > MAX_DECISIONS:
                self._decisions.popitem(last=False)
        self._decisions.move_to_end(key)
        if not decision.allowed:
            raise errors.Denied("the registry does not let this puller's credential pull this blob")
        return decision.principal

    def _count_ask(self, node: str) -> None:  # (nodes sign admissions: `node` is the one that asked)
        if not self._asks.take(node, MAX_ASKS_PER_NODE):
            self.checks["rate_limited"] += 1
            raise errors.RateLimited(f"more than {MAX_ASKS_PER_NODE} admission checks a minute from this node")

    async def _ask(self, upstream: Upstream, repo: str, digest: Digest, credential: str | None) -> _Decision:
        client, authorization = presented.acting_for(upstream.client, credential)
        try:
            r = await client.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo, authorization=authorization)
        except errors.ShoalError as exc:  # e.g. the token server refused a Basic login
            if isinstance(exc, errors.UpstreamError):
                raise errors.UpstreamError("cannot ask the registry about this admission now") from None
            r = None
        if r is not None and (r.status == 429 or r.status >= 500):
            raise errors.UpstreamError(f"the registry answered {r.status} to the admission check")
        allowed = r is not None and r.status == 200
        self.checks["allowed" if allowed else "denied"] += 1
        principal = presented.principal_of(credential, "unknown") if allowed else ""
        return _Decision(allowed, principal, time.monotonic())

    def grant(self, node: str, public_key: Ed25519PublicKey, digest: Digest) -> protocol.Grant:
        """A grant for `node`'s key in `digest`'s swarm, with the receipt of its admission."""
        token, certificate = peercerts.issue_grant(self.key, node, public_key, digest.hex, self.grant_ttl)
        return protocol.Grant(str(digest), token, certificate,
                              signing.sign_receipt(self.key, public_key, str(digest)))

    def renew(self, node: str, public_key: Ed25519PublicKey, receipts: list[protocol.Receipt]) -> protocol.Grants:
        """New grants for the blobs `public_key` was admitted to (blocking: about 0.4 ms each)."""
        grants, refused = [], []
        for r in receipts:
            try:
                digest = Digest.parse(r.digest)
                signing.verify_receipt(self.key.public_key(), public_key, str(digest), r.receipt)
            except (errors.ShoalError, signing.SignatureError):
                refused.append(r.digest)
                continue
            token, certificate = peercerts.issue_grant(self.key, node, public_key, digest.hex, self.grant_ttl)
            grants.append(protocol.Grant(str(digest), token, certificate, r.receipt))
        if refused:
            log.warning("node %s showed %d admission receipts that are not for its key", node, len(refused))
        return protocol.Grants(self.grant_ttl, grants, refused)


def _login_of(ns: str, credential: str | None) -> str | None:
    """"ns|user" for a Basic login (what a password guess is), else None."""
    if credential is None:
        return None
    try:
        login = presented.basic_credentials(credential)
    except errors.Unauthorized:
        return None
    return f"{ns}|{login.username}" if login is not None else None
