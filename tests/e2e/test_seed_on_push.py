"""Pre-seed on push: the real registry's notifications reach the origin, which seeds what its
rules select; a node's pull afterwards takes no blob bytes from the registry. The notification
route answers only the registry's token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal import protocol
from tests.e2e.conftest import MIB, USERS
from tests.support import api
from tests.support.clients import run, verify_dir
from tests.support.images import Image, build_image, push
from tests.support.procs import ROOT, Component, free_port, wait_for, wait_http
from tests.support.registry import Registry
from tests.support.stack import Stack

PRINCIPAL = "registry-notification"
RULES = [{"repositories": ["team/*"], "tags": ["v*"], "platforms": ["linux/arm64"]}]
EVENTS = "application/vnd.docker.distribution.events.v1+json"


def endpoint(url: str, token: str) -> str:
    """distribution's notifications endpoint for the origin, as README "Pre-seed on push" has it."""
    return (f"{{name: shoal, url: '{url}', headers: {{Authorization: ['Bearer {token}']}}, timeout: 2s, "
            "threshold: 3, backoff: 200ms, ignore: {actions: [pull], mediatypes: [application/octet-stream]}}")


def open_world(tmp_path: Path, *, notify: str) -> tuple[Registry, Stack]:
    """`notify`: "token" (the registry notifies the origin with its token), "wrong-token", or
    "none" (no endpoint: the test posts itself)."""
    registry = Registry(tmp_path / "registry", users=USERS)
    stack = Stack(tmp_path / "stack", registry, node_user=("node", USERS["node"]),
                  seeder_user=("seeder", USERS["seeder"]))
    if notify != "none":
        token = stack.keys["notification_token"].read_text() if notify == "token" else "x" * 43
        registry.endpoints.append(endpoint(protocol.NOTIFICATIONS.url(stack.cluster.origin_url), token))
    return registry, stack


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Registry, Stack]]:
    registry, stack = open_world(tmp_path, notify=getattr(request, "param", "token"))
    registry.start()
    stack.start_tracker()
    stack.start_origin(notifications={"token": {"file": str(stack.keys["notification_token"])}, "rules": RULES})
    yield registry, stack
    stack.close()
    registry.close()


def image(tmp_path: Path, name: str, *, seed: int, tag: str = "v1", platforms: list[str] | None = None,
          layers: list[int] | None = None) -> Image:
    return build_image(tmp_path / name, tag=tag, layer_sizes=layers or [6 * MIB, 2 * MIB, 200_000], seed=seed,
                       platforms=platforms)


def platform_blobs(img: Image, platform: str) -> set[str]:
    doc = json.loads(img.manifests[img.platforms[platform]])
    return {doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])}


def push_events(origin: Component, result: str) -> float:
    return origin.metric("shoal_origin_push_events_total", result=result)


def test_push_is_seeded_and_a_pull_takes_no_registry_blob_bytes(world: tuple[Registry, Stack],
                                                                 tmp_path: Path) -> None:
    registry, stack = world
    origin = stack.origin
    assert origin is not None
    latest = image(tmp_path, "latest", seed=41, tag="latest", layers=[MIB, 100_000])
    push(latest, registry=registry.host, repo="team/app", user="alice", password=USERS["alice"])  # tag: no rule
    elsewhere = image(tmp_path, "elsewhere", seed=44, layers=[MIB, 100_000])
    push(elsewhere, registry=registry.host, repo="elsewhere/app", user="alice", password=USERS["alice"])  # repo
    wanted = image(tmp_path, "wanted", seed=42, platforms=["linux/amd64", "linux/arm64"])
    push(wanted, registry=registry.host, repo="team/app", user="alice", password=USERS["alice"])
    arm64 = platform_blobs(wanted, "linux/arm64")
    assert arm64 != platform_blobs(wanted, "linux/amd64")

    # nobody asked: the registry's notification did it (bounded wait on the seeded set)
    wait_for(lambda: api.seeded(origin.url, stack.operator_token) >= arm64, timeout=90,
             what="the pushed image's arm64 blobs seeded")
    # the rule's platform only; nothing of the pushes no rule selects (notified before, in order)
    assert api.seeded(origin.url, stack.operator_token) == arm64
    assert push_events(origin, "queued") == 1
    assert push_events(origin, "no_rule") == 2
    assert push_events(origin, "untagged") == 2  # the index's children, pushed by digest
    assert push_events(origin, "unauthorized") == 0
    # the endpoint's `ignore` (README's snippet) keeps pulls and blob pushes at the registry
    assert push_events(origin, "not_push") == 0 and push_events(origin, "not_manifest") == 0

    # audited as an operator's pre-seed: the submission and the job's end, by the registry's principal
    def audited() -> list[dict[str, Any]]:
        return api.audit_events(origin.url, stack.operator_token, operator_events=True, principal=PRINCIPAL)
    wait_for(lambda: any(e["action"] == "preseed-finished" for e in audited()), timeout=30,
             what="the push's pre-seed job audited")
    events = {e["action"]: e for e in audited()}
    submitted = json.loads(events["preseed"]["detail"])
    assert submitted["images"] == [f"{registry.host}/team/app:v1@{wanted.digest}"]
    assert submitted["platforms"] == ["linux/arm64"] and submitted["pushed_by"] == "alice"
    assert events["preseed"]["client_addr"].startswith("127.0.0.1:")  # the registry
    assert events["preseed-finished"]["outcome"] == "done"

    agent = stack.start_agent()
    before = registry.settle()
    dest = tmp_path / "copy"
    run(["skopeo", "--override-arch", "arm64", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{agent.config['listen']}/team/app:v1", f"dir:{dest}"])
    assert verify_dir(dest, wanted, platforms=["linux/arm64"]) == len(arm64)
    pulls = registry.settle()[len(before):]
    assert pulls, "the registry's audit saw the pull"
    assert registry.blob_gets(pulls) == {}  # no blob bytes from the registry: all from the swarm
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == len(arm64)
    assert agent.metric("shoal_agent_downloads_total", source="origin") == 0


@pytest.mark.parametrize("world", ["wrong-token"], indirect=True)
def test_the_registry_with_a_wrong_token_seeds_nothing(world: tuple[Registry, Stack], tmp_path: Path) -> None:
    registry, stack = world
    origin = stack.origin
    assert origin is not None
    img = image(tmp_path, "app", seed=46, layers=[2 * MIB, 100_000])
    push(img, registry=registry.host, repo="team/app", user="alice", password=USERS["alice"])
    # the registry is refused, and retries the same envelope (README: it holds the endpoint's queue)
    wait_for(lambda: push_events(origin, "unauthorized") >= 2, timeout=30, what="the registry refused, twice")
    assert api.seeded(origin.url, stack.operator_token) == set()
    assert push_events(origin, "queued") == 0


def post(url: str, body: bytes, authorization: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": EVENTS, **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def envelope(registry: Registry, img: Image, *, host: str | None = None) -> bytes:
    target = {"mediaType": img.media_type, "digest": img.digest, "size": 1, "length": 1, "repository": "team/app",
              "tag": "v1", "url": f"http://{host or registry.host}/v2/team/app/manifests/{img.digest}"}
    return json.dumps({"events": [{"id": "x", "action": "push", "target": target,
                                   "actor": {"name": "mallory"}}]}).encode()


@pytest.mark.parametrize("world", ["none"], indirect=True)  # no endpoint at the registry: the test posts
def test_only_the_registrys_token_triggers_a_preseed(world: tuple[Registry, Stack], tmp_path: Path) -> None:
    registry, stack = world
    origin = stack.origin
    assert origin is not None
    # (the rules seed linux/arm64 only: a single-platform image of another one is not seeded)
    img = image(tmp_path, "app", seed=43, platforms=["linux/arm64"])
    push(img, registry=registry.host, repo="team/app", user="alice", password=USERS["alice"])
    url = protocol.NOTIFICATIONS.url(origin.url)
    token = stack.keys["notification_token"].read_text()
    body = envelope(registry, img)
    for authorization in (None, "Bearer wrong-token-of-the-right-length", token, f"Bearer {stack.node_token}",
                          f"Bearer {stack.operator_token}", f"Basic {token}"):
        status, doc = post(url, body, authorization)
        assert status == 401, authorization
        assert token not in json.dumps(doc)
    assert push_events(origin, "unauthorized") == 6
    for bad in (b"{not json", b"[1, 2]", b'{"events": 3}', b'{"kind": "something else"}'):
        assert post(url, bad, f"Bearer {token}")[0] == 400
    # a push another registry reports: ignored, whatever the repository
    assert post(url, envelope(registry, img, host="evil.example.com:5000"), f"Bearer {token}") == \
        (200, {"events": {"foreign": 1}})
    assert api.seeded(origin.url, stack.operator_token) == set()  # nothing was queued by any of these

    # the same envelope with the registry's token: seeded (so the refusals above refused a valid one)
    assert post(url, body, f"Bearer {token}") == (200, {"events": {"queued": 1}})
    assert post(url, body, f"Bearer {token}") == (200, {"events": {"duplicate": 1}})
    wait_for(lambda: api.seeded(origin.url, stack.operator_token) == set(img.blobs), timeout=60,
             what="the notified image seeded")


def test_shoal_up_seed_on_push(tmp_path: Path) -> None:
    """`shoal up --seed-on-push`: the registry, given the endpoint and the token file the banner
    names, has a push seeded."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "shoal.cli", "keygen", str(data / "keys")], check=True, cwd=ROOT,
                   capture_output=True, timeout=60)  # (shoal up keeps keys it finds)
    origin_listen = f"127.0.0.1:{free_port()}"
    registry = Registry(tmp_path / "registry", users=USERS)
    registry.endpoints.append(endpoint(protocol.NOTIFICATIONS.url(f"http://{origin_listen}"),
                                       (data / "keys" / "notification.token").read_text()))
    registry.start()
    password = tmp_path / "seeder.password"
    password.write_text(USERS["seeder"])
    listen = f"127.0.0.2:{free_port('127.0.0.2')}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "up", "--upstream", registry.url, "--username", "seeder",
         "--password-file", str(password), "--data-dir", str(data), "--listen", listen,
         "--tracker-listen", f"127.0.0.1:{free_port()}", "--origin-listen", origin_listen,
         "--agent-torrent-port", str(free_port()), "--origin-torrent-port", str(free_port()),
         "--seed-on-push", "team/*:v*"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        wait_http(protocol.READYZ.url(f"http://{listen}"), timeout=60)
        img = image(tmp_path, "app", seed=45, layers=[2 * MIB, 100_000])
        push(img, registry=registry.host, repo="team/app", user="alice", password=USERS["alice"])
        operator_token = (data / "keys" / "operator.token").read_text()
        wait_for(lambda: api.seeded(f"http://{origin_listen}", operator_token) == set(img.blobs), timeout=60,
                 what="the pushed image seeded")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        registry.close()
    assert proc.returncode == 0, out
    assert (f"on push:   the registry's notifications endpoint: url "
            f"{protocol.NOTIFICATIONS.url(f'http://{origin_listen}')}, "
            f"headers Authorization: [\"Bearer <the content of {data / 'keys'}/notification.token>\"]") in out
