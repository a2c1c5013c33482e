"""Every route of every component declares its guard, and a guard refuses a missing or wrong
token before the handler runs. The apps are built as in production; their lifecycles (swarm,
store, collector) are not started, so a request that got past its guard would fail loudly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shoal import protocol
from shoal.cluster import make_keys
from shoal.web import GUARDS_KEY, OPERATOR_GUARDS, add_routes
from shoal_agent import app as agent_app
from shoal_agent import config as agent_config
from shoal_origin import app as origin_app
from shoal_origin import config as origin_config
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config

Client = TestClient[web.Request, web.Application]
UPSTREAM = {"name": "registry.test", "url": "http://127.0.0.1:9"}


def build_all(tmp_path: Path) -> dict[str, tuple[web.Application, dict[str, str]]]:
    """Each component's app, and the Authorization its guards expect ("Bearer <token>")."""
    keys = make_keys(tmp_path / "keys")
    node = f"Bearer {keys['node_token'].read_text()}"
    registration = f"Bearer {keys['registration_token'].read_text()}"
    operator = f"Bearer {keys['operator_token'].read_text()}"  # the local admin
    notification = f"Bearer {keys['notification_token'].read_text()}"  # the registry's push notifications
    tokens = {"node_token": {"file": str(keys["node_token"])},
              "registration_token": {"file": str(keys["registration_token"])}}
    tracker = tracker_app.build(tracker_config.load({**tokens, "origin_public_key": str(keys["origin_public_key"])}))
    origin = origin_app.build(origin_config.load({
        **tokens, "data_dir": str(tmp_path / "origin"), "upstreams": [UPSTREAM], "tracker": "http://127.0.0.1:9",
        "signing_key": str(keys["signing_key"]), "operators": {"tokens": {"file": str(keys["operators"])}},
        "notifications": {"token": {"file": str(keys["notification_token"])}}}))
    agent = agent_app.build(agent_config.load({
        "data_dir": str(tmp_path / "agent"), "upstreams": [UPSTREAM], "node": "n1"}))
    return {"tracker": (tracker, {"node": node, "registration": registration}),
            "origin": (origin, {"node": node, "seed": operator, "audit": operator, "admin": operator,
                                "registry": notification}),
            "agent": (agent, {})}


def undeclared(app: web.Application) -> list[str]:
    guards = app.get(GUARDS_KEY, {})
    return [f"{r.method} {r.resource.canonical}" for r in app.router.routes()
            if r.resource is not None and (r.method, r.resource.canonical) not in guards
            and not (r.method == "HEAD" and ("GET", r.resource.canonical) in guards)]


def test_every_route_declares_its_guard(tmp_path: Path) -> None:
    apps = build_all(tmp_path)
    for name, (app, _) in apps.items():
        assert app[GUARDS_KEY], name
        assert undeclared(app) == [], f"{name} has routes without a guard"
    guards = {name: app[GUARDS_KEY] for name, (app, _) in apps.items()}
    # what each guard protects, in one table a reviewer can read
    public = {(r.method, r.pattern) for r in (protocol.HEALTHZ, protocol.READYZ, protocol.METRICS, protocol.STATUS)}
    # the status pages' shell, files and sign-in; the origin's page itself answers a visitor
    # without a session with a redirect to the sign-in (tests/e2e/test_status_page.py)
    page = {(r.method, r.pattern) for r in (protocol.PAGE, protocol.PAGE_ASSET)}
    signin = {(r.method, r.pattern) for r in (protocol.PAGE_SIGNIN_FORM, protocol.PAGE_SIGNIN, protocol.PAGE_SIGNOUT)}
    assert {route for route, g in guards["origin"].items() if g == "public"} == public | page | signin
    # the agent's page is counts only, as /metrics (agent/page.py)
    assert {route for route, g in guards["agent"].items() if g == "public"} >= page | {
        (protocol.PAGE_OVERVIEW.method, protocol.PAGE_OVERVIEW.pattern)}
    assert {route for route, g in guards["tracker"].items() if g == "registration"} == {
        (r.method, r.pattern) for r in (protocol.REGISTER_METAINFO, protocol.UNREGISTER_METAINFO)}
    # operators' routes: none of them opens to the node token
    assert {route: g for route, g in guards["origin"].items() if g in OPERATOR_GUARDS} == {
        (protocol.PRESEED.method, protocol.PRESEED.pattern): "seed",
        (protocol.PRESEED_JOB.method, protocol.PRESEED_JOB.pattern): "seed",
        (protocol.AUDIT.method, protocol.AUDIT.pattern): "audit",
        (protocol.SEEDED.method, protocol.SEEDED.pattern): "admin",
        (protocol.PAGE_OVERVIEW.method, protocol.PAGE_OVERVIEW.pattern): "audit",
        (protocol.PAGE_AUDIT.method, protocol.PAGE_AUDIT.pattern): "audit"}
    # the registry's push notifications: its own token, nobody else's
    assert guards["origin"][(protocol.NOTIFICATIONS.method, protocol.NOTIFICATIONS.pattern)] == "registry"


def test_the_walk_finds_a_route_added_without_a_guard() -> None:
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    add_routes(app, [], {})
    forgotten = protocol.STATUS.pattern + "/forgotten"
    app.router.add_get(forgotten, handler)
    assert sorted(undeclared(app)) == [f"GET {forgotten}", f"HEAD {forgotten}"]


def concrete(pattern: str) -> str:
    return pattern.replace("{digest}", "sha256:" + "a" * 64).replace("{job}", "job1")


@pytest.mark.parametrize("component", ["tracker", "origin"])
async def test_guards_refuse_missing_and_wrong_tokens(tmp_path: Path, component: str,
                                                      aiohttp_client: Callable[..., Any]) -> None:
    app, expected = build_all(tmp_path)[component]
    app.cleanup_ctx.clear()  # the guard is all that may answer here
    guarded = [(m, p, g) for (m, p), g in app[GUARDS_KEY].items() if g != "public"]
    assert guarded
    client: Client = await aiohttp_client(app)
    for method, pattern, guard in guarded:  # (canonical patterns: "{name}" segments)
        other = next((v for k, v in expected.items() if v != expected[guard]), None)
        for auth in (None, "Bearer wrong", expected[guard] + "x", expected[guard].lower(), other):
            headers = {"Authorization": auth} if auth else {}
            r = await client.request(method, concrete(pattern), headers=headers, data=b"{}")
            error = json.loads(await r.read())["errors"][0]
            if guard in OPERATOR_GUARDS and auth == expected["node"]:
                # the node token is known, and refused: 403, and never sent to the registry
                assert r.status == 403 and error["code"] == "DENIED", (method, pattern)
                assert "the node token is not an operator credential" in error["message"]
                continue
            assert r.status == 401, (method, pattern, auth)
            assert error["code"] == "UNAUTHORIZED"
            assert ("operator" if guard in OPERATOR_GUARDS else guard) in error["message"]
    assert client.server is not None


async def raw_status(host: str, port: int, request: bytes) -> int:
    """Send bytes a well-behaved client library would refuse to (e.g. a header that is not UTF-8)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])
    finally:
        writer.close()


@pytest.mark.parametrize("component", ["tracker", "origin"])
async def test_a_token_that_is_not_utf8_is_refused_quietly(tmp_path: Path, component: str,
                                                           aiohttp_client: Callable[..., Any],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    app, _ = build_all(tmp_path)[component]
    app.cleanup_ctx.clear()
    client: Client = await aiohttp_client(app)
    assert client.server.host is not None and client.server.port is not None
    for (method, pattern), guard in app[GUARDS_KEY].items():
        if guard == "public":
            continue
        request = (f"{method} {concrete(pattern)} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n".encode()
                   + b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
        assert await raw_status(client.server.host, client.server.port, request) == 401, (method, pattern)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a refusal, not a traceback
