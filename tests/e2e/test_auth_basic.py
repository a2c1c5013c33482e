"""Pass-through with an htpasswd (Basic) registry: revocation within the decision cache's
lifetime, strict and availability modes with the registry unreachable, X-Forwarded-For ignored,
and no secret in any log, journal or metrics after a full authenticated pull at debug level."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import protocol
from tests.e2e.conftest import USERS, Images
from tests.support.clients import Containerd
from tests.support.faults import CuttableProxy, FlakyRegistry
from tests.support.images import build_image, push
from tests.support.procs import Component, http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def get(agent: Component, path: str, headers: dict[str, str] | None = None, *,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    host, port = agent.config["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def challenge_agent(stack: Stack, *, url: str | None = None, **auth: str) -> Component:
    upstream = {"name": stack.registry.host, "url": url or stack.registry.url}
    return stack.start_agent(upstreams=[upstream], auth={"unauthenticated": "challenge", **auth})


REGISTRY_USERS = {"alice": "alice-1", "bob": "bob-1", "seeder": "seeder-1", "pusher": "pusher-1"}


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry this test may restart and change users of."""
    reg = Registry(tmp_path / "registry", users=REGISTRY_USERS)
    reg.start()
    yield reg
    reg.close()


def test_basic_challenge_and_revocation_within_the_decision_ttl(own_registry: Registry, tmp_path: Path) -> None:
    image = build_image(tmp_path / "img", tag="v1", layer_sizes=[2 << 20, 100_000], seed=41)
    push(image, registry=own_registry.host, repo="private/app", user="pusher", password="pusher-1")
    stack = Stack(tmp_path / "stack", own_registry, node_user=("x", "x"), seeder_user=("seeder", "seeder-1"))
    try:
        stack.start_tracker()
        stack.start_origin()
        ttl = 3.0
        agent = challenge_agent(stack, decision_ttl=f"{ttl}s")
        blob = max(image.blobs.values(), key=lambda b: b.size)
        path = f"/v2/private/app/blobs/{blob.digest}"
        status, headers, _ = get(agent, path)
        assert status == 401
        assert headers["www-authenticate"] == 'Basic realm="basic-realm"'  # relayed verbatim
        assert get(agent, path, {"Authorization": basic("alice", "wrong")})[0] == 401
        status, _, body = get(agent, path, {"Authorization": basic("alice", "alice-1")})
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        # revoke alice at the registry
        own_registry.set_users({"seeder": "seeder-1", "pusher": "pusher-1"})
        own_registry.restart()
        revoked = time.monotonic()
        # manifests are asked of the registry every time: refused at once
        status, _, _ = get(agent, "/v2/private/app/manifests/v1", {"Authorization": basic("alice", "alice-1"),
                                                                   "Accept": MANIFEST})
        assert status == 401
        # blobs: the decision may be reused for at most its TTL, then the registry's "no" holds
        while time.monotonic() - revoked < ttl + 1:
            time.sleep(0.2)
        status, _, body = get(agent, path, {"Authorization": basic("alice", "alice-1")})
        assert status == 401
        assert len(body) < 500
    finally:
        stack.close()


def test_a_refused_first_puller_does_not_fail_those_who_joined_its_download(own_registry: Registry,
                                                                           tmp_path: Path) -> None:
    """A blob's download runs once per node, with the credential of the client that started it.
    When the registry refuses that credential (revoked while the agent still holds its yes), a
    client that joined the download with a credential of its own gets the blob fetched with
    that one, and the refused credential's cached yes is dropped."""
    image = build_image(tmp_path / "img", tag="v1", layer_sizes=[2 << 20], seed=43)
    push(image, registry=own_registry.host, repo="private/app", user="pusher", password="pusher-1")
    proxy = FlakyRegistry(own_registry.host)
    stack = Stack(tmp_path / "stack", own_registry, node_user=("x", "x"), seeder_user=("seeder", "seeder-1"))
    try:
        # no tracker and no origin: the blob comes from the registry, with the puller's credential
        agent = challenge_agent(stack, url=proxy.url, decision_ttl="300s")
        blob = max(image.blobs.values(), key=lambda b: b.size)
        path = f"/v2/private/app/blobs/{blob.digest}"
        alice = {"Authorization": basic("alice", "alice-1")}
        bob = {"Authorization": basic("bob", "bob-1")}
        assert get(agent, path, alice, method="HEAD")[0] == 200  # the agent now holds alice's yes
        own_registry.set_users({k: v for k, v in REGISTRY_USERS.items() if k != "alice"})
        own_registry.restart()
        held, release = proxy.hold_next_get(f"/blobs/{blob.digest}")
        answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

        def pull(who: str, headers: dict[str, str]) -> None:
            answers[who] = get(agent, path, headers)

        first = threading.Thread(target=pull, args=("alice", alice))
        first.start()
        assert held.wait(30), "alice's download did not reach the registry"
        misses = agent.metric("shoal_agent_cache_misses_total")
        joined = threading.Thread(target=pull, args=("bob", bob))
        joined.start()
        # (the miss is counted right before the request joins the download, with no wait between)
        wait_for(lambda: agent.metric("shoal_agent_cache_misses_total") > misses, timeout=30)
        release.set()
        first.join(90)
        joined.join(90)
        status, _, body = answers["bob"]
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        status, _, body = answers["alice"]
        assert status == 503
        assert "401" in json.loads(body)["errors"][0]["message"]
        # alice's yes is forgotten: her next request is asked of the registry, which says no
        status, headers, _ = get(agent, path, alice)
        assert status == 401
        assert headers["www-authenticate"] == 'Basic realm="basic-realm"'
    finally:
        stack.close()
        proxy.close()


def test_a_puller_behind_two_refused_downloads_gets_the_blob_and_keeps_its_yes(own_registry: Registry,
                                                                               tmp_path: Path) -> None:
    """The refused first puller's second request (another repository) joins the download before
    bob does: when the first download is refused, that request starts the next one, bob joins
    it, and it is refused too. bob moves on to a download of his own (found by an outsider's
    attack: bob got the 503 and lost his cached yes, though the registry never refused him)."""
    image = build_image(tmp_path / "img", tag="v1", layer_sizes=[2 << 20], seed=44)
    for repo in ("private/app", "private/app2"):
        push(image, registry=own_registry.host, repo=repo, user="pusher", password="pusher-1")
    proxy = FlakyRegistry(own_registry.host)
    stack = Stack(tmp_path / "stack", own_registry, node_user=("x", "x"), seeder_user=("seeder", "seeder-1"))
    try:
        agent = challenge_agent(stack, url=proxy.url, decision_ttl="300s")
        blob = max(image.blobs.values(), key=lambda b: b.size)
        app, app2 = f"/v2/private/app/blobs/{blob.digest}", f"/v2/private/app2/blobs/{blob.digest}"
        alice = {"Authorization": basic("alice", "alice-1")}
        bob = {"Authorization": basic("bob", "bob-1")}
        for path, who in ((app, alice), (app2, alice), (app, bob)):
            assert get(agent, path, who, method="HEAD")[0] == 200  # yeses the agent now holds
        own_registry.set_users({k: v for k, v in REGISTRY_USERS.items() if k != "alice"})
        own_registry.restart()
        held, release = proxy.hold_next_get(f"/blobs/{blob.digest}")
        answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

        def pull(who: str, path: str, headers: dict[str, str]) -> threading.Thread:
            misses = agent.metric("shoal_agent_cache_misses_total")
            thread = threading.Thread(target=lambda: answers.__setitem__(who, get(agent, path, headers)))
            thread.start()
            # (the miss is counted right before the request joins the download, with no wait between)
            wait_for(lambda: agent.metric("shoal_agent_cache_misses_total") > misses, timeout=30)
            return thread

        first = pull("alice", app, alice)
        assert held.wait(30), "alice's download did not reach the registry"
        threads = [first, pull("alice2", app2, alice), pull("bob", app, bob)]
        release.set()
        for thread in threads:
            thread.join(90)
        status, _, body = answers["bob"]
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        assert answers["alice"][0] == answers["alice2"][0] == 503
        # bob's yes is still the agent's: his next pull asks the registry nothing
        heads = agent.metric("shoal_agent_registry_requests_total", kind="blob_head")
        status, _, body = get(agent, app, bob)
        assert status == 200
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
        assert agent.metric("shoal_agent_registry_requests_total", kind="blob_head") == heads
    finally:
        stack.close()
        proxy.close()


def test_registry_unreachable_strict_and_availability(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    proxy = CuttableProxy("127.0.0.1", registry.port)
    stack.start_tracker()
    stack.start_origin()
    strict = challenge_agent(stack, url=proxy.url, decision_ttl="1s")
    available = challenge_agent(stack, url=proxy.url, decision_ttl="1s", mode="availability")
    alice = {"Authorization": basic("alice", USERS["alice"]), "Accept": MANIFEST}
    blob = max(image.blobs.values(), key=lambda b: b.size)
    for agent in (strict, available):
        assert get(agent, "/v2/private/app/manifests/v1", alice)[0] == 200
        assert get(agent, f"/v2/private/app/blobs/{blob.digest}", alice)[0] == 200
    proxy.cut()
    time.sleep(1.5)  # past the decision TTL
    status, _, body = get(strict, f"/v2/private/app/blobs/{blob.digest}", alice)
    assert status == 503
    assert "auth.mode: strict" in json.loads(body)["errors"][0]["message"]
    assert get(strict, "/v2/private/app/manifests/v1", alice)[0] == 503
    status, _, body = get(available, f"/v2/private/app/blobs/{blob.digest}", alice)
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    status, headers, body = get(available, "/v2/private/app/manifests/v1", alice)
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == image.digest == headers["docker-content-digest"]
    # another credential gets nothing from what alice was allowed
    assert get(available, f"/v2/private/app/blobs/{blob.digest}",
               {"Authorization": basic("seeder", USERS["seeder"])})[0] == 503
    assert get(available, "/v2/private/app/manifests/v1")[0] == 503  # anonymous
    events = stack.journal(available)
    stale = [e for e in events if e["authz_method"] == "stale_decision"]
    assert len(stale) == 2
    assert all(e["registry_status"] == "unreachable" and e["principal"] == "alice" for e in stale)



def test_x_forwarded_for_is_not_trusted(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    stack.start_tracker()
    stack.start_origin()
    agent = challenge_agent(stack)
    blob = next(b for b in image.blobs.values() if b.size < 1 << 20)
    before = len(registry.settle())
    status, _, _ = get(agent, f"/v2/private/app/blobs/{blob.digest}",
                       {"Authorization": basic("alice", USERS["alice"]), "X-Forwarded-For": "203.0.113.7",
                        "X-Real-Ip": "203.0.113.7"})
    assert status == 200
    events = registry.settle()[before:]
    assert events
    assert all("203.0.113.7" not in e.addr for e in events)
    assert all(e.addr.startswith("127.0.0.1:") for e in events if e.digest == blob.digest)  # the agent
    recorded = [e for e in stack.journal(agent) if e["digest"] == blob.digest]
    assert [e["status"] for e in recorded] == [200]
    assert str(recorded[0]["client_addr"]).startswith("127.0.0.1:")  # the socket's peer, not the header


def test_no_secret_in_logs_journals_or_metrics(stack: Stack, registry: Registry, images: Images,
                                               containerd: Containerd) -> None:
    image = images.app()
    stack.start_tracker()
    stack.start_origin()
    agent = challenge_agent(stack)  # log level debug, as every stack component here
    hosts = containerd.hosts_dir(registry.host, registry.url, agent)
    containerd.pull(f"{registry.host}/private/app:v1", hosts, user=f"alice:{USERS['alice']}")
    containerd.verify_content(list(image.blobs))
    # failed attempts put secrets in play too
    get(agent, "/v2/private/app/manifests/v1", {"Authorization": basic("alice", "a-wrong-password-77")})
    get(agent, "/v2/private/app/manifests/v1", {"Authorization": "Bearer not.a.token-xyz-secret"})
    stack.journal(agent, minimum=len(image.blobs) + 3)
    secrets = {
        USERS["alice"], USERS["seeder"], "a-wrong-password-77", "not.a.token-xyz-secret",
        base64.b64encode(f"alice:{USERS['alice']}".encode()).decode(),
        base64.b64encode(b"alice:a-wrong-password-77").decode(),
        base64.b64encode(f"seeder:{USERS['seeder']}".encode()).decode(),
        stack.node_token, stack.token_file.read_text(),
    }
    haystacks: dict[str, bytes] = {}
    for path in stack.workdir.rglob("*"):
        # every log, journal, index and database (blob contents and the secrets' own files aside)
        if (path.is_file() and "keys" not in path.parts and not path.name.endswith((".password", ".yaml"))
                and (path.suffix != "" or "blobs" not in path.parts)):
            haystacks[str(path)] = path.read_bytes()
    for component in stack.components:
        haystacks[f"{component.name} metrics"] = http_get(protocol.METRICS.url(component.url))[1]
    assert any(name.endswith("agent0.log") for name in haystacks)
    assert any("journal" in name for name in haystacks)
    assert any(name.endswith("audit.db") for name in haystacks)
    for name, data in haystacks.items():
        for secret in secrets:
            assert secret.encode() not in data, f"a secret is in {name}"
        assert b"Basic " + base64.b64encode(b"alice:")[:6] not in data, name
    # swarm tokens travel in announce URLs; libtorrent's messages about them are scrubbed
    logs = b"".join(data for name, data in haystacks.items() if name.endswith(".log"))
    assert b"token=" not in logs.replace(b"token=<redacted>", b"")
    # and nothing the components wrote is readable by another user of the machine: cache (a
    # private layer), journal, decisions, audit.db (they followed the umask: 0644)
    checked = 0
    for component in stack.components:
        if not component.config.get("data_dir"):
            continue
        root = Path(component.config["data_dir"])
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                assert mode & 0o077 == 0, f"{path} is {oct(mode & 0o777)}"
                checked += 1
    assert checked > len(image.blobs)  # the cached blobs at least
