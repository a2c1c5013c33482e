"""The status pages' parts that need no cluster: the ring of samples, the HTML shell's escaping,
the origin's sessions, its tally of served bytes, the same-origin check of its forms, and the
page files' route (the browser tests are tests/e2e/test_status_page.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from shoal import errors, protocol, statuspage
from shoal.web import add_routes
from shoal_origin import page
from shoal_origin.page import Sessions, Tally, _same_origin


def test_the_ring_keeps_the_last_samples_only() -> None:
    ring = statuspage.Ring(("a", "b"), keep=3)
    for i in range(5):
        ring.add(float(i), {"a": i})
    doc = ring.to_json()
    assert doc["t"] == [2.0, 3.0, 4.0]
    assert doc["series"] == {"a": [2.0, 3.0, 4.0], "b": [0.0, 0.0, 0.0]}


def test_the_shell_escapes_what_it_is_given() -> None:
    page = statuspage.shell(title="<t>", script="x.js", principal='<img src=x onerror="alert(1)">', csrf='"><b>')
    assert "<img" not in page and "<t>" not in page and '"><b>' not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert '<script src="/ui/static/x.js" defer>' in page
    assert "<script>" not in page  # no inline script (the CSP allows none)


def test_sessions_open_expire_and_close() -> None:
    sessions = Sessions(ttl=60, limit=2)
    first, session = sessions.open("Bearer one", "token:one")
    assert sessions.get(first) is session and session.principal == "token:one"
    assert "one" not in repr(session).replace("token:one", "")  # the credential is not in its repr
    assert sessions.get(first + "x") is None and sessions.get(None) is None and sessions.get("a" * 200) is None
    second, _ = sessions.open("Bearer two", "token:two")
    third, _ = sessions.open("Bearer three", "token:three")
    assert sessions.get(first) is None  # past the limit the oldest goes
    sessions.close(second)
    assert sessions.get(second) is None and sessions.get(third) is not None
    expired = Sessions(ttl=0)
    cookie, _ = expired.open("Bearer x", "token:x")
    assert expired.get(cookie) is None


def test_the_tally_counts_each_event_once() -> None:
    tally = Tally()
    records: list[dict[str, Any]] = [
        {"event_id": "e1", "phase": "start", "source": "registry"},
        {"event_id": "e1", "phase": "end", "source": "registry", "bytes": 100},
        {"event_id": "e2", "phase": "end", "source": "peers", "bytes": 50},
        {"event_id": "e3", "phase": "end", "source": None, "bytes": 7},  # no source: not counted
        {"event_id": "e4", "phase": "end", "source": "cache", "bytes": None},
    ]
    tally.add("n1", records)
    tally.add("n1", records)  # the batch re-sent
    assert tally.served == {"cache": 0, "peers": 50, "registry": 100}
    assert tally.registry_by_node == {"n1": 100}


def test_the_tally_counts_fallbacks_by_reason_once_per_event() -> None:
    tally = Tally()
    records: list[dict[str, Any]] = [
        {"event_id": "f1", "phase": "end", "source": "registry", "bytes": 10, "fallback": "stalled"},
        {"event_id": "f2", "phase": "end", "source": "registry", "bytes": 10, "fallback": "stalled"},
        {"event_id": "f3", "phase": "end", "source": "registry", "bytes": 10, "fallback": "tracker_unreachable"},
        {"event_id": "f4", "phase": "end", "source": "registry", "bytes": 10},  # a small blob: no swarm tried
    ]
    tally.add("n1", records)
    tally.add("n1", records[:1])  # re-sent
    assert tally.fallbacks == {"stalled": 2, "tracker_unreachable": 1}
    # a node making reasons up does not grow the origin's memory
    tally.add("evil", [{"event_id": f"x{i}", "phase": "end", "source": "registry", "fallback": f"r{i}"}
                       for i in range(1000)])
    assert len(tally.fallbacks) <= 33 and tally.fallbacks["other"] >= 1000 - 32


def posted(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("POST", "/ui/signin", headers={"Host": "origin.test:8080", **headers})


@pytest.mark.parametrize("headers", [
    {"Origin": "http://origin.test:8080"},
    {"Sec-Fetch-Site": "same-origin"},
])
def test_a_form_from_the_origins_own_page_is_taken(headers: dict[str, str]) -> None:
    _same_origin(posted(headers))


@pytest.mark.parametrize("headers", [
    {},
    {"Origin": "http://evil.test"},
    {"Origin": "null"},
    {"Origin": "http://origin.test:8080.evil.test"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://evil.test", "Sec-Fetch-Site": "same-origin"},  # (a lying header cannot help)
])
def test_a_form_from_elsewhere_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(errors.Denied):
        _same_origin(posted(headers))


async def test_page_files_a_fixed_list_with_the_security_headers(aiohttp_client: Callable[..., Any]) -> None:
    app = web.Application()
    statuspage.install_headers(app)
    add_routes(app, [(protocol.PAGE_ASSET, statuspage.serve_asset, "public")], {})
    client = await aiohttp_client(app)
    r = await client.get("/ui/static/plot.js")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
    assert "textContent" in await r.text()
    assert r.headers["Content-Security-Policy"] == statuspage.CSP
    assert "frame-ancestors 'none'" in statuspage.CSP and "script-src 'self'" in statuspage.CSP
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("nope.js", "..%2F__init__.py", "%2E%2E%2Fweb.py", "__init__.py"):
        r = await client.get(f"/ui/static/{name}")
        assert r.status == 404, name
        assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_one_principal_cannot_push_everyone_elses_sessions_out() -> None:
    """(attack17) Sessions are capped in all; one operator signing in again and again drops only
    its own oldest sessions, not the others'."""
    sessions = Sessions(limit=50)
    others = [sessions.open("Bearer other", f"op{i}")[0] for i in range(10)]
    mine = [sessions.open("Bearer mine", "looper")[0] for _ in range(1000)]
    assert all(sessions.get(c) is not None for c in others)
    assert sum(sessions.get(c) is not None for c in mine) == page.MAX_SESSIONS_PER_PRINCIPAL
    assert sessions.get(mine[-1]) is not None


def test_over_tls_the_session_cookie_is_a_host_cookie() -> None:
    """(attack17) A sibling subdomain cannot plant a "__Host-" cookie (cookie tossing)."""
    plain = make_mocked_request("GET", "/")
    assert page._cookie(plain) == page.COOKIE
    assert page._cookie(plain.clone(scheme="https")) == "__Host-shoal_session"
