"""A blob's first copy leaves the origin once, a piece to each node that asks, and the nodes spread
it (origin/firstcopy.py): agents on 127.0.0.x pulling at once, and the route under attack."""

from __future__ import annotations

import hashlib
import http.client
from concurrent.futures import ThreadPoolExecutor

import pytest

from shoal import peercerts, protocol
from shoal.clients import ApiError
from shoal.registry import Credentials
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.images import Blob
from tests.support.procs import Component, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

MIB = 1 << 20
BOUND = 60.0


def pull(agent: Component, repo: str, blob: Blob) -> bytes:
    host, port = agent.config["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=BOUND)
    try:
        conn.request("GET", f"/v2/{repo}/blobs/{blob.digest}")
        r = conn.getresponse()
        assert r.status == 200
        return r.read()
    finally:
        conn.close()


def test_each_piece_leaves_the_origin_once_and_the_agents_spread_it(stack: Stack, registry: Registry,
                                                                     images: Images) -> None:
    image = images.get("private/firstcopy", layers=[9 * MIB + 77], seed=53)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin()
    # seeded first: cold, the first agent would have the origin's relay of its fetch, on loopback
    # often the whole blob, and the others could take it all from that agent (origin/relay.py)
    stack.admit(blob.digest, repository="private/firstcopy")
    agents = [stack.start_agent() for _ in range(4)]
    before = registry.settle(quiet=0.5)
    with ThreadPoolExecutor(len(agents)) as pool:
        bodies = list(pool.map(lambda a: pull(a, "private/firstcopy", blob), agents))
    for body in bodies:
        assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    for a in agents:
        wait_for(lambda a=a: a.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,  # type: ignore[misc]
                 what="every agent's swarm download")
    # every piece left the origin once, each to one agent; none came from the origin's seeder
    assert origin.metric("shoal_origin_first_copy_bytes_total") == blob.size
    assert sum(a.metric("shoal_agent_first_copy_bytes_total") for a in agents) == blob.size
    assert origin.metric("shoal_origin_first_copy_failed_sends_total") == 0
    assert origin.metric("shoal_origin_first_copy_tickets_total", result="issued") >= 1
    assert sum(a.metric("shoal_agent_swarm_download_bytes_total", peer="seeder") for a in agents) == 0
    assert sum(a.metric("shoal_agent_swarm_download_bytes_total", peer="agent") for a in agents) > 0
    for a in agents:
        assert a.metric("shoal_agent_fallbacks_total") == 0
        assert a.metric("shoal_agent_swarm_stall_escapes_total") == 0
    # and the registry sent the blob once, to the origin (before the pulls)
    gets = registry.blob_gets(registry.settle(quiet=0.5)[len(before):])
    assert gets.get(blob.digest) is None


def first_copy_get(origin: Component, token: str, digest: str, ticket: str | None) -> tuple[int, dict[str, str], bytes]:
    return api.ticket_get(origin.config["listen"], protocol.FIRST_COPY.path(digest=digest), token,
                          protocol.FIRST_COPY_TICKET_HEADER, ticket, BOUND)


def test_the_first_copy_is_for_admitted_nodes_of_that_blob_only(stack: Stack, registry: Registry,
                                                                  images: Images) -> None:
    """Every way in but the one: no node token, no ticket, a made-up ticket, a ticket for another
    blob, a puller the registry refuses. The ticket's holder gets the next piece, verified
    bytes of the blob; once every piece has left, 204, and later admissions carry no ticket."""
    image = images.get("private/firstcopy", layers=[9 * MIB + 77], seed=53)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    other = min(image.blobs.values(), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin()
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()

    def admitted(node: str, digest: str, credential: str | None = node_login) -> protocol.Admission:
        key = peercerts.NodeKey.generate()
        api.grants(origin.url, stack.node_token, node, key)
        answer = api.admission(origin.url, stack.node_token, digest, node, key, stack.registry.host,
                               "private/firstcopy", credential)
        assert answer is not None
        return answer

    with pytest.raises(ApiError) as refused:
        admitted("intruder", blob.digest, Credentials(stack.node_user, "wrong").basic())
    assert refused.value.status == 403
    a = admitted("node-a", blob.digest)
    assert a.first_copy is not None
    assert first_copy_get(origin, "", blob.digest, a.first_copy)[0] == 401  # the node token first
    assert first_copy_get(origin, stack.node_token, blob.digest, None)[0] == 403
    assert first_copy_get(origin, stack.node_token, blob.digest, "made-up-" + a.first_copy[8:])[0] == 403
    assert first_copy_get(origin, stack.node_token, other.digest, a.first_copy)[0] == 403
    assert origin.metric("shoal_origin_first_copy_bytes_total") == 0  # nothing left the origin
    # the holder takes the pieces in order, each the blob's bytes at its place
    data = blob.path.read_bytes()
    b = admitted("node-b", blob.digest)
    assert b.first_copy not in (None, a.first_copy)
    assert b.first_copy is not None
    got, at = 0, 0
    tickets = (a.first_copy, b.first_copy)
    for n in range(10_000):  # (bounded: the blob has a few hundred pieces at most)
        status, headers, body = first_copy_get(origin, stack.node_token, blob.digest, tickets[n % 2])
        if status == 204:
            break
        assert status == 200
        index = int(headers[protocol.FIRST_COPY_PIECE_HEADER])
        assert index == got
        assert body == data[at:at + len(body)] and body
        got, at = got + 1, at + len(body)
    assert at == blob.size
    assert origin.metric("shoal_origin_first_copy_bytes_total") == blob.size
    # the round is over: a node admitted now is not handed a ticket (the swarm has the blob)
    assert admitted("node-c", blob.digest).first_copy is None
    wait_for(lambda: origin.metric("shoal_origin_first_copy_tickets_total", result="declined") >= 1,
             what="the declined ticket counted")


def test_pieces_a_vanished_node_took_come_from_the_seeder(stack: Stack, registry: Registry, images: Images) -> None:
    """A node that took pieces of the first copy and left before passing them on (killed, or
    hostile) leaves them nowhere in the swarm: the node that has the rest stalls on them,
    announces `stalled=1`, is handed the origin's seeder and gets them there. Nobody falls back
    to the registry."""
    image = images.get("private/firstcopy", layers=[9 * MIB + 77], seed=53)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    stack.start_tracker()
    origin = stack.start_origin()
    key = peercerts.NodeKey.generate()
    api.grants(origin.url, stack.node_token, "vanished", key)
    answer = api.admission(origin.url, stack.node_token, blob.digest, "vanished", key, stack.registry.host,
                           "private/firstcopy", Credentials(stack.node_user, stack.node_password.read_text()).basic())
    assert answer is not None and answer.first_copy is not None
    taken = 0
    for index in range(3):
        status, headers, body = first_copy_get(origin, stack.node_token, blob.digest, answer.first_copy)
        assert status == 200 and int(headers[protocol.FIRST_COPY_PIECE_HEADER]) == index
        taken += len(body)
    agent = stack.start_agent()
    body = pull(agent, "private/firstcopy", blob)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
             what="the swarm download")
    assert agent.metric("shoal_agent_first_copy_bytes_total") == blob.size - taken
    assert origin.metric("shoal_origin_first_copy_bytes_total") == blob.size
    assert agent.metric("shoal_agent_swarm_stall_escapes_total") == 1
    assert 0 < agent.metric("shoal_agent_swarm_download_bytes_total", peer="seeder") <= blob.size
    assert agent.metric("shoal_agent_fallbacks_total") == 0
