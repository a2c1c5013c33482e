"""Client for an upstream registry (distribution API v2) with Basic and Bearer-token auth.

One `RegistryClient` per upstream registry and identity. It answers 401 challenges itself:
Basic (then sends Basic up front), or Bearer (fetches a token for the repository's pull scope
from the challenge's realm and caches it until shortly before `expires_in`). Credentials are
sent only to the registry's own origin and its token realm, never logged; aiohttp drops
`Authorization` on cross-origin redirects (blob redirects to object storage).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from shoal import errors
from shoal.flights import Backoff
from shoal.oci import DEFAULT_ACCEPT, MAX_MANIFEST_BYTES, Digest

log = logging.getLogger(__name__)

BLOB_CHUNK = 1 << 20
MAX_REDIRECTS = 3
RETRIED = frozenset({429, 502, 503, 504})
# A Retry-After longer than this is not waited for: the client is told instead.
MAX_RETRY_WAIT = 5.0
# Bearer tokens are refreshed this long before they expire.
TOKEN_SLACK = 10.0
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class _Own:
    """Marker: use the client's own configured credentials (answering challenges)."""

    def __repr__(self) -> str:
        return "OWN"


OWN = _Own()
# What to authenticate a request with: OWN credentials, a puller's Authorization value, or None.
Authorization = _Own | str | None


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: Mapping[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme not in ("basic", "bearer"):
            return None
        return cls(scheme, dict(_CHALLENGE_RE.findall(rest)))


@dataclass(frozen=True, slots=True)
class Response:
    """A small registry response read whole (manifests, tag lists, errors)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number, or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _timeout(read: float) -> aiohttp.ClientTimeout:
    # No total limit: a multi-GB layer may take long; a stalled socket may not.
    return aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read)


def _under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, by whole segments (/token does not admit /tokens)."""
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


class RegistryClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        *,
        credentials: Credentials | None,
        user_agent: str,
        read_timeout: float = 30.0,
        token_realms: Sequence[str] = (),
        redirect_hosts: Sequence[str] = (),
        retry_budget: float = 10.0,
    ) -> None:
        self.http = http
        self.base = URL(base_url)
        self.credentials = credentials
        self.user_agent = user_agent
        self.read_timeout = read_timeout
        # Where this client may send its own credentials for tokens, besides the registry's host,
        # and where the registry may redirect (object storage): nothing else is ever contacted.
        self.token_realms = tuple(URL(r) for r in token_realms)
        self.redirect_hosts = frozenset(h.lower() for h in redirect_hosts)
        self.retry_budget = retry_budget
        self.retries = 0
        self._basic_known = False
        self._tokens: dict[str, tuple[str, float]] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}

    def with_credentials(self, credentials: Credentials | None) -> RegistryClient:
        """A client of the same registry (same limits, realms and redirects) acting as someone
        else: its own token cache, nothing shared with this one."""
        return RegistryClient(self.http, str(self.base), credentials=credentials, user_agent=self.user_agent,
                              read_timeout=self.read_timeout, token_realms=[str(r) for r in self.token_realms],
                              redirect_hosts=sorted(self.redirect_hosts), retry_budget=self.retry_budget)

    # ----- auth -------------------------------------------------------------------------------

    def _auth_header(self, scope: str | None) -> str | None:
        if self._basic_known and self.credentials is not None:
            return self.credentials.basic()
        if scope is not None:
            cached = self._tokens.get(scope)
            if cached is not None and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
        return None

    async def _answer_challenge(self, header: str, scope: str | None, sent: str | None) -> bool:
        """Learn how to authenticate from a 401; True if a retry with other credentials can
        succeed. `sent` is the Authorization the refused request carried: concurrent requests
        that went out before the first challenge was answered retry with what it learned."""
        challenge = Challenge.parse(header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if self.credentials is None:
                return False
            self._basic_known = True
            return sent != self.credentials.basic()
        realm = challenge.params.get("realm")
        if not realm or scope is None:
            return False
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            if cached is not None and cached[1] > time.monotonic() and f"Bearer {cached[0]}" != sent:
                return True
            token, ttl = await self._fetch_token(realm, challenge.params.get("service"), scope)
            self._tokens[scope] = (token, time.monotonic() + max(ttl - TOKEN_SLACK, 1.0))
        return True

    def _realm_allowed(self, realm: URL) -> bool:
        if realm.scheme not in ("http", "https") or not realm.host:
            return False
        if realm.host == self.base.host:
            # the registry's own host (a token server beside it, any port), but not in clear
            # text when the registry is asked over TLS: the login would cross the wire readable
            return realm.scheme == "https" or self.base.scheme == "http"
        return any(realm.origin() == allowed.origin() and _under(realm.path, allowed.path)
                   for allowed in self.token_realms)

    async def _fetch_token(self, realm: str, service: str | None, scope: str) -> tuple[str, float]:
        realm_url = URL(realm)
        if not self._realm_allowed(realm_url):
            # A realm elsewhere would receive this client's credentials: only configured ones.
            if realm_url.host == self.base.host:
                raise errors.UpstreamError(f"registry named a token realm in clear text ({realm_url.scheme}://) "
                                           f"on {realm_url.host!r}, although it is asked over TLS")
            raise errors.UpstreamError(f"registry named a token realm on {realm_url.host!r}, which is neither "
                                       "the registry's host nor in token_realms")
        query: dict[str, str] = {"scope": scope} if scope else {}  # "": a login, no repository
        if service:
            query["service"] = service
        headers = {"User-Agent": self.user_agent}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
            query["account"] = self.credentials.username
        try:
            async with self.http.get(
                realm_url.update_query(query), headers=headers, timeout=_timeout(self.read_timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status in (401, 403):
                    user = self.credentials.username if self.credentials is not None else "(none)"
                    raise errors.LoginRefused(errors.login_refused(user, realm))
                if resp.status != 200:
                    raise errors.UpstreamError(f"token server answered {resp.status}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if isinstance(exc, ValueError):
                raise errors.UpstreamError("token server answered with a body that is not JSON") from None
            where = f"token server {realm_url.host}:{realm_url.port}"
            raise errors.UpstreamError(errors.connection_problem(exc, where, what="the token server")) from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise errors.UpstreamError("token server answered without a token")
        expires = doc.get("expires_in", 60)
        return token, float(expires) if isinstance(expires, (int, float)) else 60.0

    # ----- requests -----------------------------------------------------------------------------

    def _url(self, path: str, query: Mapping[str, str] | None = None) -> URL:
        url = self.base.join(URL(path, encoded=True)) if path.startswith("/") else self.base / path
        return url.update_query(query) if query else url

    async def _once(self, method: str, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """One request, following redirects only to the registry itself or to `redirect_hosts`
        (credentials go only to the registry's own origin)."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await self.http.request(method, url, headers=headers, allow_redirects=False,
                                               timeout=_timeout(self.read_timeout))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise errors.UpstreamError(errors.connection_problem(exc, f"{self.base.host}:{self.base.port}")) \
                    from None
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.headers.get("Location", "")
            resp.release()
            target = url.join(URL(location))
            same = target.origin() == self.base.origin()
            if target.scheme not in ("http", "https") or not (
                    same or (target.host or "").lower() in self.redirect_hosts):
                raise errors.UpstreamError(f"registry redirected to {target.host!r}, which is not in redirect_hosts")
            if not same:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
            if resp.status == 303:
                method = "GET"
        raise errors.UpstreamError("registry redirected too many times")

    async def _retrying(self, method: str, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """Retry 429 and 502/503/504 while the registry's Retry-After (or a short backoff) fits
        in `retry_budget`; then hand the last answer to the caller."""
        spent, backoff = 0.0, Backoff(0.25, 2.0)
        while True:
            resp = await self._once(method, url, headers)
            if resp.status not in RETRIED:
                return resp
            step = backoff.next()
            wait = _retry_after(resp.headers.get("Retry-After"))
            wait = step if wait is None else wait
            if spent + wait > self.retry_budget or wait > MAX_RETRY_WAIT:
                return resp
            resp.release()
            self.retries += 1
            await asyncio.sleep(wait)
            spent += wait

    async def _send(
        self, method: str, path: str, *, repo: str | None, headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None, authorization: Authorization = OWN, login: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send a request. With `authorization=OWN` (this client's own credentials) one auth
        challenge is answered; otherwise the given Authorization value (None: anonymous) is sent
        exactly once, as the puller's own. `login`: a Bearer challenge without a repository is
        answered with a token for no scope. The caller must release the response."""
        scope = f"repository:{repo}:pull" if repo else ("" if login else None)
        hdrs = {"User-Agent": self.user_agent, **(headers or {})}
        url = self._url(path, query)
        if not isinstance(authorization, _Own):
            if authorization is not None:
                hdrs["Authorization"] = authorization
            return await self._retrying(method, url, hdrs)
        for attempt in range(2):
            auth = self._auth_header(scope)
            if auth is not None:
                hdrs["Authorization"] = auth
            resp = await self._retrying(method, url, hdrs)
            if resp.status == 401 and attempt == 0:
                try:
                    answered = await self._answer_challenge(resp.headers.get("WWW-Authenticate", ""), scope,
                                                            auth)
                except BaseException:
                    resp.release()
                    raise
                if answered:
                    resp.release()
                    continue
            return resp
        raise AssertionError("unreachable")

    async def request(
        self, method: str, path: str, *, repo: str | None, headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None, limit: int = MAX_MANIFEST_BYTES, authorization: Authorization = OWN,
    ) -> Response:
        """A whole small response; bodies above `limit` are refused, not truncated."""
        resp = await self._send(method, path, repo=repo, headers=headers, query=query, authorization=authorization)
        async with resp:
            declared = resp.content_length
            if method != "HEAD" and declared is not None and declared > limit:
                raise errors.UpstreamError(f"registry response of {declared} bytes exceeds {limit}")
            body = b""
            if method != "HEAD":
                try:
                    body = await resp.content.read(limit + 1)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    where = f"registry {self.base.host}:{self.base.port}"
                    raise errors.UpstreamError(errors.read_problem(exc, where)) from None
                if len(body) > limit:
                    raise errors.UpstreamError(f"registry response exceeds {limit} bytes")
            return Response(resp.status, dict(resp.headers), body)

    async def ping(self, *, authorization: Authorization = OWN) -> int:
        """GET /v2/ as this identity: the registry's status (200: it accepted the credential).
        With OWN credentials a Bearer challenge is answered with a token for no repository, as
        `docker login` does, so a login is checked without naming a repository."""
        resp = await self._send("GET", "/v2/", repo=None, authorization=authorization, login=True)
        async with resp:
            return resp.status

    async def check_login(self) -> None:
        """That the registry answers and takes this client's login (GET /v2/, as `docker login`):
        errors.LoginRefused naming the user and the realm if it refuses it, UpstreamError in
        plain words if it cannot be reached. Without a login, a 401 is fine: pullers bring theirs."""
        resp = await self._send("GET", "/v2/", repo=None, login=True)
        async with resp:
            if resp.status == 200 or (resp.status == 401 and self.credentials is None):
                return
            if resp.status == 401 and self.credentials is not None:
                challenge = Challenge.parse(resp.headers.get("WWW-Authenticate", ""))
                realm = challenge.params.get("realm") if challenge is not None else None
                raise errors.LoginRefused(errors.login_refused(self.credentials.username, realm))
            raise errors.UpstreamError(f"{self.base.host}:{self.base.port} answered HTTP {resp.status} to GET /v2/: "
                                       "is it a registry (distribution API v2)?")

    async def get_manifest(self, repo: str, reference: str, *, method: str = "GET",
                           accept: str | None = None, authorization: Authorization = OWN) -> Response:
        return await self.request(method, f"/v2/{repo}/manifests/{reference}", repo=repo,
                                  headers={"Accept": accept or DEFAULT_ACCEPT}, authorization=authorization)

    async def blob_size(self, repo: str, digest: Digest) -> int | None:
        """HEAD a blob in a repository: its size, or None if the repository does not link it."""
        r = await self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo)
        if r.status == 404:
            return None
        if r.status != 200:
            raise errors.UpstreamError(f"registry answered {r.status} for blob HEAD")
        length = r.headers.get("Content-Length", "")
        if not length.isdigit():
            raise errors.UpstreamError("registry blob HEAD without Content-Length")
        return int(length)

    async def stream_blob(self, repo: str, digest: Digest, *, offset: int = 0,
                          authorization: Authorization = OWN) -> AsyncIterator[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset else None
        resp = await self._send("GET", f"/v2/{repo}/blobs/{digest}", repo=repo, headers=headers,
                                authorization=authorization)
        async with resp:
            expected = 206 if offset else 200
            if resp.status == 404:
                raise errors.NotFound(errors.BLOB_UNKNOWN, detail=str(digest))
            if resp.status in (401, 403) and resp.url.origin() == self.base.origin():
                # (the registry's own no; object storage it redirected to answers for its URL)
                raise errors.CredentialRefused(f"registry answered {resp.status} for blob GET")
            if resp.status != expected:
                raise errors.UpstreamError(f"registry answered {resp.status} for blob GET")
            try:
                async for chunk in resp.content.iter_chunked(BLOB_CHUNK):
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                where = f"registry {self.base.host}:{self.base.port}"
                raise errors.UpstreamError(errors.read_problem(exc, where)) from None

    async def download_blob(
        self, repo: str, digest: Digest, dest: Path, *, max_size: int,
        progress: Callable[[int], None] | None = None, authorization: Authorization = OWN,
    ) -> int:
        """Fetch a blob into `dest`, hashing as it arrives. IntegrityError if the bytes do not
        hash to `digest`; UpstreamError if the registry sends more than `max_size` bytes."""
        h = hashlib.sha256()
        size = 0

        def write(f: Any, chunk: bytes) -> None:
            h.update(chunk)
            f.write(chunk)

        # unbuffered: what `progress` reports is readable from the file at once
        f = await asyncio.to_thread(open, dest, "wb", 0)
        try:
            async for chunk in self.stream_blob(repo, digest, authorization=authorization):
                size += len(chunk)
                if size > max_size:
                    raise errors.UpstreamError(f"registry sent more than the {max_size} bytes expected")
                await asyncio.to_thread(write, f, chunk)
                if progress is not None:
                    progress(len(chunk))
            await asyncio.to_thread(f.close)
            if h.hexdigest() != digest.hex:
                raise errors.IntegrityError(f"registry bytes for {digest} hash to sha256:{h.hexdigest()}")
        except BaseException:
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        return size
