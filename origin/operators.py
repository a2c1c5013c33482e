"""Operators: who may pre-seed, query the audit trail and list what is seeded, and with which
roles. Two ways in, never the node token:

- a static token from the operators file (shoal.operator_tokens), looked up by its SHA-256;
- the operator's own registry login (Basic, or a Bearer token from the registry's token server,
  so LDAP/OIDC behind the registry apply): the registry named in `operators.registry` decides
  (GET /v2/ with the credential), the principal is the user it accepted, and the configuration
  gives principals their roles. Verdicts are cached for `cache_ttl`, keyed by an HMAC of the
  credential, never the credential itself.

Every operator action, refusals of authenticated callers included, is an audit event the origin
writes into the collector's store before it answers (shoal.audit.operator_records).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import logging
import os
import secrets
import time
import typing
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from shoal import audit, errors, logs, netaddr, operator_tokens, presented
from shoal.errors import ConfigError
from shoal.flights import SingleFlight
from shoal.metrics import Known
from shoal.oci import ImageReference
from shoal.registry import RegistryClient
from shoal.web import Operator, Role
from shoal_origin.budget import MinuteBudget
from shoal_origin.config import OperatorSettings
from shoal_origin.preseed import Job

log = logging.getLogger(__name__)

Recorder = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]
RELOAD_EVERY = 1.0  # seconds between looks at the operators file
# Registry logins the origin checks for one client address per minute (a login it checked
# recently is free): anyone may present one, so without a bound the origin would guess passwords
# at the registry for anyone, under its own address.
MAX_LOGINS_PER_ADDRESS = 60
# Refused logins of one user name per minute (from any address) before that name's logins are no
# longer tried; and refusals of one caller (principal and address) audited per minute, the rest
# only counted: an authenticated caller cannot fill the audit.
MAX_FAILED_LOGINS_PER_USER = 30
MAX_REFUSALS_AUDITED = 10
# One answer for a login the registry refuses and for one it accepts but that holds no role, so
# that the origin tells nobody whether a password is right.
# Operator requests by how they were authenticated (token, registry) or refused; a cluster secret
# presented as an operator credential is counted under its name. Each exported from the start at 0.
OperatorResult = Literal["token", "registry", "unauthenticated", "denied", "rate_limited", "refusals_not_audited",
                         "node_token", "registration_token", "peer_token"]
OPERATOR_RESULTS: tuple[OperatorResult, ...] = typing.get_args(OperatorResult)


def _secret_result(name: str) -> OperatorResult:
    """The result a cluster secret ("node token", ...) presented by an operator is counted under."""
    label = name.replace(" ", "_")
    return label if label in OPERATOR_RESULTS else "denied"


_NOT_ACCEPTED = "not an operator: the registry did not accept this login, or it holds no operator role"
_NOT_OPERATOR = "this API is for operators (an operator token, or a registry login with a role)"


class _TokenFile:
    """The operators file, read at start (an unusable file is a ConfigError naming the key) and
    again when it changes; a file that became unusable lets no token in until it is fixed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, operator_tokens.StaticOperator] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._looked = 0.0
        try:
            self._load()
        except (OSError, operator_tokens.TokenFileError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError(f"operators.tokens.file: cannot use {str(path)!r}: {reason}") from None

    def _load(self) -> None:
        st = os.stat(self.path)
        operators = operator_tokens.load(self.path)
        self._by_hash = {op.sha256: op for op in operators}
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return
            self._load()
            log.info("operators file reloaded: %d operator(s)", len(self._by_hash))
        except (OSError, operator_tokens.TokenFileError) as exc:
            # fail closed: a removed operator must not stay valid because the file broke
            self._by_hash, self._stamp = {}, None
            # (TokenFileError texts name fields, operator names and roles, never a token or its hash)
            reason = exc.strerror if isinstance(exc, OSError) else exc
            log.error("operators file %s unusable, no token accepted until fixed: %s", self.path, reason)  # log-safe

    async def find(self, token: str) -> operator_tokens.StaticOperator | None:
        now = time.monotonic()
        if now - self._looked >= RELOAD_EVERY:  # a stat, and a read when it changed: off the loop
            self._looked = now
            await asyncio.to_thread(self._refresh)
        # A dict lookup by hash: timing tells at most how a hash compares, nothing about a token.
        return self._by_hash.get(operator_tokens.token_hash(token))


@dataclass(frozen=True, slots=True)
class _Verdict:
    principal: str | None  # None: the registry refused the credential
    until: float


class Operators:
    """The origin's operator authentication (shoal.web.OperatorAuth) and what operators may do."""

    def __init__(self, settings: OperatorSettings, *, cluster_secrets: Mapping[str, str],
                 registry: CollectorRegistry) -> None:
        """`cluster_secrets`: what nodes and components hold ("node token": ..., ...); presented
        here, each is refused by name and never forwarded to the registry."""
        self.settings = settings
        self.tokens = _TokenFile(Path(settings.tokens.file)) if settings.tokens.file else None
        self.roles = dict(settings.registry.roles) if settings.registry else {}
        self.upstream = settings.registry.upstream if settings.registry else None
        self._cluster_secrets = [(name, secret.encode()) for name, secret in cluster_secrets.items() if secret]
        self._key = secrets.token_bytes(32)  # the cache's fingerprints live as long as the cache
        self._verdicts: OrderedDict[str, _Verdict] = OrderedDict()
        self._flights: SingleFlight[str, _Verdict] = SingleFlight()
        self._logins = MinuteBudget()  # registry checks per client address
        self._failures = MinuteBudget()  # refused logins per user name
        self._refusals = MinuteBudget()  # audited refusals per principal and address
        self._challenges: tuple[bool, float] | None = None
        self.client: RegistryClient | None = None  # set when the origin starts (attach)
        self.recorder: Recorder | None = None
        self.requests = Known(Counter("shoal_origin_operator_requests_total",
                                      "Operator requests by how they were authenticated or refused", ["result"],
                                      registry=registry), OPERATOR_RESULTS)
        if self.tokens is None and self.upstream is None:
            log.warning("no operators configured (operators.tokens.file, operators.registry): "  # log-safe
                        "pre-seeding and audit queries are refused to everyone")

    def attach(self, client: RegistryClient | None, recorder: Recorder) -> None:
        """The registry that checks operator logins (a client without credentials of its own)
        and where operator events go; both exist only once the origin runs."""
        self.client = client.with_credentials(None) if client is not None else None
        self.recorder = recorder

    # ----- authentication ---------------------------------------------------------------------

    async def authenticate(self, request: web.Request, role: Role) -> Operator:
        return await self.authenticate_with(request, request.headers.get("Authorization", ""), role)

    async def authenticate_with(self, request: web.Request, header: str, role: Role) -> Operator:
        """As authenticate, with `header` as the request's Authorization (the status page's
        sign-in form and session, origin/page.py, hold the credential elsewhere)."""
        if not header:
            self.requests.labels("unauthenticated").inc()
            raise errors.Unauthorized(_NOT_OPERATOR)
        header = presented.check(header, "operator credential") or ""
        scheme, _, value = header.partition(" ")
        value = value.strip()
        # Compared whatever the spelling of the scheme, so that no spelling of a cluster secret
        # is taken for a registry token and sent to the registry.
        for name, secret in self._cluster_secrets:
            if hmac.compare_digest(value.encode(), secret):
                self.requests.labels(_secret_result(name)).inc()
                await self._refusal(request, principal=name.replace(" ", "-"), authz_method=name.replace(" ", "-"),
                                    role=role, error=f"the {name} is not an operator credential")
                raise errors.Denied(f"the {name} is not an operator credential: {_NOT_OPERATOR}")
        if scheme.lower() == "bearer" and value.startswith(operator_tokens.TOKEN_PREFIX):
            op = await self._static(value)
        elif scheme.lower() in ("basic", "bearer") and self.upstream is not None:
            op = await self._from_registry(request, header, role)
        else:
            self.requests.labels("unauthenticated").inc()
            raise errors.Unauthorized(_NOT_OPERATOR)
        if not op.has(role):
            self.requests.labels("denied").inc()
            await self._refusal(request, principal=op.principal, authz_method=self.method_of(op), role=role,
                                error=f"no {role} role")
            raise errors.Denied(f"operator {op.principal!r} does not hold the {role} role")
        self.requests.labels(op.method).inc()
        return op

    async def _static(self, token: str) -> Operator:
        found = await self.tokens.find(token) if self.tokens is not None else None
        if found is None:
            self.requests.labels("unauthenticated").inc()
            raise errors.Unauthorized("unknown or revoked operator token")
        return Operator(f"token:{found.name}", frozenset(found.roles), "token", found.repositories)

    async def _from_registry(self, request: web.Request, header: str, role: Role) -> Operator:
        fingerprint = logs.fingerprint(header, self._key)
        verdict = self._verdicts.get(fingerprint)
        if verdict is None or verdict.until <= time.monotonic():
            login = presented.basic_credentials(header)
            user = login.username if login is not None else None
            # per IPv4 address or IPv6 /64: a v6 host changing addresses in its prefix gets no more tries
            if not self._logins.take(netaddr.limit_key(request.remote), MAX_LOGINS_PER_ADDRESS) or (
                    user is not None and self._failures.used(user) >= MAX_FAILED_LOGINS_PER_USER):
                self.requests.labels("rate_limited").inc()
                raise errors.RateLimited("too many registry logins from this address, or refused for this user, in "
                                         "the last minute")
            verdict = await self._flights.run(fingerprint, lambda: self._verify(fingerprint, header))
            if user is not None and verdict.principal is None:
                self._failures.add(user)
        if verdict.principal is None:
            self.requests.labels("unauthenticated").inc()
            raise errors.Unauthorized(_NOT_ACCEPTED)
        roles = self.roles.get(verdict.principal)
        if not roles:
            self.requests.labels("denied").inc()
            await self._refusal(request, principal=verdict.principal, authz_method="operator-registry", role=role,
                                error="no role")
            raise errors.Unauthorized(_NOT_ACCEPTED)
        return Operator(verdict.principal, frozenset(roles), "registry", credential=header)

    async def _verify(self, fingerprint: str, header: str) -> _Verdict:
        client = self.client
        if client is None:
            raise errors.UpstreamError("the origin is starting")
        if not await self._registry_challenges(client):
            raise errors.UpstreamError("the operators' registry answers without credentials, so it cannot vouch "
                                       "for an operator")
        acting, authorization = presented.acting_for(client, header)
        try:
            status = await acting.ping(authorization=authorization)
        except errors.UpstreamError:
            raise  # unreachable: not a verdict, nothing cached
        except errors.ShoalError:
            status = 401  # the token server refused the login
        principal = presented.principal_of(header, "") if status == 200 else None
        if principal in ("", "anonymous"):
            principal = None  # an anonymous token proves nobody
        verdict = _Verdict(principal, time.monotonic() + self.settings.cache_ttl)
        self._verdicts[fingerprint] = verdict
        self._verdicts.move_to_end(fingerprint)
        while len(self._verdicts) > self.settings.cache_size:
            self._verdicts.popitem(last=False)
        return verdict

    async def _registry_challenges(self, client: RegistryClient) -> bool:
        """Whether the registry refuses an anonymous GET /v2/: one that answers 200 to anyone
        would "accept" any credential, and a forged token's `sub` would become a principal."""
        known = self._challenges
        if known is not None and known[1] > time.monotonic():
            return known[0]
        status = await client.ping(authorization=None)
        if status not in (200, 401):
            raise errors.UpstreamError(f"the operators' registry answered {status}")
        if status == 200:
            log.error("operators.registry: %s answers GET /v2/ without credentials; registry logins are refused",
                      self.upstream)
        self._challenges = (status == 401, time.monotonic() + self.settings.cache_ttl)
        return status == 401

    # ----- what an operator may do ------------------------------------------------------------

    async def check_seed(self, op: Operator, refs: list[ImageReference]) -> None:
        """Refuse (Denied, naming the image) unless `op` may pre-seed every one of `refs`: admin
        anything; a static token what its `repositories` globs match; a registry operator what
        the registry lets it pull (a HEAD of the manifest with its own credential, checked before
        the origin fetches anything with the seeder's). One answer whether the registry said
        401, 403 or 404, so a refusal does not tell whether a private image exists."""
        if "admin" in op.roles:
            return
        for ref in refs:
            name = f"{ref.registry}/{ref.name}"
            if op.method == "token":
                if not any(fnmatch.fnmatchcase(name, glob) for glob in op.repositories):
                    raise errors.Denied(f"{ref}: not among the repositories operator {op.principal!r} may pre-seed")
                continue
            if ref.registry != self.upstream:
                raise errors.Denied(f"{ref}: a registry login is checked by {self.upstream}, and only images of "
                                    "that registry may be pre-seeded with it")
            if self.client is None:
                raise errors.UpstreamError("the origin is starting")
            acting, authorization = presented.acting_for(self.client, op.credential)
            try:
                answer = await acting.get_manifest(ref.name, ref.reference, method="HEAD",
                                                   authorization=authorization)
                status = answer.status
            except errors.UpstreamError:
                raise
            except errors.ShoalError:
                status = 401
            if status != 200:
                if status not in (401, 403, 404):
                    raise errors.UpstreamError(f"{ref}: the registry answered {status}")
                raise errors.Denied(f"{ref}: the registry does not let {op.principal!r} pull it")

    # ----- audit ------------------------------------------------------------------------------

    @staticmethod
    def method_of(op: Operator) -> str:
        return f"operator-{op.method}"

    async def record(self, request: web.Request, *, principal: str, authz_method: str, action: str, status: int,
                     outcome: str, detail: dict[str, Any], error: str | None = None) -> None:
        """Store one operator event before the answer goes out (raises if it cannot be stored:
        an action that cannot be audited is not done)."""
        await self._store(audit.operator_records(
            principal=principal, method=request.method, action=action, status=status, outcome=outcome,
            detail=detail, client_addr=_peer(request), user_agent=request.headers.get("User-Agent"),
            authz_method=authz_method, error=error))

    async def _refusal(self, request: web.Request, *, principal: str, authz_method: str, role: Role,
                       error: str) -> None:
        """Audit a refused (authenticated) caller, at most MAX_REFUSALS_AUDITED a minute per caller
        and address (the rest are counted); the refusal stands even if it cannot be stored."""
        if not self._refusals.take(f"{principal}|{netaddr.limit_key(request.remote)}", MAX_REFUSALS_AUDITED):
            self.requests.labels("refusals_not_audited").inc()
            return
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "?"  # the route, not what the caller wrote
        try:
            await self.record(request, principal=principal, authz_method=authz_method, action="refused", status=403,
                              outcome="refused", detail={"role": role, "path": path}, error=error)
        except Exception as exc:  # (sqlite3 errors too)
            log.error("could not audit a refused operator request: %s", type(exc).__name__)

    async def record_job(self, job: Job) -> None:
        """A pre-seed job's end, under the operator who submitted it."""
        failed = sum(1 for b in job.blobs.values() if b.state == "failed")
        await self._store(audit.operator_records(
            principal=job.owner or "unknown", method="POST", action="preseed-finished", status=200,
            outcome=job.state, client_addr=None, user_agent=None, authz_method="origin",
            error="; ".join(job.errors[:3]) or None,
            detail={"job": job.id, "images": job.images[:100], "blobs": len(job.blobs), "blobs_failed": failed}))

    async def record_automatic(self, *, principal: str, action: str, detail: dict[str, Any],
                               client_addr: str | None, user_agent: str | None, authz_method: str) -> None:
        """An action the origin takes on its own (a pre-seed a registry push triggered), stored
        before it is done, as an operator's is."""
        await self._store(audit.operator_records(
            principal=principal, method="POST", action=action, status=202, outcome="accepted", detail=detail,
            client_addr=client_addr, user_agent=user_agent, authz_method=authz_method))

    async def _store(self, records: tuple[dict[str, Any], dict[str, Any]]) -> None:
        if self.recorder is None:
            raise errors.UpstreamError("the origin is starting")
        await self.recorder(*records)


def _peer(request: web.Request) -> str | None:
    return netaddr.peer_address(request.transport.get_extra_info("peername") if request.transport is not None
                                else None)
