"""The OCI pull API the agent serves as a registry mirror.

Manifests, tags and referrers always come from the origin registry; blobs from the cache, the
swarm, or the registry. Push verbs answer 405 UNSUPPORTED. Paths are parsed from the raw URL:
names, tags and digests never contain `%`, so any percent-encoding (`%2F`, `%2e%2e`) is refused
before it can become a file name or an upstream path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from yarl import URL

from agent.bindings import Bindings
from agent.fetcher import EMPTY_DIGEST, Download, Fetcher
from agent.metrics import AgentMetrics
from agent.responses import API_VERSION, send_blob
from agent.upstreams import Upstream, Upstreams
from shoal import errors
from shoal.oci import (
    TAG_RE,
    Descriptor,
    Digest,
    parse_manifest,
    parse_manifest_reference,
    validate_name,
)
from shoal.store import BlobStore

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD"})
_ENDPOINTS = ("/manifests/", "/blobs/", "/referrers/")
# Headers of a registry manifest answer worth passing on.
_MANIFEST_HEADERS = ("Content-Type", "Docker-Content-Digest", "Etag", "OCI-Subject")


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


class MirrorApi:
    def __init__(self, *, upstreams: Upstreams, store: BlobStore, fetcher: Fetcher, bindings: Bindings,
                 metrics: AgentMetrics, max_blob_size: int) -> None:
        self.upstreams = upstreams
        self.store = store
        self.fetcher = fetcher
        self.bindings = bindings
        self.metrics = metrics
        self.max_blob_size = max_blob_size

    async def root(self, request: web.Request) -> web.StreamResponse:
        if request.method not in READ_METHODS:
            raise errors.Unsupported("this is a pull-through mirror: only pulls are supported")
        return web.json_response({}, headers=API_VERSION)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        route = parse_path(request.rel_url.raw_path)
        if request.method not in READ_METHODS or (route.kind in ("tags", "referrers")
                                                  and request.method != "GET"):
            raise errors.Unsupported("this is a pull-through mirror: only pulls are supported")
        request["kind"] = route.kind
        upstream = self.upstreams.resolve(request)
        if route.kind == "blobs":
            return await self.blob(request, upstream, route.name, Digest.parse(route.reference))
        if route.kind == "manifests":
            return await self.manifest(request, upstream, route.name, route.reference)
        if route.kind == "tags":
            return await self.tags(request, upstream, route.name)
        return await self.referrers(request, upstream, route.name, Digest.parse(route.reference))

    # ----- manifests, tags, referrers: always from the registry ---------------------------------

    async def manifest(self, request: web.Request, up: Upstream, name: str, ref_text: str) -> web.StreamResponse:
        ref = parse_manifest_reference(ref_text)
        accept = ", ".join(request.headers.getall("Accept", [])) or None
        r = await up.client.get_manifest(name, str(ref), method=request.method, accept=accept)
        self.metrics.registry_requests.labels("manifest", str(r.status)).inc()
        if r.status != 200:
            return self._relay(request, r.status, r.headers, r.body)
        headers = {k: r.headers[k] for k in _MANIFEST_HEADERS if k in r.headers}
        if request.method == "HEAD":
            length = r.headers.get("Content-Length", "")
            return await self._head(request, 200, headers, int(length) if length.isdigit() else None)
        digest = Digest(hashlib.sha256(r.body).hexdigest())
        if isinstance(ref, Digest) and digest != ref:
            self.metrics.integrity_failures.labels("origin").inc()
            raise errors.IntegrityError(f"registry manifest does not match {ref}")
        try:
            parsed = parse_manifest(r.body, headers.get("Content-Type", ""))
            self.bindings.learn(up.name, name, parsed.blobs)
        except errors.BadRequest:
            log.debug("manifest %s@%s is not one shoal understands; not learning its blobs", name, digest)
        headers["Docker-Content-Digest"] = str(digest)
        headers["Etag"] = f'"{digest}"'
        return web.Response(status=200, body=r.body, headers={**API_VERSION, **headers})

    async def tags(self, request: web.Request, up: Upstream, name: str) -> web.StreamResponse:
        query: dict[str, str] = {}
        n, last = request.rel_url.query.get("n"), request.rel_url.query.get("last")
        if n is not None:
            if not n.isdigit() or len(n) > 6:
                raise errors.BadRequest(errors.UNSUPPORTED, "n must be a number")
            query["n"] = n
        if last is not None:
            if not TAG_RE.fullmatch(last):
                raise errors.BadRequest(errors.UNSUPPORTED, "last must be a tag")
            query["last"] = last
        r = await up.client.request("GET", f"/v2/{name}/tags/list", repo=name, query=query)
        self.metrics.registry_requests.labels("tags", str(r.status)).inc()
        extra = {}
        link = r.headers.get("Link")
        if link and "ns" in request.rel_url.query:
            extra["Link"] = self._link_with_ns(link, request.rel_url.query["ns"])
        return self._relay(request, r.status, r.headers, r.body, extra)

    @staticmethod
    def _link_with_ns(link: str, ns: str) -> str:
        """Keep `ns` on the next-page link so the client's next request names the registry."""
        start, end = link.find("<"), link.find(">")
        if start < 0 or end < start:
            return link
        url = URL(link[start + 1 : end]).update_query({"ns": ns})
        return f"{link[:start + 1]}{url}{link[end:]}"

    async def referrers(self, request: web.Request, up: Upstream, name: str, digest: Digest) -> web.StreamResponse:
        query = {}
        artifact = request.rel_url.query.get("artifactType")
        if artifact is not None:
            query["artifactType"] = artifact[:255]
        r = await up.client.request("GET", f"/v2/{name}/referrers/{digest}", repo=name, query=query,
                                    headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        self.metrics.registry_requests.labels("referrers", str(r.status)).inc()
        return self._relay(request, r.status, r.headers, r.body)

    def _relay(self, request: web.Request, status: int, headers: Mapping[str, str], body: bytes,
               extra: dict[str, str] | None = None) -> web.StreamResponse:
        """Pass a registry answer on (errors included), minus hop-by-hop and auth headers."""
        keep = {k: v for k, v in headers.items()
                if k in ("Content-Type", "Docker-Content-Digest", "Link", "OCI-Filters-Applied")}
        return web.Response(status=status, body=body if request.method != "HEAD" else None,
                            headers={**API_VERSION, **keep, **(extra or {})})

    @staticmethod
    async def _head(request: web.Request, status: int, headers: dict[str, str], length: int | None
                    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={**API_VERSION, **headers})
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        await resp.write_eof()
        return resp

    # ----- blobs --------------------------------------------------------------------------------

    async def locate(self, up: Upstream, name: str, digest: Digest) -> int:
        """The blob's size, once the registry confirmed that `name` links it."""
        size = self.bindings.lookup(up.name, name, digest)
        if size is None:
            size = await up.client.blob_size(name, digest)
            self.metrics.registry_requests.labels("blob_head", "404" if size is None else "200").inc()
            if size is None:
                raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
            self.bindings.learn(up.name, name, [Descriptor("", digest, size)])
        if size > self.max_blob_size:
            raise errors.BadRequest(errors.SIZE_INVALID, f"blob of {size} bytes exceeds max_blob_size")
        return size

    async def blob(self, request: web.Request, up: Upstream, name: str, digest: Digest) -> web.StreamResponse:
        size = await self.locate(up, name, digest)
        with self.store.pinned(digest):
            if self.store.has(digest):
                self.metrics.cache_hits.inc()
                self.store.touch(digest)
                request["source"] = "cache"
                served = self.metrics.served_bytes.labels("cache")
                return await send_blob(request, digest, size, _Cached(self.store, digest), served.inc)
        if digest == EMPTY_DIGEST:
            return await send_blob(request, digest, 0, _Empty())
        self.metrics.cache_misses.inc()
        if request.method == "HEAD":
            return await send_blob(request, digest, size, _Empty())
        download = self.fetcher.get(up, name, digest, size)
        request["source"] = "swarm"

        def count(n: int) -> None:
            self.metrics.served_bytes.labels(download.source).inc(n)

        return await send_blob(request, digest, size, _InFlight(download), count)


class _Cached:
    def __init__(self, store: BlobStore, digest: Digest) -> None:
        self._path = store.path(digest)

    def path(self) -> Path | None:
        return self._path

    def stream(self, offset: int, length: int, *, whole: bool) -> AsyncIterator[bytes]:
        raise AssertionError("cached blobs are sent from their file")


class _Empty:
    def path(self) -> Path | None:
        return None

    async def stream(self, offset: int, length: int, *, whole: bool) -> AsyncIterator[bytes]:
        nothing: tuple[bytes, ...] = ()
        for chunk in nothing:
            yield chunk


class _InFlight:
    def __init__(self, download: Download) -> None:
        self.download = download

    def path(self) -> Path | None:
        return self.download.path()

    def stream(self, offset: int, length: int, *, whole: bool) -> AsyncIterator[bytes]:
        return self.download.stream(offset, length, whole=whole)
