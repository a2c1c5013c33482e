"""The origin's operator authenticator in process, behind shoal.web's operator guards: roles,
the node token, and the operators file read again when it changes (failing closed when it
breaks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from shoal import operator_tokens, protocol
from shoal.registry import Credentials, RegistryClient
from shoal.web import add_routes, error_middleware, operator_of
from shoal_origin import config as origin_config
from shoal_origin import operators as operators_module
from shoal_origin.operators import Operators
from tests.support.fakeregistry import Canned, FakeServer

Client = TestClient[web.Request, web.Application]
NODE_TOKEN = "node-token-" + "n" * 20
ORIGIN = {"data_dir": "/d", "upstreams": [{"name": "registry.test:5000", "url": "http://127.0.0.1:9"}],
          "tracker": "http://t:6969", "registration_token": {"file": "/x"}, "signing_key": "/k.pem",
          "node_token": {"file": "/n"}}


async def start(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> tuple[Client, Path, list[dict[str, Any]]]:
    path = tmp_path / "operators.json"
    operator_tokens.save(path, [])
    settings = origin_config.load({**ORIGIN, "operators": {"tokens": {"file": str(path)}}}).operators
    ops = Operators(settings, cluster_secrets={"node token": NODE_TOKEN}, registry=CollectorRegistry())
    recorded: list[dict[str, Any]] = []

    async def recorder(start: dict[str, Any], _end: dict[str, Any]) -> None:
        recorded.append(start)

    ops.attach(None, recorder)

    async def who(request: web.Request) -> web.Response:
        op = operator_of(request)
        return web.json_response({"principal": op.principal, "roles": sorted(op.roles)})

    app = web.Application(middlewares=[error_middleware()])
    add_routes(app, [(protocol.AUDIT, who, "audit"), (protocol.PRESEED, who, "seed"), (protocol.SEEDED, who, "admin")],
               {}, operators=ops)
    return await aiohttp_client(app), path, recorded


async def status(client: Client, route: protocol.Route, token: str) -> int:
    r = await client.request(route.method, route.path(), headers={"Authorization": f"Bearer {token}"})
    await r.read()
    return r.status


async def test_roles_the_node_token_and_a_changing_file(tmp_path: Path, aiohttp_client: Callable[..., Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(operators_module, "RELOAD_EVERY", 0.0)
    client, path, recorded = await start(tmp_path, aiohttp_client)
    auditor = operator_tokens.add(path, "auditor", ["audit"])
    admin = operator_tokens.add(path, "boss", ["admin"])
    # read again on change: both work at once
    r = await client.get(protocol.AUDIT.path(), headers={"Authorization": f"Bearer {auditor}"})
    assert r.status == 200 and await r.json() == {"principal": "token:auditor", "roles": ["audit"]}
    assert await status(client, protocol.PRESEED, auditor) == 403
    assert await status(client, protocol.SEEDED, auditor) == 403
    for route in (protocol.AUDIT, protocol.PRESEED, protocol.SEEDED):
        assert await status(client, route, admin) == 200
    # the node token: 403, and audited as such; refusals of the auditor too
    r = await client.get(protocol.AUDIT.path(), headers={"Authorization": f"Bearer {NODE_TOKEN}"})
    assert r.status == 403 and "node token" in json.loads(await r.read())["errors"][0]["message"]
    # whatever its spelling: never taken for a registry token
    for spelling in (f"bearer {NODE_TOKEN}", f"Bearer  {NODE_TOKEN} ", f"BEARER {NODE_TOKEN}"):
        r = await client.get(protocol.AUDIT.path(), headers={"Authorization": spelling})
        assert r.status == 403, spelling
    recorded[3:] = []
    assert [(e["principal"], e["action"], e["error"]) for e in recorded] == [
        ("token:auditor", "refused", "no seed role"), ("token:auditor", "refused", "no admin role"),
        ("node-token", "refused", "the node token is not an operator credential")]
    # removed: refused
    assert operator_tokens.remove(path, "auditor")
    assert await status(client, protocol.AUDIT, auditor) == 401
    assert await status(client, protocol.AUDIT, admin) == 200
    # a broken file lets no token in, until it is fixed
    text = path.read_text()
    path.write_text(text[:-5])
    assert await status(client, protocol.AUDIT, admin) == 401
    path.write_text(text)
    assert await status(client, protocol.AUDIT, admin) == 200
    # no credential, another scheme, a registry-looking token with no registry configured: 401
    assert (await client.get(protocol.AUDIT.path())).status == 401
    r = await client.get(protocol.AUDIT.path(), headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert r.status == 401
    assert await status(client, protocol.AUDIT, "eyJhbGciOi.e30.sig") == 401


async def test_registry_logins_are_checked_at_a_bounded_rate_per_address(
        aiohttp_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone may present a registry login: past MAX_LOGINS_PER_ADDRESS fresh ones a minute from
    one address, 429 without asking the registry (a login checked recently is still answered)."""
    monkeypatch.setattr(operators_module, "MAX_LOGINS_PER_ADDRESS", 2)
    fake = FakeServer("127.0.0.48")
    fake.require_basic = True  # anonymous: a challenge; any Basic login: 200
    fake.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
    try:
        doc = {**ORIGIN, "upstreams": [{"name": fake.host, "url": fake.url}],
               "operators": {"registry": {"upstream": fake.host, "roles": {"alice": ["audit"]}}}}
        ops = Operators(origin_config.load(doc).operators, cluster_secrets={"node token": NODE_TOKEN},
                        registry=CollectorRegistry())

        async def recorder(start: dict[str, Any], _end: dict[str, Any]) -> None:
            pass

        async with aiohttp.ClientSession() as http:
            ops.attach(RegistryClient(http, fake.url, credentials=None, user_agent="t", retry_budget=0), recorder)

            async def who(request: web.Request) -> web.Response:
                return web.json_response({"principal": operator_of(request).principal})

            app = web.Application(middlewares=[error_middleware()])
            add_routes(app, [(protocol.AUDIT, who, "audit")], {}, operators=ops)
            client = await aiohttp_client(app)

            async def login(user: str) -> int:
                r = await client.get(protocol.AUDIT.path(),
                                     headers={"Authorization": Credentials(user, "pw").basic()})
                await r.read()
                return int(r.status)

            assert [await login("alice"), await login("mallory")] == [200, 401]  # no role for mallory
            logins = sum(1 for s in fake.seen if s.headers.get("Authorization", "").startswith("Basic "))
            assert await login("eve") == 429
            assert await login("alice") == 200  # checked a moment ago: no new question
            assert sum(1 for s in fake.seen if s.headers.get("Authorization", "").startswith("Basic ")) == logins
    finally:
        await asyncio.to_thread(fake.close)


async def test_refusals_fill_the_audit_at_a_bounded_rate(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> None:
    """A caller refused again and again (here: the node token) is audited ten times a minute at
    most, each with the route it asked for, never the path it wrote."""
    client, _, recorded = await start(tmp_path, aiohttp_client)
    for n in range(operators_module.MAX_REFUSALS_AUDITED + 5):
        r = await client.post(protocol.PRESEED.path() + f"?junk={'x' * 500}{n}",
                              headers={"Authorization": f"Bearer {NODE_TOKEN}"})
        assert r.status == 403
    assert len(recorded) == operators_module.MAX_REFUSALS_AUDITED
    details = [e["detail"] if isinstance(e["detail"], dict) else json.loads(e["detail"]) for e in recorded]
    assert {d["path"] for d in details} == {protocol.PRESEED.pattern}
