"""The agent's Authorizer in process, against a scripted registry (the real one is exercised end
to end in tests/e2e/test_auth*.py): one question per (credential, repository, blob) however many
requests wait, answers reused only within the TTL and only for exactly that key, and what strict
and availability modes do when the registry cannot be asked."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from shoal import errors
from shoal.logs import fingerprint
from shoal.oci import Digest
from shoal.registry import RegistryClient
from shoal_agent.authz import CHECK_WAIT, Authorizer, Credential, Decisions, fingerprint_key
from shoal_agent.config import AuthSettings
from shoal_agent.upstreams import Upstream
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.faults import CuttableProxy

DIGEST = Digest("ab" * 32)
KEY = b"k" * 32
OTHER = Digest("cd" * 32)


def client_cred(user: str) -> Credential:
    header = "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()
    return Credential("client", header, fingerprint(header, KEY))


def heads(fake: FakeServer, digest: Digest) -> int:
    return sum(1 for s in fake.seen if s.method == "HEAD" and s.path.endswith(str(digest)))


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    for repo in ("private/app", "other/app"):
        for d in (DIGEST, OTHER):
            server.routes[("HEAD", f"/v2/{repo}/blobs/{d}")] = Canned(200, {"Content-Length": "1234"})
    yield server
    server.close()


async def make(tmp_path: Path, url: str, **settings: object) -> tuple[Authorizer, Upstream, aiohttp.ClientSession]:
    http = aiohttp.ClientSession()
    up = Upstream("reg", RegistryClient(http, url, credentials=None, user_agent="test", retry_budget=0))
    decisions = Decisions(tmp_path / "decisions")
    auth = AuthSettings(**settings)  # type: ignore[arg-type]
    await decisions.open(auth.stale_decision_max_age)
    return Authorizer(auth, decisions, KEY), up, http


async def test_one_question_per_key_and_reuse_only_within_the_ttl(tmp_path: Path, fake: FakeServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    authz, up, http = await make(tmp_path, fake.url, decision_ttl=60.0)
    alice = client_cred("alice")
    try:
        verdicts = await asyncio.gather(*(authz.blob(up, alice, "private/app", DIGEST) for _ in range(20)))
        assert heads(fake, DIGEST) == 1  # twenty requests, one question
        assert {v.method for v in verdicts} == {"registry"}
        assert all(v.decision.allowed and v.decision.size == 1234 and v.decision.principal == "alice"
                   for v in verdicts)
        again = await authz.blob(up, alice, "private/app", DIGEST)
        assert (again.method, again.registry_status, heads(fake, DIGEST)) == ("decision_cache", "cached", 1)
        # exactly this key: another credential, repository or blob is asked for itself
        await authz.blob(up, client_cred("bob"), "private/app", DIGEST)
        await authz.blob(up, alice, "other/app", DIGEST)
        await authz.blob(up, alice, "private/app", OTHER)
        assert heads(fake, DIGEST) == 3 and heads(fake, OTHER) == 1
        # past the TTL the registry is asked again
        real = __import__("time").time
        monkeypatch.setattr("shoal_agent.authz.time.time", lambda: real() + 61)
        late = await authz.blob(up, alice, "private/app", DIGEST)
        assert late.method == "registry" and heads(fake, DIGEST) == 4
    finally:
        await http.close()
        await authz.decisions.close()


async def test_refusals_are_the_registrys(tmp_path: Path, fake: FakeServer) -> None:
    fake.routes[("HEAD", f"/v2/private/app/blobs/{OTHER}")] = Canned(
        401, {"WWW-Authenticate": 'Bearer realm="https://auth.test/token"'})
    fake.routes[("HEAD", f"/v2/other/app/blobs/{OTHER}")] = Canned(403)
    authz, up, http = await make(tmp_path, fake.url)
    try:
        bob = client_cred("bob")
        unauthorized = await authz.blob(up, bob, "private/app", OTHER)
        assert unauthorized.decision.status == 401
        assert unauthorized.decision.challenge == 'Bearer realm="https://auth.test/token"'
        assert (await authz.blob(up, bob, "other/app", OTHER)).decision.status == 403
        missing = await authz.blob(up, bob, "private/app", Digest("ef" * 32))
        assert missing.decision.status == 404 and not missing.decision.allowed
    finally:
        await http.close()
        await authz.decisions.close()


@pytest.mark.parametrize("mode", ["strict", "availability"])
async def test_registry_unreachable(tmp_path: Path, fake: FakeServer, mode: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = CuttableProxy("127.0.0.1", fake.port)
    authz, up, http = await make(tmp_path, proxy.url, decision_ttl=1.0, mode=mode, stale_decision_max_age=3600.0)
    alice = client_cred("alice")
    try:
        assert (await authz.blob(up, alice, "private/app", DIGEST)).method == "registry"
        proxy.cut()  # the registry goes away (open connections too)
        real = __import__("time").time
        monkeypatch.setattr("shoal_agent.authz.time.time", lambda: real() + 10)  # past the TTL
        if mode == "strict":
            with pytest.raises(errors.UpstreamError, match="auth.mode: strict"):
                await authz.blob(up, alice, "private/app", DIGEST)
        else:
            stale = await authz.blob(up, alice, "private/app", DIGEST)
            assert (stale.method, stale.registry_status, stale.decision.allowed) == (
                "stale_decision", "unreachable", True)
        # nobody is served under someone else's earlier yes, in either mode
        with pytest.raises(errors.UpstreamError):
            await authz.blob(up, client_cred("mallory"), "private/app", DIGEST)
    finally:
        await http.close()
        await authz.decisions.close()


def test_credential_fingerprints_are_keyed(tmp_path: Path) -> None:
    """A bare SHA-256 of a Basic header next to its user name in the journal cracks offline; the
    fingerprint is an HMAC under a cluster key instead."""
    header = "Basic " + base64.b64encode(b"alice:summer2026").decode()
    bare = "fp:" + hashlib.sha256(header.encode()).hexdigest()[:16]
    cluster = fingerprint_key("node-token-1", tmp_path / "a")
    assert cluster == fingerprint_key("node-token-1", tmp_path / "b")  # every node of the cluster agrees
    assert fingerprint(header, cluster) != bare
    assert fingerprint(header, cluster) != fingerprint(header, fingerprint_key("node-token-2", tmp_path / "a"))
    (tmp_path / "alone").mkdir()
    own = fingerprint_key(None, tmp_path / "alone")  # no cluster: this node's key, kept
    assert own == fingerprint_key(None, tmp_path / "alone") and len(own) == 32
    assert (tmp_path / "alone" / "fingerprint.key").stat().st_mode & 0o077 == 0
    assert fingerprint(header, own) not in (bare, fingerprint(header, cluster))


async def test_a_registry_that_does_not_answer_delays_no_request(tmp_path: Path) -> None:
    """Whether the registry checks credentials is asked anonymously; a registry that accepts the
    connection and never answers costs a request at most CHECK_WAIT, and says "unknown"."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        authz, up, http = await make(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        try:
            async with asyncio.timeout(CHECK_WAIT + 4):
                assert await authz.checks_credentials(up) is None
        finally:
            await http.close()
    finally:
        silent.close()
