"""The agent's small status page, on the mirror's own port: cache size, hits and misses, bytes
served by source over time, swarms and peers, fallbacks by reason.

Who may see it: anyone who reaches the mirror's port, as /metrics already (pods on the node
reach it). So it shows exactly what /metrics shows, counts and sizes: no image, repository,
digest, principal, client address or audit record, nothing a tenant could learn about another
tenant's pulls. Operators' views of who pulled what are on the origin's page, behind the
operator credentials.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from shoal import protocol, statuspage
from shoal.statuspage import Metrics, Ring
from shoal.web import add_routes

SOURCES = ("cache", "peers", "registry")
SERIES = ("served_cache", "served_peers", "served_registry", "hits", "misses", "peers_connected")


class StatusPage:
    def __init__(self, node: str, registry: CollectorRegistry, *, in_flight: Callable[[], int],
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.node = node
        self.registry = registry
        self.in_flight = in_flight
        self.refresh = refresh
        self.ring = Ring(SERIES)

    def sample(self) -> dict[str, float]:
        m = Metrics(self.registry)
        served = m.by("shoal_agent_served_bytes_total", "source")
        return {**{f"served_{s}": float(served.get(s, 0)) for s in SOURCES},
                "hits": m.one("shoal_agent_cache_hits_total"), "misses": m.one("shoal_agent_cache_misses_total"),
                "peers_connected": m.one("shoal_agent_swarm_peers_connected")}

    def overview(self, in_flight: int) -> dict[str, Any]:
        m = Metrics(self.registry)
        served = m.by("shoal_agent_served_bytes_total", "source")
        return {
            "now": time.time(), "node": self.node,
            "cache": {"bytes": int(m.one("shoal_agent_cache_bytes")),
                      "budget_bytes": int(m.one("shoal_agent_cache_budget_bytes")),
                      "blobs": int(m.one("shoal_agent_cache_blobs"))},
            "requests": {"hits": int(m.one("shoal_agent_cache_hits_total")),
                         "misses": int(m.one("shoal_agent_cache_misses_total"))},
            "served": {s: served.get(s, 0) for s in SOURCES},
            "fallbacks": m.by("shoal_agent_fallbacks_total", "reason"),
            "swarm": {"torrents": int(m.one("shoal_agent_swarm_torrents")),
                      "peers_connected": int(m.one("shoal_agent_swarm_peers_connected"))},
            "downloads_in_flight": in_flight,
            "history": self.ring.to_json(),
        }

    async def page(self, request: web.Request) -> web.Response:
        return statuspage.html_response(statuspage.shell(title=f"shoal agent {self.node}", script="agent.js",
                                                         body=_AGENT_BODY))

    async def overview_json(self, request: web.Request) -> web.Response:
        if self.refresh is not None:
            await self.refresh()
        in_flight = self.in_flight()  # (on the loop: the fetcher's state)
        # (collecting the metrics lists the journal's directory: off the loop, as /metrics is)
        return web.json_response(await asyncio.to_thread(self.overview, in_flight))

    def add_routes(self, app: web.Application) -> None:
        statuspage.install_headers(app)
        add_routes(app, [
            # public as /metrics is: counts only (the module's docstring says why)
            (protocol.PAGE, self.page, "public"),
            (protocol.PAGE_ASSET, statuspage.serve_asset, "public"),
            (protocol.PAGE_OVERVIEW, self.overview_json, "public"),
        ], {})
        app.cleanup_ctx.append(statuspage.sampling(self.ring, self.sample, refresh=self.refresh))


_AGENT_BODY = """
<section class="tiles" id="tiles"></section>
<section><h2>Bytes served to clients, by source</h2><div class="chart" id="served-chart"></div>
<p class="legend" id="served-totals"></p></section>
<section class="row">
<div><h2>Blob requests: cache hits and misses</h2><div class="chart" id="hits-chart"></div></div>
<div><h2>Swarm downloads abandoned for the registry, by reason</h2><div class="bars" id="fallbacks"></div></div>
</section>
<p class="updated" id="updated"></p>
"""
