"""What the components' status pages share: a ring of samples kept in memory (the "over time" of
the plots), the page's script and style served by the component itself (no CDN, no bundle: the
pages work air-gapped), the security headers of every page response, and the HTML shell.

The HTML carries no data: the scripts fetch the component's JSON and build the page with DOM
calls that set text only (never innerHTML), so an image name or a principal that holds markup
is shown as text. The server-rendered parts (title, signed-in principal, sign-in errors) are
escaped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from importlib import resources

from aiohttp import web
from prometheus_client import CollectorRegistry

from shoal import protocol

log = logging.getLogger(__name__)

SAMPLE_EVERY = 5.0  # seconds between samples
SAMPLES_KEPT = 720  # an hour of them

# Every page response (HTML, its JSON, its assets, its errors): scripts and styles only from the
# component itself, no inline script (the pages have none), never framed (clickjacking of the
# sign-in and sign-out forms), forms post only to the component, no MIME sniffing of the JSON
# and CSV (an image name in a CSV must never run as HTML), and no caching of operator data.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # (not no-referrer: with it, browsers send "Origin: null" on form posts, which the sign-in checks)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
ASSETS = frozenset({"plot.js", "origin.js", "agent.js", "page.css", "favicon.svg"})


def is_page_path(path: str) -> bool:
    return path == protocol.PAGE.pattern or path.startswith(protocol.PAGE_PREFIX)


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    if is_page_path(request.path):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)


def install_headers(app: web.Application) -> None:
    """The security headers on every response to a page path (errors from guards included)."""
    app.on_response_prepare.append(_secure)


async def serve_asset(request: web.Request) -> web.StreamResponse:
    """GET protocol.PAGE_ASSET: one of the pages' files (public: they hold no data)."""
    name = request.match_info["name"]
    if name not in ASSETS:  # a fixed list: no path from the request reaches the file system
        raise web.HTTPNotFound()
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return web.Response(body=body, headers={"Content-Type": _TYPES[name[name.rindex("."):]]})


def _asset(name: str) -> str:
    return html.escape(protocol.PAGE_ASSET.path(name=name))


def shell(*, title: str, script: str | None, body: str = "", principal: str | None = None,
          csrf: str | None = None) -> str:
    """The HTML of a page: `body` is already-escaped HTML; everything else is escaped here. The
    routes the scripts call are given them on <body> (data-overview, ...): paths live in
    shoal/protocol.py only."""
    who = ""
    if principal is not None:
        who = f'<span id="principal">{html.escape(principal)}</span>'
        if csrf:  # a session's page: its sign-out, which needs the session's CSRF token
            who = (f'<form class="who" method="post" action="{protocol.PAGE_SIGNOUT.pattern}">{who}'
                   f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
                   '<button type="submit">Sign out</button></form>')
    routes = {"overview": protocol.PAGE_OVERVIEW.pattern, "audit": protocol.PAGE_AUDIT.pattern,
              "signin": protocol.PAGE_SIGNIN_FORM.pattern}
    data = " ".join(f'data-{k}="{html.escape(v)}"' for k, v in routes.items())
    scripts = "".join(f'<script src="{_asset(name)}" defer></script>' for name in ("plot.js", script or "")
                      if script)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><link rel=\"stylesheet\" href=\"{_asset('page.css')}\">"
            f"<link rel=\"icon\" href=\"{_asset('favicon.svg')}\" type=\"image/svg+xml\">{scripts}</head>"
            f"<body {data}><header><h1>{html.escape(title)}</h1>{who}</header><main>{body}</main></body></html>\n")


def html_response(text: str, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=headers)


class Metrics:
    """One read of a component's metrics, as /metrics has them: the page shows the same numbers."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in registry.collect():
            for sample in family.samples:
                self._samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def one(self, name: str) -> float:
        return sum(value for _, value in self._samples.get(name, []))

    def by(self, name: str, label: str) -> dict[str, int]:
        return {labels.get(label, ""): int(value) for labels, value in self._samples.get(name, [])}


class Ring:
    """Samples of a few counters and gauges, every SAMPLE_EVERY seconds for the last hour: the
    pages plot from it. Memory is bounded (SAMPLES_KEPT x the series)."""

    def __init__(self, series: tuple[str, ...], *, keep: int = SAMPLES_KEPT) -> None:
        self.series = series
        self.times: deque[float] = deque(maxlen=keep)
        self.values: dict[str, deque[float]] = {name: deque(maxlen=keep) for name in series}

    def add(self, when: float, sample: Mapping[str, float]) -> None:
        self.times.append(round(when, 3))
        for name in self.series:
            self.values[name].append(float(sample.get(name, 0.0)))

    def to_json(self) -> dict[str, object]:
        return {"interval_seconds": SAMPLE_EVERY, "t": list(self.times),
                "series": {name: list(values) for name, values in self.values.items()}}


Sample = Callable[[], Mapping[str, float]]


async def _sample_forever(ring: Ring, sample: Sample, every: float,
                         refresh: Callable[[], Awaitable[None]] | None) -> None:
    while True:
        try:
            if refresh is not None:
                await refresh()
            ring.add(time.time(), await asyncio.to_thread(sample))
        except Exception:  # a sampling bug must not end the page's history, nor the component
            log.exception("status page sample failed")
        await asyncio.sleep(every)


def sampling(ring: Ring, sample: Sample, *, refresh: Callable[[], Awaitable[None]] | None = None,
             every: float = SAMPLE_EVERY) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that samples into `ring` while the app runs (the first sample at once).
    `sample` runs in a thread (it collects metrics, as /metrics does off the loop), after
    `refresh` (e.g. libtorrent's counters) on the loop."""

    async def context(_: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_sample_forever(ring, sample, every, refresh))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return context
