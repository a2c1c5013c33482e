"""The one outgoing HTTP session a service holds (to registries, token realms, the origin and
the trackers), made one way."""

from __future__ import annotations

import aiohttp


def session(*, limit: int, limit_per_host: int) -> aiohttp.ClientSession:
    """A session that keeps no cookies. It carries the requests of every client of the node, each
    with its own credential: a cookie a registry, its token realm or a load balancer set for one
    client's request would otherwise go out with the next client's, and could speak for the first
    (a session cookie). No shoal peer or registry API needs cookies; skipping the jar also saves
    its filtering on every request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host),
                                 cookie_jar=aiohttp.DummyCookieJar())
