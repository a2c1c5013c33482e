"""The origin's push-notification route exists only when configured, and its token is its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shoal import protocol
from shoal.cluster import make_keys
from shoal.errors import ConfigError
from shoal_origin import app as origin_app
from shoal_origin import config as origin_config

Client = TestClient[web.Request, web.Application]


def origin_doc(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    keys = make_keys(tmp_path / "keys")
    return {"node_token": {"file": str(keys["node_token"])},
            "registration_token": {"file": str(keys["registration_token"])},
            "data_dir": str(tmp_path / "origin"), "upstreams": [{"name": "registry.test", "url": "http://127.0.0.1:9"}],
            "tracker": "http://127.0.0.1:9", "signing_key": str(keys["signing_key"]), **extra}


async def test_without_notifications_there_is_no_route(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> None:
    app = origin_app.build(origin_config.load(origin_doc(tmp_path)))
    app.cleanup_ctx.clear()
    client: Client = await aiohttp_client(app)
    token = (tmp_path / "keys" / "notification.token").read_text()
    r = await client.post(protocol.NOTIFICATIONS.path(), data=b'{"events": []}',
                          headers={"Authorization": f"Bearer {token}"})
    assert r.status == 404  # nobody can have the origin seed anything by notification


@pytest.mark.parametrize("secret", ["node_token", "registration_token"])
def test_the_notification_token_is_not_a_cluster_secret(tmp_path: Path, secret: str) -> None:
    doc = origin_doc(tmp_path)
    doc["notifications"] = {"token": doc[secret]}
    with pytest.raises(ConfigError, match="notifications.token: must differ"):
        origin_app.build(origin_config.load(doc))


async def test_the_notification_token_opens_no_operator_route(tmp_path: Path,
                                                              aiohttp_client: Callable[..., Any]) -> None:
    doc = origin_doc(tmp_path, notifications={"token": {"file": str(tmp_path / "keys" / "notification.token")}},
                     operators={"registry": {"upstream": "registry.test", "roles": {"alice": ["admin"]}}})
    app = origin_app.build(origin_config.load(doc))
    app.cleanup_ctx.clear()
    client: Client = await aiohttp_client(app)
    token = (tmp_path / "keys" / "notification.token").read_text()
    r = await client.post(protocol.PRESEED.path(), json={"images": ["registry.test/team/app:v1"]},
                          headers={"Authorization": f"Bearer {token}"})
    # refused by name, and never sent to the registry as someone's login (it is not reachable here:
    # a forwarded credential would have been a 503)
    assert r.status == 403
    assert "the notification token is not an operator credential" in (await r.json())["errors"][0]["message"]
