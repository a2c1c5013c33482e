"""The origin's admission checks (origin/admission.py) against a scripted registry: the registry
is asked with exactly the presented credential, its answer kept for the TTL per credential
(never shared between credentials), every refusal the same 403, a registry that cannot answer
a 503 that is not kept, questions per node bounded, and receipts good for one key and blob."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import errors, httpclient, peercerts, protocol, signing
from shoal.oci import Digest
from shoal.registry import Credentials, RegistryClient
from shoal_origin import admission
from shoal_origin.admission import Admissions
from shoal_origin.seeder import Upstream
from tests.support.fakeregistry import Canned, FakeServer

DIGEST = Digest("ab" * 32)
PATH = f"/v2/private/app/blobs/{DIGEST}"
ALICE = Credentials("alice", "alice-pw").basic()


@pytest.fixture
async def world() -> AsyncIterator[tuple[Admissions, FakeServer]]:
    fake = FakeServer("127.0.0.47")
    fake.routes[("HEAD", PATH)] = Canned(200, {"Content-Length": "10"})
    async with aiohttp.ClientSession() as http:
        client = RegistryClient(http, fake.url, credentials=Credentials("seeder", "seeder-pw"), user_agent="t",
                                retry_budget=0)
        yield Admissions(key=Ed25519PrivateKey.generate(), upstreams={fake.host: Upstream(fake.host, client)},
                         ttl=60, grant_ttl=600), fake
    await asyncio.to_thread(fake.close)


def heads(fake: FakeServer) -> list[str | None]:
    """The Authorization of every HEAD the registry got, in order."""
    return [s.headers.get("Authorization") for s in fake.seen if s.method == "HEAD"]


async def test_the_registry_is_asked_with_the_presented_credential_once_per_ttl(
        world: tuple[Admissions, FakeServer]) -> None:
    admissions, fake = world
    fake.require_basic = True  # a Basic registry: challenge first, as distribution does
    assert await admissions.check("node-a", fake.host, "private/app", DIGEST, ALICE) == "alice"
    assert heads(fake) == [None, ALICE]  # the login answers the challenge; never the seeder's
    for node in ("node-a", "node-b"):  # the same credential from any node: the kept answer
        assert await admissions.check(node, fake.host, "private/app", DIGEST, ALICE) == "alice"
    assert len(heads(fake)) == 2 and admissions.checks["cached"] == 2
    bob = Credentials("bob", "bob-pw").basic()
    fake.routes[("HEAD", PATH)] = Canned(403)
    with pytest.raises(errors.Denied):  # another credential is asked about on its own
        await admissions.check("node-a", fake.host, "private/app", DIGEST, bob)
    assert heads(fake)[-1] == bob
    token = "Bearer " + ".".join(base64.urlsafe_b64encode(p).decode().rstrip("=")
                                 for p in (b'{"alg":"none"}', b'{"sub":"carol"}', b"sig"))
    fake.routes[("HEAD", PATH)] = Canned(200, {"Content-Length": "10"})
    assert await admissions.check("node-a", fake.host, "private/app", DIGEST, token) == "carol"
    assert heads(fake)[-1] == token  # a token is sent once, as given


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_every_refusal_is_the_same_403_and_kept_for_the_ttl(world: tuple[Admissions, FakeServer],
                                                                status: int) -> None:
    admissions, fake = world
    fake.routes[("HEAD", PATH)] = Canned(status)
    for _ in range(2):
        with pytest.raises(errors.Denied) as exc:
            await admissions.check("node-a", fake.host, "private/app", DIGEST, ALICE)
        assert exc.value.oci.status == 403
        assert str(exc.value) == "the registry does not let this puller's credential pull this blob"
    assert len(heads(fake)) == 1 and admissions.checks["denied"] == 1


async def test_a_registry_that_cannot_answer_is_a_503_and_not_kept(world: tuple[Admissions, FakeServer]) -> None:
    admissions, fake = world
    fake.routes[("HEAD", PATH)] = Canned(503)
    for _ in range(2):
        with pytest.raises(errors.UpstreamError) as exc:
            await admissions.check("node-a", fake.host, "private/app", DIGEST, ALICE)
        assert exc.value.oci.status == 503
    assert len(heads(fake)) == 2  # asked again: nothing was decided
    fake.routes[("HEAD", PATH)] = Canned(200, {"Content-Length": "10"})
    assert await admissions.check("node-a", fake.host, "private/app", DIGEST, ALICE) == "alice"


async def test_no_upstream_and_unusable_credentials(world: tuple[Admissions, FakeServer]) -> None:
    admissions, fake = world
    with pytest.raises(errors.NotFound):
        await admissions.check("node-a", "elsewhere.example", "private/app", DIGEST, ALICE)
    for bad in ("Basic é", "Basic " + "A" * 9000, "Basic x\r\nX-Injected: 1"):
        with pytest.raises(errors.Unauthorized):
            await admissions.check("node-a", fake.host, "private/app", DIGEST, bad)
    assert heads(fake) == []  # none of it reached the registry


async def test_questions_to_the_registry_are_bounded_per_node(world: tuple[Admissions, FakeServer],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A node guessing passwords through the origin is cut off; kept answers cost nothing, and
    other nodes are not affected."""
    admissions, fake = world
    monkeypatch.setattr(admission, "MAX_ASKS_PER_NODE", 3)
    fake.routes[("HEAD", PATH)] = Canned(401)
    for n in range(3):
        guess = Credentials("alice", f"guess{n}").basic()
        with pytest.raises(errors.Denied):
            await admissions.check("node-a", fake.host, "private/app", DIGEST, guess)
    with pytest.raises(errors.RateLimited) as exc:
        await admissions.check("node-a", fake.host, "private/app", DIGEST, Credentials("alice", "guess3").basic())
    assert exc.value.oci.status == 429 and len(heads(fake)) == 3
    with pytest.raises(errors.Denied):  # a kept answer is still given
        await admissions.check("node-a", fake.host, "private/app", DIGEST, Credentials("alice", "guess0").basic())
    with pytest.raises(errors.Denied):  # another node asks on
        await admissions.check("node-b", fake.host, "private/app", DIGEST, Credentials("alice", "guess3").basic())
    assert admissions.checks["rate_limited"] == 1


async def test_grants_name_their_blob_and_renew_only_on_the_nodes_own_receipts(
        world: tuple[Admissions, FakeServer]) -> None:
    admissions, _ = world
    node, other = peercerts.NodeKey.generate(), peercerts.NodeKey.generate()
    granted = admissions.grant("node-a", node.public_key, DIGEST)
    ca = admissions.key.public_key()
    assert signing.verify_token(ca, granted.token).blob == DIGEST.hex
    peercerts.check_node_certificate(granted.certificate, ca, node.public_key)
    renewed = admissions.renew("node-a", node.public_key, [protocol.Receipt(str(DIGEST), granted.receipt)])
    assert [g.digest for g in renewed.grants] == [str(DIGEST)] and renewed.refused == []
    assert renewed.grants[0].token != granted.token or renewed.grants[0].certificate != granted.certificate
    stolen = admissions.renew("node-b", other.public_key, [protocol.Receipt(str(DIGEST), granted.receipt),
                                                           protocol.Receipt("sha256:nothex", granted.receipt)])
    assert stolen.grants == [] and stolen.refused == [str(DIGEST), "sha256:nothex"]


async def test_a_users_refused_logins_stop_being_tried_whichever_nodes_ask(world: tuple[Admissions, FakeServer],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Guesses at one user's password, spread over many nodes: after MAX_FAILED_LOGINS_PER_USER
    refusals a minute that user's logins get 429 without a question to the registry; another
    user's are tried as before."""
    admissions, fake = world
    monkeypatch.setattr(admission, "MAX_FAILED_LOGINS_PER_USER", 2)
    fake.routes[("HEAD", PATH)] = Canned(401)
    for n in range(2):
        with pytest.raises(errors.Denied):
            await admissions.check(f"node-{n}", fake.host, "private/app", DIGEST, Credentials("alice", f"g{n}").basic())
    with pytest.raises(errors.RateLimited):
        await admissions.check("node-9", fake.host, "private/app", DIGEST, Credentials("alice", "g9").basic())
    assert len(heads(fake)) == 2
    with pytest.raises(errors.Denied):
        await admissions.check("node-9", fake.host, "private/app", DIGEST, Credentials("bob", "g").basic())
    assert len(heads(fake)) == 3


async def test_a_cookie_set_on_one_users_question_goes_with_no_other() -> None:
    """The origin asks the registry about every node's pullers through one session (as its app
    makes it, shoal.httpclient): a session cookie the registry set while answering for alice must
    not go out with the question about bob, who would then be asked about as alice. The registry
    is named by name (aiohttp keeps no cookies of an IP address)."""
    fake = FakeServer("127.0.0.1")
    fake.routes[("HEAD", PATH)] = Canned(200, {"Content-Length": "10", "Set-Cookie": "session=alice; Path=/"})
    fake.require_basic = True
    named = f"localhost:{fake.port}"
    try:
        async with httpclient.session(limit=4, limit_per_host=4) as http:
            client = RegistryClient(http, f"http://{named}", credentials=None, user_agent="t", retry_budget=0)
            admissions = Admissions(key=Ed25519PrivateKey.generate(), upstreams={named: Upstream(named, client)},
                                    ttl=60, grant_ttl=600)
            for user in ("alice", "bob"):
                credential = Credentials(user, f"{user}-pw").basic()
                assert await admissions.check("node-a", named, "private/app", DIGEST, credential) == user
        # each login answers a challenge first
        assert [s.headers.get("Authorization") for s in fake.seen] == [None, ALICE, None,
                                                                       Credentials("bob", "bob-pw").basic()]
        assert [s.headers.get("Cookie") for s in fake.seen] == [None] * 4
    finally:
        await asyncio.to_thread(fake.close)
