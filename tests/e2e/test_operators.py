"""Operators are not nodes: the node token opens none of the operator routes; static operator
tokens carry roles (and the repositories a seed operator may pre-seed); operators may also sign
in with their registry login, which the registry checks (htpasswd, and a token server with
per-repository ACLs: alice may pull private/app, bob may not); every operator action is in the
audit trail under its principal; no secret reaches a log."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal import protocol
from tests.e2e.conftest import USERS, Images
from tests.support import api
from tests.support.images import Image, build_image, push
from tests.support.procs import ROOT, Component, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack
from tests.support.tokenserver import TokenServer
from tests.support.tokenworld import USERS as WORLD_USERS

MIB = 1 << 20
REGISTRY_BYTES = "shoal_origin_registry_bytes_total"

NOT_AN_OPERATOR = "not an operator: the registry did not accept this login, or it holds no operator role"


def call(origin: Component, route: protocol.Route, authorization: str | None, body: Any = None,
         **params: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(origin.url + route.path(**params), data=data, headers=headers, method=route.method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def error_of(doc: dict[str, Any]) -> tuple[str, str]:
    error = doc["errors"][0]
    return error["code"], error["message"]


def bearer(token: str) -> str:
    return f"Bearer {token}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def add_operator(stack: Stack, name: str, roles: str, *globs: str) -> str:
    """`shoal-origin add-operator`, as an administrator runs it: the token, printed once."""
    args = ["add-operator", name, "--roles", roles, "--operators", str(stack.keys["operators"])]
    if globs:
        args += ["--repositories", *globs]
    done = subprocess.run([sys.executable, "-m", "shoal_origin", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("shoal_op_") and len(token) == len("shoal_op_") + 43
    text = stack.keys["operators"].read_text()
    assert token not in text and name in text  # only its hash is kept
    assert stat.S_IMODE(os.stat(stack.keys["operators"]).st_mode) == 0o600
    return token


def preseed_body(*images: str) -> dict[str, Any]:
    return {"images": list(images), "platforms": []}


def wait_job(origin: Component, token: str, job: str) -> protocol.PreseedJob:
    found: list[protocol.PreseedJob] = []

    def finished() -> bool:
        found[:] = [api.preseed_job(origin.url, token, job)]
        return found[0].finished

    wait_for(finished, timeout=120, what=f"pre-seed job {job} finished")
    return found[0]


def operator_events(origin: Component, admin: str, **filters: Any) -> list[dict[str, Any]]:
    return [e for e in api.audit_events(origin.url, admin, operator_events=True, **filters) if e["kind"] == "operator"]


def assert_no_secrets(components: list[Component], secrets: list[str]) -> None:
    for component in components:
        log = component.log()
        assert log, component.name
        for secret in secrets:
            assert secret not in log, f"a secret is in {component.name}'s log"


def shoal_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=180,
                          cwd=ROOT, input=stdin, env={**os.environ, **(env or {})})


def test_static_operator_tokens_and_roles(stack: Stack, registry: Registry, images: Images) -> None:
    multi = images.multi()
    small = images.get("team/small", layers=[MIB + 7, 60_000], seed=41)
    host = registry.host
    auditor = add_operator(stack, "auditor", "audit")
    ci = add_operator(stack, "ci", "seed", f"{host}/team/*")
    other = add_operator(stack, "other", "seed", f"{host}/team/*")
    stack.start(agents=0)
    origin, admin = stack.origin, stack.operator_token
    assert origin is not None
    job_path = {"job": "0123456789abcdef"}

    # the node token opens no operator route: 403, the one error body
    for route in (protocol.AUDIT, protocol.PRESEED, protocol.PRESEED_JOB, protocol.SEEDED):
        body = preseed_body(f"{host}/team/small:v1") if route is protocol.PRESEED else None
        status, doc = call(origin, route, bearer(stack.node_token), body,
                           **(job_path if route is protocol.PRESEED_JOB else {}))
        assert status == 403, route
        assert error_of(doc) == ("DENIED", "the node token is not an operator credential: this API is for operators "
                                           "(an operator token, or a registry login with a role)")
    # (attack22 F2) a refused caller whose User-Agent is not UTF-8: its refusal is audited, and the
    # CSV export holding it answers (it was a 500 for every window holding such an event)
    odd = urllib.request.Request(origin.url + protocol.AUDIT.path(),
                                 headers={"Authorization": bearer(stack.node_token), "User-Agent": "probe\xff"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(odd, timeout=60)
    assert refused.value.code == 403
    # nobody, and a token nobody was given: 401
    assert call(origin, protocol.AUDIT, None)[0] == 401
    assert call(origin, protocol.AUDIT, bearer("shoal_op_" + "A" * 43))[0] == 401
    assert error_of(call(origin, protocol.AUDIT, bearer(ci + "x"))[1]) == ("UNAUTHORIZED",
                                                                          "unknown or revoked operator token")

    # audit-only: audits, seeds nothing, lists nothing
    assert call(origin, protocol.AUDIT, bearer(auditor))[0] == 200
    status, doc = call(origin, protocol.PRESEED, bearer(auditor), preseed_body(f"{host}/team/small:v1"))
    assert (status, error_of(doc)[1]) == (403, "operator 'token:auditor' does not hold the seed role")
    assert call(origin, protocol.SEEDED, bearer(auditor))[0] == 403
    # seed-only: cannot audit, nor list what is seeded
    assert call(origin, protocol.AUDIT, bearer(ci))[0] == 403
    assert call(origin, protocol.SEEDED, bearer(ci))[0] == 403

    # globs: one image outside them refuses the whole request, and nothing is fetched
    status, doc = call(origin, protocol.PRESEED, bearer(ci),
                       preseed_body(f"{host}/team/small:v1", f"{host}/private/multi:v1"))
    assert status == 403
    assert error_of(doc)[1] == (f"{host}/private/multi:v1: not among the repositories operator 'token:ci' "
                                "may pre-seed")
    assert origin.metric(REGISTRY_BYTES) == 0 and api.seeded(origin.url, admin) == set()
    job = api.preseed(origin.url, ci, f"{host}/team/small:v1")
    assert wait_job(origin, ci, job.id).state == "done"
    assert api.seeded(origin.url, admin) == set(small.blobs)

    # a seed operator sees its own jobs; another's reads as no such job; an admin sees all
    assert call(origin, protocol.PRESEED_JOB, bearer(other), job=job.id)[0] == 404
    assert call(origin, protocol.PRESEED_JOB, bearer(auditor), job=job.id)[0] == 403
    assert api.preseed_job(origin.url, admin, job.id).state == "done"
    # an admin seeds anything
    admin_job = api.preseed(origin.url, admin, f"{host}/private/multi:v1")
    assert wait_job(origin, admin, admin_job.id).state == "done"
    assert api.seeded(origin.url, admin) == set(small.blobs) | set(multi.blobs)

    # every action is an audit event under its principal, refusals included
    wait_for(lambda: len(operator_events(origin, admin, principal="token:ci")) >= 5, what="ci's events")
    events = operator_events(origin, admin, principal="token:ci")
    assert all(e["node"] == "origin" for e in events)
    assert all(e["authz_method"] == ("origin" if e["action"] == "preseed-finished" else "operator-token")
               for e in events)
    assert [(e["action"], e["outcome"], e["status"]) for e in events] == [
        ("refused", "refused", 403), ("refused", "refused", 403), ("preseed", "refused", 403),
        ("preseed", "accepted", 202), ("preseed-finished", "done", 200)]
    assert json.loads(events[3]["detail"]) == {"images": [f"{host}/team/small:v1"], "platforms": [], "job": job.id}
    assert "private/multi" in json.loads(events[2]["detail"])["images"][1]
    audits = operator_events(origin, admin, principal="token:auditor")
    assert [e["action"] for e in audits][:1] == ["audit"]
    assert {e["principal"] for e in operator_events(origin, admin, principal="node-token")} == {"node-token"}
    assert len(operator_events(origin, admin, principal="node-token")) == 5
    csv_export = urllib.request.Request(origin.url + protocol.AUDIT.path() + "?principal=node-token&format=csv",
                                        headers={"Authorization": bearer(admin)})
    with urllib.request.urlopen(csv_export, timeout=60) as resp:
        rows = list(csv.DictReader(io.StringIO(resp.read().decode("utf-8"))))
    assert "probe\ufffd" in {row["user_agent"] for row in rows} and len(rows) == 5

    # removed: refused from the origin's next look at the file
    done = subprocess.run([sys.executable, "-m", "shoal_origin", "remove-operator", "ci", "--operators",
                           str(stack.keys["operators"])], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: call(origin, protocol.PRESEED_JOB, bearer(ci), job=job.id)[0] == 401, timeout=10,
             what="the removed token refused")
    assert call(origin, protocol.PRESEED_JOB, bearer(other), job=job.id)[0] == 404  # the others still work

    assert stack.tracker is not None
    assert_no_secrets([origin, stack.tracker], [admin, auditor, ci, other, stack.node_token])


def test_operator_file_errors_are_one_line(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "operators.json"
    bad.write_text('{"operators": [{"name": "x"}]}')
    stack.start_tracker()
    assert stack.tracker is not None
    cfg = stack.cluster.origin(listen="127.0.0.1:1", data_dir=tmp_path / "o", torrent_listen="127.0.0.1:0",
                               operators={"tokens": {"file": str(bad)}})
    origin = Component("origin", tmp_path, cfg)
    origin.config_path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "shoal_origin", "--config", str(origin.config_path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"shoal-origin: config error: operators.tokens.file: cannot use {str(bad)!r}: operators[0].sha256: "
        "expected 64 lowercase hex digits")


def test_registry_logins_with_htpasswd_and_the_cli(stack: Stack, registry: Registry, images: Images,
                                                   tmp_path: Path) -> None:
    small = images.get("team/small", layers=[MIB + 7, 60_000], seed=41)
    host = registry.host
    stack.start_tracker()
    origin = stack.start_origin(operators={"registry": {"upstream": host, "roles": {"alice": ["seed", "audit"]}},
                                           "cache_ttl": "2s"})
    image = f"{host}/team/small:v1"
    # a wrong password, and a valid login without a role: the same answer (the origin tells
    # nobody whether a password is right)
    status, doc = call(origin, protocol.AUDIT, basic("alice", "wrong"))
    assert (status, error_of(doc)) == (401, ("UNAUTHORIZED", NOT_AN_OPERATOR))
    status, doc = call(origin, protocol.AUDIT, basic("node", USERS["node"]))
    assert (status, error_of(doc)) == (401, ("UNAUTHORIZED", NOT_AN_OPERATOR))
    assert call(origin, protocol.AUDIT, bearer("not-a-registry-token"))[0] == 401

    # the CLI: --user with the password, with --password-stdin, then an auth file
    seeded = shoal_cli("seed", "--origin", origin.url, "--user", f"alice:{USERS['alice']}", image)
    assert seeded.returncode == 0, seeded.stderr
    assert f"done: {len(small.blobs)} blobs" in seeded.stdout
    audited = shoal_cli("audit", "--origin", origin.url, "--user", "alice", "--password-stdin", "--principal",
                        "alice", "--format", "jsonl", stdin=USERS["alice"] + "\n")
    assert audited.returncode == 0, audited.stderr
    actions = [(e["action"], e["outcome"], e["authz_method"]) for e in map(json.loads, audited.stdout.splitlines())]
    assert ("preseed", "accepted", "operator-registry") in actions and ("audit", "complete",
                                                                         "operator-registry") in actions
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"alice:{USERS['alice']}".encode())
                                                     .decode()}}}))
    by_file = shoal_cli("audit", "--origin", origin.url, "--authfile", str(authfile), "--principal", "alice")
    assert by_file.returncode == 0, by_file.stderr
    assert by_file.stdout.splitlines()[0].split()[:3] == ["TS", "NODE", "PRINCIPAL"]
    # found without the flag, where podman keeps it
    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    authfile.rename(runtime / "containers" / "auth.json")
    searched = shoal_cli("seed", "--origin", origin.url, image, env={"XDG_RUNTIME_DIR": str(runtime),
                                                                     "HOME": str(tmp_path)})
    assert searched.returncode == 0, searched.stderr

    # the node token is no operator credential, and the CLI says so in one line
    refused = shoal_cli("audit", "--origin", origin.url, "--token-file", str(stack.keys["node_token"]))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"shoal: --token-file: {str(stack.keys['node_token'])!r} does not hold a shoal operator token "
        "(shoal_op_...; shoal-origin add-operator issues them)"]
    wrong = shoal_cli("audit", "--origin", origin.url, "--user", "alice:wrong")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == f"shoal audit: the origin refused: HTTP 401: {NOT_AN_OPERATOR}"
    assert stack.tracker is not None
    assert_no_secrets([origin, stack.tracker], [USERS["alice"], basic("alice", USERS["alice"]).split()[1],
                                                 stack.operator_token])


# ----- a registry with a token server: per-repository access ------------------------------------

# (the seeder's password is the one conftest's `tstack` gives the origin)
TOKEN_USERS = {"alice": "alice-op-1", "bob": "bob-op-2", "carol": "carol-op-3", "pusher": "pusher-op-4",
               "seeder": WORLD_USERS["seeder"]}


@dataclass
class TokenWorld:
    tokens: TokenServer
    registry: Registry
    private: Image


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenWorld]:
    root = tmp_path_factory.mktemp("operators")
    ts = TokenServer(root / "ts", service="shoal-operators", users=TOKEN_USERS, acl={
        "pusher": {"private/app": {"pull", "push"}},
        "seeder": {"private/app": {"pull"}},
        "alice": {"private/app": {"pull"}},
        "carol": {"private/app": {"pull"}},
    })
    reg = Registry(root / "registry", users={}, auth_yaml=ts.registry_auth_yaml())
    reg.start()
    private = build_image(root / "private", tag="v1", layer_sizes=[2 * MIB, 300_000], seed=51)
    push(private, registry=reg.host, repo="private/app", user="pusher", password=TOKEN_USERS["pusher"])
    yield TokenWorld(ts, reg, private)
    reg.close()
    ts.close()


def test_registry_operators_seed_only_what_they_may_pull(tstack: Stack, world: TokenWorld) -> None:
    host, ts = world.registry.host, world.tokens
    tstack.start_tracker()
    origin = tstack.start_origin(operators={
        "registry": {"upstream": host, "roles": {"alice": ["seed"], "bob": ["seed"]}}, "cache_ttl": "2s"})
    image = f"{host}/private/app:v1"
    before = len(world.registry.settle())

    # bob may not pull private/app: refused, naming the image, and the origin fetched nothing;
    # an image that does not exist reads the same
    status, doc = call(origin, protocol.PRESEED, basic("bob", TOKEN_USERS["bob"]), preseed_body(image))
    assert (status, error_of(doc)) == (403, ("DENIED", f"{image}: the registry does not let 'bob' pull it"))
    status, doc = call(origin, protocol.PRESEED, basic("bob", TOKEN_USERS["bob"]),
                       preseed_body(f"{host}/private/nosuch:v1"))
    assert (status, error_of(doc)) == (403, ("DENIED", f"{host}/private/nosuch:v1: the registry does not let 'bob' "
                                                       "pull it"))
    assert origin.metric(REGISTRY_BYTES) == 0
    assert [p for p in world.registry.settle()[before:] if p.actor == "seeder"] == []

    # carol may pull it, but holds no role
    status, doc = call(origin, protocol.PRESEED, basic("carol", TOKEN_USERS["carol"]), preseed_body(image))
    assert (status, error_of(doc)) == (401, ("UNAUTHORIZED", NOT_AN_OPERATOR))

    # alice may: with her login (Basic), and with a token from the token server (Bearer)
    status, doc = call(origin, protocol.PRESEED, basic("alice", TOKEN_USERS["alice"]), preseed_body(image))
    assert status == 202, doc
    assert wait_job(origin, basic("alice", TOKEN_USERS["alice"]), doc["id"]).state == "done"
    assert api.seeded(origin.url, tstack.operator_token) == set(world.private.blobs)
    token = ts.token("alice", ["repository:private/app:pull"])
    status, doc = call(origin, protocol.PRESEED, bearer(token), preseed_body(image))
    assert status == 202, doc
    job = doc["id"]
    # her job is hers whichever way she signed in (the principal is the registry's user)
    assert call(origin, protocol.PRESEED_JOB, basic("alice", TOKEN_USERS["alice"]), job=job)[0] == 200
    # a token without pull access to the image: refused like bob
    narrow = ts.token("alice", [])
    status, doc = call(origin, protocol.PRESEED, bearer(narrow), preseed_body(image))
    assert (status, error_of(doc)[1]) == (403, f"{image}: the registry does not let 'alice' pull it")
    # an anonymous token proves nobody
    assert call(origin, protocol.PRESEED, bearer(ts.token("", [])), preseed_body(image))[0] == 401

    events = operator_events(origin, tstack.operator_token)
    seen = {(e["principal"], e["action"], e["outcome"], e["authz_method"]) for e in events}
    assert {("bob", "preseed", "refused", "operator-registry"), ("alice", "preseed", "accepted", "operator-registry"),
            ("carol", "refused", "refused", "operator-registry")} <= seen

    # revoked at the token server: refused within the cache TTL (2 s)
    del ts.users["alice"]
    wait_for(lambda: call(origin, protocol.PRESEED_JOB, basic("alice", TOKEN_USERS["alice"]), job=job)[0] == 401,
             timeout=2 + 3, what="alice's login refused")
    ts.users["alice"] = TOKEN_USERS["alice"]

    assert tstack.tracker is not None
    logs_secrets = [*TOKEN_USERS.values(), token, narrow, tstack.operator_token]
    assert_no_secrets([origin, tstack.tracker], logs_secrets)


def test_a_registry_that_checks_nobody_vouches_for_nobody(tmp_path: Path) -> None:
    """A registry that answers anonymous callers would "accept" any credential: a forged token's
    `sub` would become an admin. The origin refuses registry logins there."""
    open_registry = Registry(tmp_path / "open", users={})  # no auth at all
    open_registry.start()
    stack = Stack(tmp_path / "stack", open_registry, node_user=("node", "x"), seeder_user=("seeder", "x"))
    try:
        stack.start_tracker()
        origin = stack.start_origin(operators={"registry": {"upstream": open_registry.host,
                                                            "roles": {"alice": ["admin"]}}})
        claims = base64.urlsafe_b64encode(json.dumps({"sub": "alice"}).encode()).decode().rstrip("=")
        for forged in (bearer(f"eyJhbGciOiJub25lIn0.{claims}.x"), basic("alice", "anything")):
            status, doc = call(origin, protocol.SEEDED, forged)
            assert (status, error_of(doc)) == (503, ("UNAVAILABLE", "the operators' registry answers without "
                                                                    "credentials, so it cannot vouch for an operator"))
        assert call(origin, protocol.SEEDED, bearer(stack.operator_token))[0] == 200  # tokens still work
        assert "answers GET /v2/ without credentials; registry logins are refused" in origin.log()
    finally:
        stack.close()
        open_registry.close()
