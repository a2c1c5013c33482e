"""The origin registry with JWT token auth (a token server the tests run): alice may pull
private/app, bob may not, anonymous clients only public/app; and requests as clients make them."""

from __future__ import annotations

import base64
import http.client
import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.images import Image, build_image, push
from tests.support.procs import Component
from tests.support.registry import Registry
from tests.support.stack import Stack
from tests.support.tokenserver import TokenServer

MIB = 1 << 20
USERS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "pusher": "pusher-pw-3", "seeder": "seeder-pw-4"}
REPOS = ("private/app", "public/app", "private/other")


@dataclass
class TokenWorld:
    tokens: TokenServer
    registry: Registry
    private: Image  # in private/app
    public: Image  # in public/app

    def close(self) -> None:
        self.registry.close()
        self.tokens.close()


def open_world(root: Path) -> TokenWorld:
    """The token server (alice may pull private/app, bob only public/app, anonymous public/app)
    and a registry that trusts it, with both images pushed."""
    ts = TokenServer(root / "ts", service="shoal-test-registry", users=USERS, acl={
        "pusher": {r: {"pull", "push"} for r in REPOS},
        "seeder": {r: {"pull"} for r in REPOS},
        "alice": {"private/app": {"pull"}, "public/app": {"pull"}},
        "bob": {"public/app": {"pull"}},
        "": {"public/app": {"pull"}},
    })
    reg = Registry(root / "registry", users={}, auth_yaml=ts.registry_auth_yaml())
    reg.start()
    private = build_image(root / "private", tag="v1", layer_sizes=[8 * MIB, 3 * MIB, 2 * MIB, 200_000], seed=31)
    public = build_image(root / "public", tag="v1", layer_sizes=[2 * MIB, 100_000], seed=32)
    push(private, registry=reg.host, repo="private/app", user="pusher", password=USERS["pusher"])
    push(public, registry=reg.host, repo="public/app", user="pusher", password=USERS["pusher"])
    return TokenWorld(ts, reg, private, public)


def start(stack: Stack, agents: int = 2) -> list[Component]:
    stack.start_tracker()
    stack.start_origin()
    upstream = {"name": stack.registry.host, "url": stack.registry.url}  # no node credentials at all
    return [stack.start_agent(upstreams=[upstream], auth={"unauthenticated": "challenge", "decision_ttl": "2s"})
            for _ in range(agents)]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get(agent: Component, path: str, authorization: str | None = None, accept: str | None = None) -> Answer:
    host, port = agent.config["listen"].rsplit(":", 1)
    headers = {"Authorization": authorization} if authorization else {}
    if accept:
        headers["Accept"] = accept
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def token_from_challenge(challenge: str, user: str | None) -> str:
    """What a client does with a Bearer challenge: ask the realm for a token (Basic, or anonymous)."""
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    query = {"service": params["service"]}
    if "scope" in params:
        query["scope"] = params["scope"]
    req = urllib.request.Request(f"{params['realm']}?{urllib.parse.urlencode(query)}")
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{USERS[user]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["token"])


def pull_as(agent: Component, path: str, user: str | None, accept: str | None = None) -> Answer:
    """A request as a client makes it: without credentials first, then with a token for the
    challenge it got (anonymous clients ask for an anonymous token)."""
    first = get(agent, path, accept=accept)
    if first.status != 401:
        return first
    challenge = first.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    return get(agent, path, f"Bearer {token_from_challenge(challenge, user)}", accept)


MANIFEST = "application/vnd.oci.image.manifest.v1+json"
