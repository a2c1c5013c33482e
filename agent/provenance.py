"""Which registry a blob may be served for (issue 12, part 7).

The cache, the swarm and the metainfo are keyed by digest alone. A registry's yes to
`HEAD /v2/<repo>/blobs/<digest>` authorizes a puller, but it proves nothing about the registry
holding those bytes: a lying registry (or an intercepted `http://` one) that says yes to a
digest it never had would otherwise be served another registry's private blob from this cache or
from the swarm. So a blob goes out for upstream U only if U is one of its known sources: the
agent fetched it from U itself, or U proved it holds it by sending a random sample of its bytes
(a Range GET of SAMPLE_BYTES at a random offset, with the puller's own credential) that matches
the verified bytes here. A proof is remembered with the cached blob (`meta/<hex>.from`); the
registry sees, and logs, one small GET per blob and upstream on this node.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

from shoal import errors
from shoal.oci import Digest
from shoal.registry import Authorization
from shoal.store import BlobStore
from shoal_agent.metrics import AgentMetrics
from shoal_agent.upstreams import Upstream

log = logging.getLogger(__name__)

# A registry that does not hold the blob guesses 64 random bytes: 2^-512.
SAMPLE_BYTES = 64
# Where the sample comes from while the blob is still arriving: its first 256 KiB (the first
# piece of any blob under 1 GiB, the piece a reader waits for first anyway).
IN_FLIGHT_SPAN = 256 << 10

ReadLocal = Callable[[int, int], Awaitable[bytes]]


class Provenance:
    def __init__(self, store: BlobStore, metrics: AgentMetrics) -> None:
        self.store = store
        self.metrics = metrics

    async def known(self, upstream: Upstream, digest: Digest) -> bool:
        return upstream.name in await self.store.sources(digest)

    async def prove(self, upstream: Upstream, repo: str, digest: Digest, span: int, read_local: ReadLocal,
                    authorization: Authorization) -> None:
        """Ask `upstream` for a random sample of the blob within its first `span` bytes and
        compare it with the verified local bytes (`read_local(offset, length)`). Refused with 404
        BLOB_UNKNOWN if they differ; 503 if the registry cannot be asked now."""
        offset = secrets.randbelow(max(1, span - SAMPLE_BYTES + 1))
        try:
            sample = await upstream.client.blob_sample(repo, digest, offset, SAMPLE_BYTES,
                                                       authorization=authorization)
        except errors.ShoalError:
            self.metrics.provenance_checks.labels("unavailable").inc()
            raise errors.UpstreamError("the registry could not be asked to prove it holds this blob") from None
        start, remote = sample if sample is not None else (0, b"")
        local = await read_local(start, len(remote)) if remote else b""
        if not remote or remote != local:
            self.metrics.provenance_checks.labels("refused").inc()
            log.warning("registry %s says it has %s in %s but does not send its bytes: not served for it",
                        upstream.name, digest, repo)
            raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
        self.metrics.provenance_checks.labels("proved").inc()
        await self.store.add_source(digest, upstream.name)
