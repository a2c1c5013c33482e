"""Several origins, seen from a node, in process against origins that fail in chosen ways: an
admission goes to the blob's owners in rendezvous order and moves on past an unreachable origin
or a 5xx, never past a refusal; the journal goes to the first collector that takes it. And the
origin-to-origin route opens to the peer token only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry

from shoal import audit, peercerts, protocol, rendezvous
from shoal.clients import OriginClient
from shoal.cluster import make_keys
from shoal.config import OriginEntry
from shoal.errors import ConfigError
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal.swarm import Swarm
from shoal.web import GUARDS_KEY
from shoal_agent.config import SwarmPolicy
from shoal_agent.journal import Journal
from shoal_agent.membership import Membership, SwarmAccess, SwarmFailure
from shoal_agent.metrics import AgentMetrics
from shoal_agent.shipper import Shipper
from shoal_agent.upstreams import Upstream
from shoal_origin import app as origin_app
from shoal_origin import config as origin_config
from tests.support.procs import free_port

NAMES = ["o1", "o2", "o3"]
DIGEST = Digest("ab" * 32)
ORDER = rendezvous.ranked(NAMES, DIGEST.hex)  # the order every node asks them in for DIGEST


@dataclass
class FakeOrigin:
    """An origin that answers enrollment, and admissions with `status`; None: not listening."""

    status: int | None
    seen: list[str] = field(default_factory=list)
    server: TestServer | None = None
    port: int = field(default_factory=free_port)

    async def start(self) -> None:
        if self.status is None:
            return  # a dead origin: nothing listens on its port

        async def grants(request: web.Request) -> web.Response:
            self.seen.append("grants")
            return web.json_response(protocol.Grants(60.0, [], []).to_json())

        async def admission(request: web.Request) -> web.Response:
            self.seen.append("admission")
            assert self.status is not None
            return web.json_response({"errors": [{"code": "X", "message": "x"}]}, status=self.status)

        async def journal(request: web.Request) -> web.Response:
            self.seen.append("journal")
            if self.status != 200:
                return web.Response(status=self.status or 503)
            batch = protocol.JournalBatch.from_json(json.loads(await request.read()))
            return web.json_response(protocol.JournalAck(len(batch.records), 0, 0).to_json())

        app = web.Application()
        app.router.add_route(protocol.GRANTS.method, protocol.GRANTS.pattern, grants)
        app.router.add_route(protocol.ADMISSION.method, protocol.ADMISSION.pattern, admission)
        app.router.add_route(protocol.JOURNAL.method, protocol.JOURNAL.pattern, journal)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()

    @property
    def entry_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class SwarmStub:
    """What Membership needs of the swarm for an admission: the node's key."""

    key: peercerts.NodeKey = field(default_factory=peercerts.NodeKey.generate)


async def admit_with(statuses: dict[str, int | None]) -> tuple[dict[str, FakeOrigin], SwarmFailure]:
    origins = {name: FakeOrigin(status) for name, status in statuses.items()}
    for o in origins.values():
        await o.start()
    metrics = AgentMetrics(CollectorRegistry())
    try:
        async with aiohttp.ClientSession() as http:
            access = SwarmAccess(origins=tuple(OriginEntry(n, origins[n].entry_url) for n in NAMES), node="n1",
                                 node_token="t" * 32, origin_key=Ed25519PrivateKey.generate().public_key())
            membership = Membership(http=http, access=access, swarm=cast(Swarm, SwarmStub()),
                                    policy=SwarmPolicy(seed_timeout=20), metrics=metrics)
            membership.enrolled.set()
            upstream = Upstream("registry.test", RegistryClient(http, "http://127.0.0.1:9", credentials=None,
                                                                  user_agent="test"))
            with pytest.raises(SwarmFailure) as exc:
                await membership.admit(upstream, "private/app", DIGEST, None)
            return origins, exc.value
    finally:
        for o in origins.values():
            if o.server is not None:
                await o.server.close()


async def test_an_admission_moves_past_dead_and_failing_origins_in_rendezvous_order() -> None:
    first, second, third = ORDER
    origins, failure = await admit_with({first: None, second: 503, third: 403})
    # the dead first owner, then the second (503: next), then the third, whose refusal is final
    assert origins[second].seen == ["grants", "admission"]  # enrolled there right before asking
    assert origins[third].seen == ["grants", "admission"]
    assert failure.reason == "not_admitted"


@pytest.mark.parametrize("status", [401, 403, 400, 404])
async def test_a_refusal_is_final(status: int) -> None:
    first, second, third = ORDER
    origins, failure = await admit_with({first: status, second: 200, third: 200})
    assert origins[first].seen == ["grants", "admission"]
    assert origins[second].seen == [] and origins[third].seen == []  # never asked: the answer stands
    assert failure.reason in ("not_admitted", "origin_refused")


async def test_every_origin_failing_is_the_last_failure() -> None:
    origins, failure = await admit_with(dict.fromkeys(NAMES, 502))
    assert all(o.seen == ["grants", "admission"] for o in origins.values())
    assert failure.reason == "origin_error"
    origins, failure = await admit_with(dict.fromkeys(NAMES))
    assert failure.reason == "origin_unreachable"


def record(i: int) -> dict[str, Any]:
    return {"event_id": f"{i:032x}", "phase": "start", "ts": audit.now(), "node": "n1", "status": 200}


async def test_the_journal_goes_to_the_first_collector_that_takes_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", max_segment_bytes=1 << 20)
    await journal.open()
    # in the order of the node's name: the first failing, the second taking, the third never asked
    origins = {"a": FakeOrigin(503), "b": FakeOrigin(200), "c": FakeOrigin(200)}
    for o in origins.values():
        await o.start()
    prepared: list[str] = []

    async def before(name: str) -> None:
        prepared.append(name)

    async with aiohttp.ClientSession() as http:
        shipper = Shipper(journal, [(n, OriginClient(http, o.entry_url, "t")) for n, o in origins.items()],
                          node="n1", key=Ed25519PrivateKey.generate(), before=before, cooldown=3600)
        task = asyncio.create_task(shipper.run())
        try:
            await asyncio.gather(*(journal.record(record(i)) for i in range(20)))
            await until(lambda: shipper.shipped_records >= 20)
            assert "journal" in origins["a"].seen and "journal" in origins["b"].seen
            assert origins["c"].seen == []
            assert prepared[:2] == ["a", "b"]  # the node enrolls where it ships
            # a collector that failed is asked last for a while: the next batch goes to b directly
            asked_a = origins["a"].seen.count("journal")
            origins["a"].status = 200
            await journal.record(record(98))
            await until(lambda: shipper.shipped_records >= 21)
            assert origins["a"].seen.count("journal") == asked_a
            # once that while is over, the first collector is back first
            shipper.cooldown = 0
            taken_by_b = origins["b"].seen.count("journal")
            await journal.record(record(99))
            await until(lambda: shipper.shipped_records >= 22)
            assert origins["b"].seen.count("journal") == taken_by_b
            assert origins["a"].seen.count("journal") == asked_a + 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for o in origins.values():
                assert o.server is not None
                await o.server.close()
            await journal.close()


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


# ----- the origin-to-origin route ----------------------------------------------------------------------


@pytest.fixture
async def origin_client(tmp_path: Path, aiohttp_client: Callable[..., Any]
                        ) -> tuple[TestClient[web.Request, web.Application], dict[str, str]]:
    keys = make_keys(tmp_path / "keys")
    doc = {"data_dir": str(tmp_path / "origin"), "upstreams": [{"name": "registry.test", "url": "http://127.0.0.1:9"}],
           "tracker": "http://127.0.0.1:9", "signing_key": str(keys["signing_key"]),
           "node_token": {"file": str(keys["node_token"])},
           "registration_token": {"file": str(keys["registration_token"])},
           "operators": {"tokens": {"file": str(keys["operators"])}},
           "name": "o1", "origins": [{"name": n, "url": f"http://127.0.0.1:{9 + i}"} for i, n in enumerate(NAMES)],
           "peer_token": {"file": str(keys["peer_token"])}}
    app = origin_app.build(origin_config.load(doc))
    app.cleanup_ctx.clear()  # the guard is all that may answer here
    tokens = {name: f"Bearer {keys[name].read_text()}"
              for name in ("node_token", "registration_token", "peer_token", "operator_token")}
    return await aiohttp_client(app), tokens


async def test_the_replica_route_takes_the_peer_token_only(
        origin_client: tuple[TestClient[web.Request, web.Application], dict[str, str]]) -> None:
    client, tokens = origin_client
    assert client.app is not None
    assert client.app[GUARDS_KEY][(protocol.REPLICA.method, protocol.REPLICA.pattern)] == "origin"
    url = protocol.REPLICA.path(digest=str(DIGEST))
    for auth in (None, tokens["node_token"], tokens["registration_token"], tokens["operator_token"],
                 tokens["peer_token"] + "x"):
        r = await client.post(url, json={"ns": "registry.test", "repository": "a"},
                              headers={"Authorization": auth} if auth else {})
        assert r.status == 401, auth
        assert "peer token" in (await r.json())["errors"][0]["message"]
    # and the peer token opens no operator route
    r = await client.get(protocol.SEEDED.path(), headers={"Authorization": tokens["peer_token"]})
    assert r.status == 403
    assert "the peer token is not an operator credential" in (await r.json())["errors"][0]["message"]


def test_the_peer_token_must_be_its_own_secret(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    doc = {"data_dir": str(tmp_path / "origin"), "upstreams": [{"name": "registry.test", "url": "http://127.0.0.1:9"}],
           "tracker": "http://127.0.0.1:9", "signing_key": str(keys["signing_key"]),
           "node_token": {"file": str(keys["node_token"])},
           "registration_token": {"file": str(keys["registration_token"])},
           "name": "o1", "origins": [{"name": "o1", "url": "http://127.0.0.1:9"}],
           "peer_token": {"file": str(keys["node_token"])}}
    with pytest.raises(ConfigError, match="^peer_token: must differ"):
        origin_app.build(origin_config.load(doc))
