"""Pass-through authorization: the registry decides who may pull what, for every response.

Which credential a request uses:
- the client's own `Authorization` (Basic or a Bearer token from the registry's token server),
  forwarded verbatim to the registry, never replaced;
- without one: the node's credentials if `auth.unauthenticated: node`, else none at all, and
  the registry's own 401 challenge is relayed so the client authenticates (containerd only
  sends credentials to a mirror after that challenge).

Before the first byte of a blob the registry is asked, with that credential, whether this
repository's blob may be pulled (a HEAD, which is also the registry's own audit event). The
answer is kept for `auth.decision_ttl`, keyed by credential fingerprint, upstream, repository
and digest, never by digest alone: a blob cached for one repository is served under another
only after the registry said yes for that one. When the registry is unreachable, `strict` mode
refuses; `availability` mode serves under an earlier yes (up to `auth.stale_decision_max_age`)
and says so in the journal.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diskcache
from aiohttp import web

from shoal import errors, presented
from shoal.flights import SingleFlight
from shoal.logs import fingerprint
from shoal.oci import Digest
from shoal.registry import OWN, Authorization
from shoal.store import NoPickleDisk
from shoal_agent.config import AuthSettings
from shoal_agent.upstreams import Upstream

MAX_DECISIONS = 100_000

CredentialKind = Literal["client", "node", "anonymous"]


@dataclass(frozen=True, slots=True)
class Credential:
    kind: CredentialKind
    header: str | None  # the client's Authorization value (kind "client" only); never logged
    fingerprint: str  # what may be logged, journaled or used as a key

    @property
    def upstream_auth(self) -> Authorization:
        """How to present this credential to the registry."""
        return OWN if self.kind == "node" else self.header

    def principal(self, node_user: str | None) -> str:
        """Who the registry accepted: call only after it answered 2xx for this credential."""
        if self.kind == "node":
            return node_user or "node"
        return presented.principal_of(self.header if self.kind == "client" else None, self.fingerprint)


@dataclass(frozen=True, slots=True)
class Decision:
    status: int  # the registry's answer: 200, 401, 403 or 404
    principal: str
    size: int | None
    challenge: str | None  # WWW-Authenticate of a 401, relayed verbatim
    at: float

    @property
    def allowed(self) -> bool:
        return self.status == 200


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision and how it was reached, for the journal."""

    decision: Decision
    method: Literal["registry", "decision_cache", "stale_decision"]
    registry_status: str  # the registry's status for this request, "cached" or "unreachable"


class Decisions:
    """Bounded LRU of decisions in memory; allowed ones also on disk (fingerprints only), so a
    restart keeps fresh ones and availability mode has stale ones."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._mem: OrderedDict[str, Decision] = OrderedDict()
        self._disk: diskcache.Cache | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decisions")

    async def open(self, keep: float) -> None:
        def load() -> None:
            self._disk = diskcache.Cache(str(self.directory), disk=NoPickleDisk, eviction_policy="none",
                                         cull_limit=0, size_limit=1 << 40)
            self._disk.expire()
            for key in self._disk.iterkeys():
                try:
                    doc = json.loads(self._disk.get(key))
                    self._mem[key] = Decision(200, str(doc["principal"]), int(doc["size"]), None, float(doc["at"]))
                except (TypeError, ValueError, KeyError):
                    self._disk.delete(key)
            self._prune()

        self._keep = keep
        await asyncio.to_thread(load)

    async def close(self) -> None:
        def close() -> None:
            if self._disk is not None:
                self._disk.close()

        await asyncio.get_running_loop().run_in_executor(self._writer, close)
        self._writer.shutdown(wait=True)

    def forget(self, key: str) -> None:
        if self._mem.pop(key, None) is None or self._disk is None:
            return
        disk = self._disk
        asyncio.get_running_loop().run_in_executor(self._writer, disk.delete, key)

    def get(self, key: str) -> Decision | None:
        decision = self._mem.get(key)
        if decision is not None:
            self._mem.move_to_end(key)
        return decision

    def put(self, key: str, decision: Decision) -> None:
        self._mem[key] = decision
        self._mem.move_to_end(key)
        self._prune()
        disk = self._disk
        if disk is None:
            return
        doc = json.dumps({"principal": decision.principal, "size": decision.size, "at": decision.at})
        keep = self._keep

        def write() -> None:
            if decision.allowed:
                disk.set(key, doc, expire=keep)
            else:
                disk.delete(key)

        asyncio.get_running_loop().run_in_executor(self._writer, write)

    def _prune(self) -> None:
        while len(self._mem) > MAX_DECISIONS:
            self._mem.popitem(last=False)


def fingerprint_key(node_token: str | None, data_dir: Path) -> bytes:
    """The key of credential fingerprints: derived from the node token when the node has one (so
    one credential has one fingerprint on every node of the cluster), else this node's own,
    made once."""
    if node_token:
        return hmac.new(node_token.encode(), b"shoal credential fingerprint v1", hashlib.sha256).digest()
    path = data_dir / "fingerprint.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


CHECK_TTL, CHECK_WAIT = 60.0, 1.0


class Authorizer:
    def __init__(self, settings: AuthSettings, decisions: Decisions, fingerprint_key: bytes) -> None:
        self.settings = settings
        self.decisions = decisions
        self._fingerprint_key = fingerprint_key
        self._flights: SingleFlight[str, Decision] = SingleFlight()
        self._checks: dict[str, tuple[bool | None, float]] = {}  # upstream -> (checks credentials, when)
        self._check_flights: SingleFlight[str, bool | None] = SingleFlight()

    async def checks_credentials(self, up: Upstream) -> bool | None:
        """Does the registry check credentials at all? A registry without auth answers 200 to
        anyone, so a user name in a Basic header (or a token's subject) is only what the client
        claims. Known from an anonymous GET /v2/ (401 with auth configured, whatever the
        repositories allow), asked again every CHECK_TTL; None while the registry cannot say.
        A request waits for the question at most CHECK_WAIT (a registry that is down must not
        slow what availability mode serves), and a failed answer is kept as long as a good one."""
        known = self._checks.get(up.name)
        if known is not None and time.monotonic() - known[1] < CHECK_TTL:
            return known[0]
        try:
            return await asyncio.wait_for(self._check_flights.run(up.name, lambda: self._check(up)), CHECK_WAIT)
        except TimeoutError:  # (the question goes on; the next request reads its answer)
            return known[0] if known is not None else None

    async def _check(self, up: Upstream) -> bool | None:
        try:
            r = await up.client.request("GET", "/v2/", repo=None, authorization=None)
            answer = r.status == 401 if r.status in (200, 401) else None
        except errors.UpstreamError:
            answer = None
        self._checks[up.name] = (answer, time.monotonic())
        return answer

    def credential(self, request: web.Request, upstream: Upstream) -> Credential:
        header = request.headers.get("Authorization")
        if header:
            if not header.isascii():
                # Credentials are ASCII (RFC 9110 token68, Basic's base64); anything else cannot be
                # forwarded to the registry as it was sent, so nobody is authorized by it.
                raise errors.Unauthorized("the Authorization header is not ASCII")
            return Credential("client", header, fingerprint(header, self._fingerprint_key))
        node = upstream.client.credentials
        if self.settings.unauthenticated == "node" and node is not None:
            return Credential("node", None, f"node:{node.username}")
        return Credential("anonymous", None, "anonymous")

    @staticmethod
    def _key(up: Upstream, cred: Credential, repo: str, digest: Digest) -> str:
        return f"{cred.fingerprint}|{up.name}|{repo}|{digest.hex}"

    def forget(self, up: Upstream, cred: Credential, repo: str, digest: Digest) -> None:
        """Drop the decision for this credential, repository and digest: the registry has since
        refused them on the data path, so the next request asks it again."""
        self.decisions.forget(self._key(up, cred, repo, digest))

    async def blob(self, up: Upstream, cred: Credential, repo: str, digest: Digest) -> Verdict:
        """May `cred` pull `digest` through `repo`? Asks the registry unless a decision for exactly
        this credential, repository and digest is younger than the TTL."""
        key = self._key(up, cred, repo, digest)
        cached = self.decisions.get(key)
        now = time.time()
        if cached is not None and now - cached.at < self.settings.decision_ttl:
            return Verdict(cached, "decision_cache", "cached")
        try:
            # one question to the registry however many requests wait for it
            decision = await self._flights.run(key, lambda: self._ask(up, cred, repo, digest))
        except errors.UpstreamError as exc:
            if (self.settings.mode == "availability" and cached is not None and cached.allowed
                    and now - cached.at < self.settings.stale_decision_max_age):
                return Verdict(cached, "stale_decision", "unreachable")
            if isinstance(exc, errors.RateLimited):
                raise
            raise errors.UpstreamError("the registry is unreachable, and private content is served only with "
                                       f"its authorization (auth.mode: {self.settings.mode})") from None
        self.decisions.put(key, decision)
        return Verdict(decision, "registry", str(decision.status))

    async def _ask(self, up: Upstream, cred: Credential, repo: str, digest: Digest) -> Decision:
        r = await up.client.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo, authorization=cred.upstream_auth)
        if r.status == 429:
            raise errors.RateLimited("the registry is rate limiting this node (429)")
        if r.status >= 500:
            raise errors.UpstreamError(f"registry answered {r.status}")
        node_user = up.client.credentials.username if up.client.credentials else None
        if r.status == 200:
            length = r.headers.get("Content-Length", "")
            if not length.isdigit():
                raise errors.UpstreamError("registry blob HEAD without Content-Length")
            return Decision(200, cred.principal(node_user), int(length), None, time.time())
        status = r.status if r.status in (401, 403, 404) else 403
        return Decision(status, "", None, r.headers.get("WWW-Authenticate"), time.time())
