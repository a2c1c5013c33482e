"""The OCI pull API the agent serves as a registry mirror.

Manifests, tags and referrers always come from the registry, with the puller's credential;
blobs from the cache, the swarm, or the registry, after the registry authorized the puller for
that repository's blob (see agent.authz). Push verbs answer 405 UNSUPPORTED. Paths are parsed
from the raw URL: names, tags and digests never contain `%`, so any percent-encoding (`%2F`,
`%2e%2e`) is refused before it can become a file name or an upstream path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from yarl import URL

from shoal import errors
from shoal.oci import Digest, parse_manifest_reference, validate_name
from shoal.registry import Authorization, Response
from shoal.store import BlobStore
from shoal_agent.authz import Authorizer, Credential
from shoal_agent.config import AuthSettings
from shoal_agent.download import EMPTY_DIGEST, Download
from shoal_agent.fetcher import Fetcher
from shoal_agent.manifests import ManifestKeeper
from shoal_agent.metrics import AgentMetrics
from shoal_agent.provenance import Provenance
from shoal_agent.responses import API_VERSION, oci_error, send_blob
from shoal_agent.state import Audit, audit_of, state_of
from shoal_agent.upstreams import Upstream, Upstreams

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD"})
_ENDPOINTS = ("/manifests/", "/blobs/", "/referrers/")
# Headers of a registry manifest answer worth passing on.
_MANIFEST_HEADERS = ("Content-Type", "Docker-Content-Digest", "Etag", "OCI-Subject")
_RELAYED = ("Content-Type", "Docker-Content-Digest", "Link", "OCI-Filters-Applied", "WWW-Authenticate",
            "Retry-After")




@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # manifests, blobs, referrers, tags
    name: str
    reference: str


def parse_path(raw_path: str) -> Route:
    tail = raw_path.removeprefix("/v2/")
    if "%" in tail:
        raise errors.BadRequest(errors.NAME_INVALID, "percent-encoded paths are not valid names")
    if tail.endswith("/tags/list"):
        return Route("tags", validate_name(tail.removesuffix("/tags/list")), "")
    best = max(((tail.rfind(marker), marker) for marker in _ENDPOINTS), default=(-1, ""))
    index, marker = best
    if index <= 0:
        raise errors.NotFound(errors.NAME_UNKNOWN, "no such endpoint")
    name, reference = tail[:index], tail[index + len(marker):]
    kind = marker.strip("/")
    if kind == "blobs" and (reference == "uploads" or reference.startswith("uploads/")):
        raise errors.Unsupported("this is a pull-through mirror: pushing is not supported")
    if "/" in reference or not reference:
        raise errors.NotFound(errors.NAME_UNKNOWN, "no such endpoint")
    return Route(kind, validate_name(name), reference)


def _unauthorized(challenge: str | None) -> web.Response:
    return oci_error(errors.UNAUTHORIZED, headers={"WWW-Authenticate": challenge} if challenge else None)


class MirrorApi:
    def __init__(self, *, upstreams: Upstreams, store: BlobStore, fetcher: Fetcher, authorizer: Authorizer,
                 keeper: ManifestKeeper, auth: AuthSettings, metrics: AgentMetrics, max_blob_size: int) -> None:
        self.upstreams = upstreams
        self.store = store
        self.provenance = Provenance(store, metrics, fetcher.membership)
        self.fetcher = fetcher
        self.authorizer = authorizer
        self.keeper = keeper
        self.auth = auth
        self.metrics = metrics
        self.max_blob_size = max_blob_size

    async def root(self, request: web.Request) -> web.StreamResponse:
        """`/v2/`: the registry's answer for this credential (so clients learn the challenge)."""
        if request.method not in READ_METHODS:
            raise errors.Unsupported("this is a pull-through mirror: only pulls are supported")
        audit = audit_of(request)
        audit.kind = "ping"
        try:
            up = self.upstreams.resolve(request)
        except errors.NotFound:
            return web.json_response({}, headers=API_VERSION)  # several upstreams, none named
        audit.ns = up.name
        cred = self.authorizer.credential(request, up)
        audit.credential_used(cred)
        audit.principal_confirmed = await self._confirmed(up, cred)
        r = await up.client.request("GET", "/v2/", repo=None, authorization=cred.upstream_auth)
        if r.status == 200:
            audit.principal = cred.principal(up.client.credentials.username if up.client.credentials else None)
            return web.json_response({}, headers=API_VERSION)
        return self._relay(request, r)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        audit = audit_of(request)
        route = parse_path(request.rel_url.raw_path)
        if request.method not in READ_METHODS or (route.kind in ("tags", "referrers")
                                                  and request.method != "GET"):
            raise errors.Unsupported("this is a pull-through mirror: only pulls are supported")
        audit.kind = route.kind
        audit.repository, audit.reference = route.name, route.reference or None
        upstream = self.upstreams.resolve(request)
        audit.ns = upstream.name
        cred = self.authorizer.credential(request, upstream)
        audit.credential_used(cred)
        audit.principal_confirmed = await self._confirmed(upstream, cred)
        if route.kind == "blobs":
            return await self.blob(request, upstream, cred, route.name, Digest.parse(route.reference))
        if route.kind == "manifests":
            return await self.manifest(request, upstream, cred, route.name, route.reference)
        if route.kind == "tags":
            return await self.tags(request, upstream, cred, route.name)
        return await self.referrers(request, upstream, cred, route.name, Digest.parse(route.reference))

    async def _confirmed(self, up: Upstream, cred: Credential) -> bool | None:
        """Whether the principal journaled for this request is the registry's word (True), only
        the client's claim (False: the registry checks no credentials) or unknown (None)."""
        return True if cred.kind == "anonymous" else await self.authorizer.checks_credentials(up)

    def _principal(self, up: Upstream, cred: Credential) -> str:
        return cred.principal(up.client.credentials.username if up.client.credentials else None)

    # ----- manifests, tags, referrers: always from the registry ---------------------------------

    async def manifest(self, request: web.Request, up: Upstream, cred: Credential, name: str,
                       ref_text: str) -> web.StreamResponse:
        ref = parse_manifest_reference(ref_text)
        audit = audit_of(request)
        accept = ", ".join(request.headers.getall("Accept", [])) or None
        try:
            r = await up.client.get_manifest(name, str(ref), method=request.method, accept=accept,
                                             authorization=cred.upstream_auth)
            if r.status >= 500:
                raise errors.UpstreamError(f"registry answered {r.status}")
        except errors.UpstreamError as exc:
            return await self._kept_manifest(request, up, cred, name, str(ref), str(exc))
        if r.status == 429 and self.auth.mode == "availability":
            with contextlib.suppress(errors.UpstreamError):
                return await self._kept_manifest(request, up, cred, name, str(ref), "registry answered 429")
        self.metrics.registry_requests.labels("manifest", str(r.status)).inc()
        audit.authz_method, audit.registry_status = "registry", str(r.status)
        if r.status != 200:
            return self._relay(request, r)
        audit.principal = self._principal(up, cred)
        headers = {k: r.headers[k] for k in _MANIFEST_HEADERS if k in r.headers}
        if request.method == "HEAD":
            length = r.headers.get("Content-Length", "")
            if self.auth.mode == "availability" and "Docker-Content-Digest" in headers:
                await self.keeper.keep(cred.fingerprint, up.name, name, str(ref), body=None,
                                       digest=headers["Docker-Content-Digest"],
                                       media_type=headers.get("Content-Type", ""), principal=audit.principal)
            audit.digest = headers.get("Docker-Content-Digest")
            return await self._head(request, 200, headers, int(length) if length.isdigit() else None)
        digest = Digest(hashlib.sha256(r.body).hexdigest())
        if isinstance(ref, Digest) and digest != ref:
            self.metrics.integrity_failures.labels("registry").inc()
            raise errors.IntegrityError(f"registry manifest does not match {ref}")
        audit.digest = str(digest)
        headers["Docker-Content-Digest"] = str(digest)
        headers["Etag"] = f'"{digest}"'
        if self.auth.mode == "availability":
            for reference in {str(ref), str(digest)}:
                await self.keeper.keep(cred.fingerprint, up.name, name, reference, digest=str(digest),
                                       media_type=headers.get("Content-Type", ""), body=r.body,
                                       principal=audit.principal)
        return web.Response(status=200, body=r.body, headers={**API_VERSION, **headers})

    async def _kept_manifest(self, request: web.Request, up: Upstream, cred: Credential, name: str,
                             reference: str, reason: str) -> web.StreamResponse:
        """The registry is unreachable: availability mode answers with what this credential was
        allowed before; strict mode refuses."""
        audit = audit_of(request)
        audit.registry_status = "unreachable"
        kept = await self.keeper.find(cred.fingerprint, up.name, name, reference) \
            if self.auth.mode == "availability" else None
        if kept is None:
            raise errors.UpstreamError(f"{reason}: this manifest cannot be served or authorized now "
                                       f"(auth.mode: {self.auth.mode})")
        audit.authz_method, audit.principal, audit.digest = "stale_decision", kept.principal, kept.digest
        headers = {**API_VERSION, "Content-Type": kept.media_type, "Docker-Content-Digest": kept.digest,
                   "Etag": f'"{kept.digest}"'}
        if request.method == "HEAD":
            return await self._head(request, 200, headers, len(kept.body))
        return web.Response(status=200, body=kept.body, headers=headers)

    async def tags(self, request: web.Request, up: Upstream, cred: Credential, name: str) -> web.StreamResponse:
        query: dict[str, str] = {}
        n, last = request.rel_url.query.get("n"), request.rel_url.query.get("last")
        if n is not None:
            if not n.isdigit() or len(n) > 6:
                raise errors.BadRequest(errors.PAGINATION_NUMBER_INVALID)
            query["n"] = n
        if last is not None:
            # passed on encoded, as distribution takes any value here (it only compares tags)
            query["last"] = last[:256]
        r = await up.client.request("GET", f"/v2/{name}/tags/list", repo=name, query=query,
                                    authorization=cred.upstream_auth)
        self.metrics.registry_requests.labels("tags", str(r.status)).inc()
        self._note(request, up, cred, r)
        extra = {}
        link = r.headers.get("Link")
        if link and "ns" in request.rel_url.query:
            extra["Link"] = self._link_with_ns(link, request.rel_url.query["ns"])
        return self._relay(request, r, extra)

    @staticmethod
    def _link_with_ns(link: str, ns: str) -> str:
        """Keep `ns` on the next-page link so the client's next request names the registry."""
        start, end = link.find("<"), link.find(">")
        if start < 0 or end < start:
            return link
        url = URL(link[start + 1 : end]).update_query({"ns": ns})
        return f"{link[:start + 1]}{url}{link[end:]}"

    async def referrers(self, request: web.Request, up: Upstream, cred: Credential, name: str,
                        digest: Digest) -> web.StreamResponse:
        query = {}
        artifact = request.rel_url.query.get("artifactType")
        if artifact is not None:
            query["artifactType"] = artifact[:255]
        r = await up.client.request("GET", f"/v2/{name}/referrers/{digest}", repo=name, query=query,
                                    headers={"Accept": "application/vnd.oci.image.index.v1+json"},
                                    authorization=cred.upstream_auth)
        self.metrics.registry_requests.labels("referrers", str(r.status)).inc()
        self._note(request, up, cred, r)
        return self._relay(request, r)

    def _note(self, request: web.Request, up: Upstream, cred: Credential, r: Response) -> None:
        audit = audit_of(request)
        audit.authz_method, audit.registry_status = "registry", str(r.status)
        if r.status == 200:
            audit.principal = self._principal(up, cred)

    def _relay(self, request: web.Request, r: Response, extra: Mapping[str, str] | None = None) -> web.StreamResponse:
        """Pass a registry answer on (errors and challenges included), minus hop-by-hop headers.
        A challenge is relayed verbatim: its realm is the registry's, never rewritten."""
        keep = {k: v for k, v in r.headers.items() if k in _RELAYED}
        return web.Response(status=r.status, body=r.body if request.method != "HEAD" else None,
                            headers={**API_VERSION, **keep, **(extra or {})})

    @staticmethod
    async def _head(request: web.Request, status: int, headers: dict[str, str], length: int | None
                    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={**API_VERSION, **headers})
        if length is not None:
            resp.content_length = length
        hook = state_of(request).before_start
        if hook is not None:
            await hook(status)
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    # ----- blobs --------------------------------------------------------------------------------

    async def blob(self, request: web.Request, up: Upstream, cred: Credential, name: str,
                   digest: Digest) -> web.StreamResponse:
        audit = audit_of(request)
        audit.digest = str(digest)
        verdict = await self.authorizer.blob(up, cred, name, digest)
        decision = verdict.decision
        audit.authz_method, audit.registry_status = verdict.method, verdict.registry_status
        if verdict.method == "registry":
            self.metrics.registry_requests.labels("blob_head", str(decision.status)).inc()
        if decision.status == 401:
            return _unauthorized(decision.challenge)
        if decision.status == 403:
            raise errors.Denied()
        if decision.status != 200 or decision.size is None:
            raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
        audit.principal = decision.principal
        size = decision.size
        if size > self.max_blob_size:
            raise errors.BadRequest(errors.SIZE_INVALID, f"blob of {size} bytes exceeds max_blob_size")
        with self.store.pinned(digest):
            # A cached file is served only while it is the file that was verified (an fstat; a
            # changed one is hashed again, a corrupt one evicted and fetched anew below).
            verified = self.store.size_of(digest) if self.store.has(digest) else None
            proven = verified is not None and await self.provenance.known(up, digest)
            # A HEAD for a registry not known to hold the blob is answered as a miss (the
            # registry's own size): it must not learn that, or how big, another's blob is here.
            if verified is not None and (proven or request.method != "HEAD") and await self.store.verify(digest):
                if not proven:
                    await self.provenance.confirm(up, name, digest, cred.upstream_auth)
                self.metrics.cache_hits.inc()
                self.store.touch(digest)
                audit.source = "cache"
                audit.verified = True
                served = self.metrics.served_bytes.labels("cache")
                # The registry's yes authorizes; the length is the verified file's (a HEAD that
                # claimed 0 or 1000 bytes made this a 200 with an empty or truncated body).
                return await send_blob(request, digest, verified, _Cached(self.store, digest),
                                       self._counter(audit, served.inc))
        if digest == EMPTY_DIGEST:
            audit.verified = True
            return await send_blob(request, digest, 0, _Empty())
        if size == 0:  # only the empty blob has 0 bytes: an empty 200 would be a wrong body
            raise errors.UpstreamError("the registry claims 0 bytes for a blob that is not empty")
        self.metrics.cache_misses.inc()
        if request.method == "HEAD":
            return await send_blob(request, digest, size, _Empty())
        download = self.fetcher.get(up, name, digest, size, authorization=cred.upstream_auth)
        await download.chosen.wait()  # bounded by the download's own deadlines
        mine = (up.name, name, cred.upstream_auth)
        for _ in range(REFUSED_RETRIES):
            if not _refused(download) or _fetched_with(download) == mine:
                break
            # The download this request joined ran with another puller's credential, repository
            # or registry, and the registry refused those (revoked since its yes, say): not this
            # client's, which it has just authorized. Again, joining whichever download waiters
            # started meanwhile (itself refused, it may be another refused puller's).
            download = self.fetcher.get(up, name, digest, size, authorization=cred.upstream_auth,
                                        instead_of=download)
            await download.chosen.wait()
        audit.source = download.source
        if download.error is not None and download.done.is_set():
            if _refused(download) and _fetched_with(download) == mine:
                # the registry's no to this very credential outlives the yes the cache holds
                self.authorizer.forget(up, cred, name, digest)
            raise download.error  # it ended without the blob (what streaming it would say too)
        if up.name not in download.sources and not await self.provenance.known(up, digest):
            # the bytes come from the swarm or from another registry: the origin confirms that
            # `up` holds them before any goes out
            await self.provenance.confirm(up, name, digest, cred.upstream_auth)
            download.sources.add(up.name)
        # The download's length (the digest fixes it), not this registry's HEAD: a download
        # another registry started can finish meanwhile, and its verified file went out cut to a
        # smaller claim as a complete 200.
        size = download.size

        def count(n: int) -> None:
            audit.source, audit.fallback = download.source, download.fallback
            self.metrics.served_bytes.labels(download.source).inc(n)

        response = await send_blob(request, digest, size, _InFlight(download), self._counter(audit, count))
        audit.source, audit.fallback, audit.verified = download.source, download.fallback, True
        return response

    @staticmethod
    def _counter(audit: Audit, inner: Callable[[int], None]) -> Callable[[int], None]:
        """Count bytes sent for the journal, then for the metrics."""

        def count(n: int) -> None:
            audit.bytes += n
            inner(n)

        return count


# Downloads refused for other pullers' credentials a request moves on from before it gives up:
# each one it joined was started by a waiter with other credentials (bounded by the pullers who
# joined, and by each refusal costing the registry one GET).
REFUSED_RETRIES = 3


def _refused(download: Download) -> bool:
    """Whether `download` ended because the registry refused its credential or repository."""
    return download.done.is_set() and isinstance(download.error, errors.CredentialRefused | errors.NotFound)


def _fetched_with(download: Download) -> tuple[str, str, Authorization]:
    """(registry, repository, credential) a download asked the registry with."""
    return download.upstream.name, download.repo, download.authorization


class _Cached:
    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self._path = store.path(digest)

    def path(self) -> Path | None:
        return self._path

    def stream(self, offset: int, length: int, *, whole: bool) -> AsyncGenerator[bytes, None]:
        raise AssertionError("cached blobs are sent from their file")


class _Empty:
    def path(self) -> Path | None:
        return None

    async def stream(self, offset: int, length: int, *, whole: bool) -> AsyncGenerator[bytes, None]:
        nothing: tuple[bytes, ...] = ()
        for chunk in nothing:
            yield chunk


class _InFlight:
    def __init__(self, download: Download) -> None:
        self.download = download

    def path(self) -> Path | None:
        return self.download.path()

    def stream(self, offset: int, length: int, *, whole: bool) -> AsyncGenerator[bytes, None]:
        return self.download.stream(offset, length, whole=whole)

