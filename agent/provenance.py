"""Which registry a blob may be served for (issue 12, part 7).

The cache, the swarm and the metainfo are keyed by digest alone. A registry's yes to
`HEAD /v2/<repo>/blobs/<digest>` authorizes a puller, but it proves nothing about the registry
holding those bytes: a lying or intercepted registry that says yes to a digest it never had
would otherwise be served another registry's private blob from this cache or from the swarm.
So a blob goes out for upstream U only if U is one of its known sources, kept with the cached
blob (`meta/<hex>.sources`):

- this node fetched the blob from U itself, or
- the origin vouched for (U, digest): it fetched the blob from U (once, checked against the
  digest) and signed that (signing.sign_source), in its answer to an admission for U (which the
  registry U granted for the puller's credential).

A sample of the bytes is no proof: a registry can send one matching byte, guess a prefix every
gzip layer shares, or hold a near-copy; only the whole blob, checked against the digest, is.
"""

from __future__ import annotations

import logging

from shoal import errors
from shoal.oci import Digest
from shoal.registry import Authorization
from shoal.store import BlobStore
from shoal_agent.membership import Membership, SwarmFailure
from shoal_agent.metrics import AgentMetrics
from shoal_agent.upstreams import Upstream

log = logging.getLogger(__name__)


class Provenance:
    def __init__(self, store: BlobStore, metrics: AgentMetrics, membership: Membership | None) -> None:
        self.store = store
        self.metrics = metrics
        self.membership = membership

    async def known(self, upstream: Upstream, digest: Digest) -> bool:
        return upstream.name in await self.store.sources(digest)

    async def confirm(self, upstream: Upstream, repo: str, digest: Digest, authorization: Authorization) -> None:
        """Have the origin vouch that `upstream` holds `digest` (asking with the puller's
        `authorization`), and remember it. Refused (404 BLOB_UNKNOWN) if the origin says it does
        not; 503 if nobody can say now."""
        if self.membership is None:
            self.metrics.provenance_checks.labels("unavailable").inc()
            raise errors.UpstreamError(f"this blob came from another registry than {upstream.name}, and there is no "
                                       "origin to confirm that it holds the blob too")
        try:
            await self.membership.admit(upstream, repo, digest, authorization)  # (an Admission, or it raises)
        except SwarmFailure as exc:
            if exc.reason == "origin_refused":
                self.metrics.provenance_checks.labels("refused").inc()
                log.warning("registry %s says it has %s in %s, and the origin does not vouch for it: not served "
                            "for it", upstream.name, digest, repo)
                raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest)) from None
            self.metrics.provenance_checks.labels("unavailable").inc()
            raise errors.UpstreamError(f"cannot confirm that {upstream.name} holds this blob now ({exc})") from None
        self.metrics.provenance_checks.labels("confirmed").inc()
        await self.store.add_source(digest, upstream.name)
