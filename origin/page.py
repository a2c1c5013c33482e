"""The origin's status page, for operators with the audit role: swarms and peers, bytes served by
source over time (from the agents' journals as the collector stores them), registry bytes saved,
pre-seed jobs with their progress, admissions and seeds by result, and an audit search.

A browser cannot send an operator's bearer token by itself, so the page has a sign-in form: the
operator's token, or their registry login, is checked exactly as the API checks it
(origin/operators.py) and opens a session: a random cookie (HttpOnly, SameSite=Strict, Secure
under TLS, 8 hours at most) naming a session kept in memory. The session keeps the credential
in memory (never on disk, in logs or pages) and every page request is authenticated again with
it, so a token revoked in the operators file or a registry login the registry stops accepting
ends the session at the next request. A cookie authenticates only the page's own GET routes
(never /v1/...): nothing a cookie opens changes state. Sign-in and sign-out are POSTs that
must come from the origin's own page (Origin header, or Sec-Fetch-Site: same-origin), and
sign-out also carries the session's CSRF token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from shoal import errors, protocol, statuspage
from shoal.statuspage import Ring
from shoal.web import Handler, Operator, Role, add_routes, operator_of
from shoal_origin.operators import Operators
from shoal_origin.preseed import Preseeder

log = logging.getLogger(__name__)

COOKIE = "shoal_session"
# Over TLS the cookie is a "__Host-" one: a sibling subdomain cannot set it (cookie tossing: an
# attacker's own valid session planted in an operator's browser, who then works, and is audited,
# as the attacker). Browsers take that prefix only with Secure, Path=/ and no Domain.
TLS_COOKIE = "__Host-shoal_session"
SESSION_TTL = 8 * 3600.0
MAX_SESSIONS = 1000  # the oldest is dropped past this: sign-ins cannot grow the origin's memory
# Sessions one principal holds at once (its oldest goes): one operator signing in again and again
# cannot push everyone else's sessions out of MAX_SESSIONS.
MAX_SESSIONS_PER_PRINCIPAL = 20
PAGE_ROLE: Role = "audit"  # who pulled what is what the page shows: the audit role (admin holds it)
SOURCES = ("cache", "peers", "registry")
SERIES = ("served_cache", "served_peers", "served_registry", "registry_fetched", "peers_connected", "torrents")
MAX_EVENTS_REMEMBERED = 100_000  # event ids already counted (a re-sent batch is not counted twice)


@dataclass(slots=True)
class Session:
    authorization: str = field(repr=False)
    principal: str
    csrf: str
    expires: float


def _cookie(request: web.Request) -> str:
    return TLS_COOKIE if request.secure else COOKIE


class Sessions:
    """Signed-in browsers, by a hash of their cookie (a lookup's timing tells nothing of a cookie)."""

    def __init__(self, *, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.limit = limit
        self._by_hash: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def _key(cookie: str) -> str:
        return hashlib.sha256(cookie.encode("utf-8", "surrogateescape")).hexdigest()

    def open(self, authorization: str, principal: str) -> tuple[str, Session]:
        cookie = secrets.token_urlsafe(32)
        session = Session(authorization, principal, secrets.token_urlsafe(24), time.monotonic() + self.ttl)
        mine = [k for k, held in self._by_hash.items() if held.principal == principal]
        for key in mine[:max(0, len(mine) - MAX_SESSIONS_PER_PRINCIPAL + 1)]:
            del self._by_hash[key]
        self._by_hash[self._key(cookie)] = session
        while len(self._by_hash) > self.limit:
            self._by_hash.popitem(last=False)
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 128:
            return None
        key = self._key(cookie)
        session = self._by_hash.get(key)
        if session is not None and session.expires <= time.monotonic():
            del self._by_hash[key]
            return None
        return session

    def close(self, cookie: str | None) -> None:
        if cookie:
            self._by_hash.pop(self._key(cookie), None)


class PageAuth:
    """shoal.web.OperatorAuth for the page's routes: the request's own Authorization if it has
    one (scripts and tests may call the page's JSON like the API), else the session's credential,
    authenticated again by the origin's operator authenticator."""

    def __init__(self, operators: Operators, sessions: Sessions) -> None:
        self.operators = operators
        self.sessions = sessions

    async def authenticate(self, request: web.Request, role: Role) -> Operator:
        if request.headers.get("Authorization"):
            return await self.operators.authenticate(request, role)
        if request.method not in ("GET", "HEAD"):
            raise errors.Unauthorized("this is for operators: a session cookie opens the status page's GET routes only")
        cookie = request.cookies.get(_cookie(request))
        session = self.sessions.get(cookie)
        if session is None:
            raise errors.Unauthorized("the status page is for operators: sign in at "
                                      f"{protocol.PAGE_SIGNIN_FORM.pattern}")
        try:
            return await self.operators.authenticate_with(request, session.authorization, role)
        except (errors.Unauthorized, errors.Denied):
            self.sessions.close(cookie)  # revoked or no longer holding the role: signed out
            raise


# Distinct fallback reasons counted (the agents have about a dozen); more are "other".
MAX_FALLBACK_REASONS = 32


class Tally:
    """Bytes the agents served, by source, as their journals reach the collector (each event
    counted once, by its id), and blob bytes each node got from the registry itself."""

    def __init__(self) -> None:
        self.served: dict[str, int] = dict.fromkeys(SOURCES, 0)
        self.registry_by_node: Counter[str] = Counter()
        # responses whose blob came from the registry after its swarm download was given up, by
        # the agent's reason (the end record's `fallback`)
        self.fallbacks: Counter[str] = Counter()
        self._seen: OrderedDict[str, None] = OrderedDict()

    def add(self, node: str, records: Iterable[Mapping[str, Any]]) -> None:
        for rec in records:
            if rec.get("phase") != "end" or rec.get("source") not in self.served:
                continue
            event = str(rec.get("event_id"))
            if event in self._seen:
                continue
            self._seen[event] = None
            if len(self._seen) > MAX_EVENTS_REMEMBERED:
                self._seen.popitem(last=False)
            reason = rec.get("fallback")
            if isinstance(reason, str):
                # (a node writes the reason: a bounded set of them, whatever it sends)
                if reason not in self.fallbacks and len(self.fallbacks) >= MAX_FALLBACK_REASONS:
                    reason = "other"
                self.fallbacks[reason] += 1
            size = rec.get("bytes")
            if isinstance(size, int) and size > 0:
                self.served[rec["source"]] += size
                if rec["source"] == "registry":
                    self.registry_by_node[node] += size


@dataclass(slots=True)
class Sources:
    """What the page reads, once the origin runs (attach)."""

    registry: CollectorRegistry
    preseeder: Preseeder | None = None
    seeder_cache: Callable[[], tuple[int, int, int]] | None = None  # bytes, budget, blobs


class StatusPage:
    def __init__(self, operators: Operators, registry: CollectorRegistry, *,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.operators = operators
        self.sessions = Sessions()
        self.auth = PageAuth(operators, self.sessions)
        self.tally = Tally()
        self.ring = Ring(SERIES)
        self.sources = Sources(registry)
        self.refresh = refresh  # libtorrent's counters, as before /metrics

    def attach(self, preseeder: Preseeder, seeder_cache: Callable[[], tuple[int, int, int]]) -> None:
        self.sources.preseeder = preseeder
        self.sources.seeder_cache = seeder_cache

    def sample(self) -> dict[str, float]:
        m = statuspage.Metrics(self.sources.registry)
        return {**{f"served_{s}": float(v) for s, v in self.tally.served.items()},
                "registry_fetched": m.one("shoal_origin_registry_bytes_total"),
                "peers_connected": m.one("shoal_origin_swarm_peers_connected"),
                "torrents": m.one("shoal_origin_swarm_torrents")}

    def overview(self, op: Operator) -> dict[str, Any]:
        m = statuspage.Metrics(self.sources.registry)
        fetched = int(m.one("shoal_origin_registry_bytes_total"))
        served = dict(self.tally.served)
        used, budget, blobs = self.sources.seeder_cache() if self.sources.seeder_cache else (0, 0, 0)
        # pre-seed jobs as GET PRESEED_JOB shows them: an admin sees every job, a seed operator
        # its own, an audit operator none (None: the page says its role does not show them)
        jobs: list[dict[str, Any]] | None = None
        if self.sources.preseeder is not None and op.has("seed"):
            jobs = []
            for job in reversed(self.sources.preseeder.jobs.values()):  # newest first
                if "admin" not in op.roles and job.owner != op.principal:
                    continue
                summary = job.summary().to_json()
                summary.pop("blobs")
                jobs.append({**summary, "owner": job.owner})
        return {
            "now": time.time(), "principal": op.principal,
            "swarm": {"torrents": int(m.one("shoal_origin_swarm_torrents")),
                      "peers_connected": int(m.one("shoal_origin_swarm_peers_connected")),
                      "sent_payload_bytes": int(m.one("shoal_origin_swarm_sent_payload_bytes_total"))},
            "cache": {"bytes": used, "budget_bytes": budget, "blobs": blobs},
            # without shoal every byte served would have come from the registry; with it, the
            # registry sent what agents fetched themselves and what this origin fetched to seed
            "registry": {"fetched_bytes": fetched,
                         "saved_bytes": max(0, served["cache"] + served["peers"] - fetched)},
            "served": served,
            "registry_by_node": dict(self.tally.registry_by_node.most_common(20)),
            "fallbacks": dict(self.tally.fallbacks.most_common(20)),
            "admissions": m.by("shoal_origin_admission_checks_total", "result"),
            "seeds": m.by("shoal_origin_seed_requests_total", "result"),
            "jobs": None if jobs is None else jobs[:50],
            "history": self.ring.to_json(),
        }

    # ----- routes -------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """GET PAGE: the page's shell, or a redirect to the sign-in form."""
        try:
            op = await self.auth.authenticate(request, PAGE_ROLE)
        except errors.Unauthorized:
            return web.Response(status=303, headers={"Location": protocol.PAGE_SIGNIN_FORM.pattern})
        session = self.sessions.get(request.cookies.get(_cookie(request)))
        return statuspage.html_response(statuspage.shell(
            title="shoal origin", script="origin.js", body=_ORIGIN_BODY, principal=op.principal,
            csrf=session.csrf if session is not None else None))

    async def overview_json(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            await self.refresh()
        # (collecting the metrics lists the cache: off the loop, as /metrics is)
        return web.json_response(await asyncio.to_thread(self.overview, operator_of(request)))

    async def signin_form(self, request: web.Request) -> web.Response:
        return _signin(None)

    async def signin(self, request: web.Request) -> web.StreamResponse:
        """POST PAGE_SIGNIN (a form): an operator token, or a registry user name and password."""
        _same_origin(request)
        form = await request.post()
        token, user, password = (str(form.get(k, "")).strip() for k in ("token", "username", "password"))
        if token:
            authorization = f"Bearer {token}"
        elif user and password:
            authorization = "Basic " + _b64(f"{user}:{password}")
        else:
            return _signin("Give an operator token, or a registry user name and password.", status=400)
        try:
            op = await self.operators.authenticate_with(request, authorization, PAGE_ROLE)
        except errors.RateLimited:
            return _signin("Too many sign-ins from this address; try again in a minute.", status=429)
        except (errors.Unauthorized, errors.Denied):
            # one answer whatever was wrong: it tells nobody whether a password is right
            return _signin(f"Not signed in: that credential is not an operator's holding the {PAGE_ROLE} role.",
                           status=401)
        # a browser signing in again (another operator at a shared screen, or the same one) ends
        # the session its old cookie named: that cookie, if it leaked, opens nothing any more
        self.sessions.close(request.cookies.get(_cookie(request)))
        cookie, _ = self.sessions.open(authorization, op.principal)
        await self.operators.record(request, principal=op.principal, authz_method=self.operators.method_of(op),
                                    action="signin", status=303, outcome="accepted", detail={"page": "status"})
        response = web.Response(status=303, headers={"Location": protocol.PAGE.pattern})
        response.set_cookie(_cookie(request), cookie, max_age=int(self.sessions.ttl), path="/", httponly=True,
                            samesite="Strict", secure=request.secure)
        return response

    async def signout(self, request: web.Request) -> web.StreamResponse:
        _same_origin(request)
        cookie = request.cookies.get(_cookie(request))
        session = self.sessions.get(cookie)
        form = await request.post()
        if session is not None:
            if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
                raise errors.Denied("sign-out needs the page's CSRF token")
            self.sessions.close(cookie)
        response = web.Response(status=303, headers={"Location": protocol.PAGE_SIGNIN_FORM.pattern})
        response.del_cookie(_cookie(request), path="/", secure=request.secure)
        return response

    def add_routes(self, app: web.Application, audit_handler: Handler) -> None:
        """The page's routes; `audit_handler` is GET AUDIT's, which audits each search too."""
        statuspage.install_headers(app)
        add_routes(app, [
            (protocol.PAGE, self.page, "public"),  # authenticates itself: redirects to the sign-in
            (protocol.PAGE_ASSET, statuspage.serve_asset, "public"),
            (protocol.PAGE_SIGNIN_FORM, self.signin_form, "public"),
            (protocol.PAGE_SIGNIN, self.signin, "public"),
            (protocol.PAGE_SIGNOUT, self.signout, "public"),
            (protocol.PAGE_OVERVIEW, self.overview_json, PAGE_ROLE),
            (protocol.PAGE_AUDIT, audit_handler, PAGE_ROLE),
        ], {}, operators=self.auth)
        app.cleanup_ctx.append(statuspage.sampling(self.ring, self.sample, refresh=self.refresh))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _same_origin(request: web.Request) -> None:
    """A form post from another site (login CSRF, forced sign-out) is refused: browsers send
    Origin with every POST, and Sec-Fetch-Site."""
    origin = request.headers.get("Origin")
    if origin is not None:
        if origin != f"{request.scheme}://{request.host}":
            raise errors.Denied("this form is posted from the origin's own page only")
        return
    if request.headers.get("Sec-Fetch-Site") != "same-origin":
        raise errors.Denied("this form is posted from the origin's own page only")


def _signin(message: str | None, *, status: int = 200) -> web.Response:
    note = f'<p class="error" id="signin-error">{html.escape(message)}</p>' if message else ""
    body = (f'<section class="signin"><h2>Sign in</h2>{note}'
            f'<form method="post" action="{protocol.PAGE_SIGNIN.pattern}" id="signin">'
            '<fieldset><legend>Operator token</legend>'
            '<input name="token" type="password" autocomplete="off" placeholder="shoal_op_..."></fieldset>'
            '<fieldset><legend>or a registry login</legend>'
            '<input name="username" autocomplete="username" placeholder="user name">'
            '<input name="password" type="password" autocomplete="current-password" placeholder="password">'
            '</fieldset><button type="submit">Sign in</button></form>'
            f'<p class="hint">Operators holding the {PAGE_ROLE} role (or admin) see this page.</p></section>')
    return statuspage.html_response(statuspage.shell(title="shoal origin: sign in", script=None, body=body),
                                    status=status)


_ORIGIN_BODY = """
<section class="tiles" id="tiles"></section>
<section><h2>Bytes served to clients, by source</h2><div class="chart" id="served-chart"></div>
<p class="legend" id="served-totals"></p></section>
<section class="row">
<div><h2>Swarm peers connected</h2><div class="chart" id="peers-chart"></div></div>
<div><h2>Registry bytes fetched by this origin</h2><div class="chart" id="fetched-chart"></div></div>
</section>
<section class="row">
<div><h2>Admissions by result</h2><div class="bars" id="admissions"></div></div>
<div><h2>Seeds by result</h2><div class="bars" id="seeds"></div></div>
<div><h2>Bytes nodes fetched from the registry (fallbacks and small blobs)</h2>
<div class="bars" id="fallbacks"></div></div>
<div><h2>Fallbacks to the registry, by reason (responses)</h2>
<div class="bars" id="fallback-reasons"></div></div>
</section>
<section><h2>Pre-seed jobs</h2><table id="jobs"><thead><tr><th>job</th><th>owner</th><th>images</th><th>state</th>
<th>progress</th><th>blobs</th></tr></thead><tbody></tbody></table></section>
<section><h2>Audit search</h2>
<form id="audit-form" class="search">
<label>image <input name="image" placeholder="registry/name[:tag]"></label>
<label>principal <input name="principal"></label>
<label>node <input name="node"></label>
<label>since <input name="since" type="datetime-local" step="1"></label>
<label>until <input name="until" type="datetime-local" step="1"></label>
<button type="submit">Search</button>
<a id="audit-csv" download="shoal-audit.csv" href="">CSV</a>
</form>
<p id="audit-count"></p>
<table id="audit"><thead><tr><th>time</th><th>node</th><th>principal</th><th>image</th><th>reference</th>
<th>status</th><th>bytes</th><th>source</th><th>outcome</th></tr></thead><tbody></tbody></table>
</section>
<p class="updated" id="updated"></p>
"""
