"""A cold blob's first bytes do not wait for the origin to fetch, hash and seed it (issue 16 part
4): the origin answers the admission at once with a relay ticket and relays its fetch's bytes;
the agent hands them to its client as they come and joins the swarm once the blob is seeded,
libtorrent keeping the relayed pieces that match the signed metainfo. The registry still sends
the blob once. Made deterministic with a proxy in front of the origin's registry that holds
the origin's fetch in the middle: the client's first bytes arrive while the origin has half
the blob."""

from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import struct
import threading
from typing import Any

import pytest

from shoal import metainfo, peercerts, protocol
from shoal.clients import ApiError, OriginClient
from shoal.oci import Digest
from shoal.registry import Credentials
from tests.e2e.conftest import Images
from tests.support import api
from tests.support.faults import CuttableProxy
from tests.support.images import Blob
from tests.support.procs import Component, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

MIB = 1 << 20
BOUND = 60.0


class Pull(threading.Thread):
    """A client's GET of a blob through the agent: the first 64 KiB, then (once `go_on`) the rest."""

    def __init__(self, agent: Component, repo: str, blob: Blob) -> None:
        super().__init__(daemon=True)
        self.agent, self.repo, self.blob = agent, repo, blob
        self.first = threading.Event()
        self.go_on = threading.Event()
        self.status = 0
        self.body = b""

    def run(self) -> None:
        host, port = self.agent.config["listen"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=BOUND)
        try:
            conn.request("GET", f"/v2/{self.repo}/blobs/{self.blob.digest}")
            r = conn.getresponse()
            self.status = r.status
            head = r.read(64 << 10)
            self.body = head
            self.first.set()
            if self.go_on.wait(BOUND):
                self.body += r.read()
        finally:
            self.first.set()
            conn.close()


def cold_stack(stack: Stack, registry: Registry) -> tuple[CuttableProxy, Component, Component]:
    """Tracker, an origin that reaches the registry through a proxy, one agent."""
    proxy = CuttableProxy(registry.host.rsplit(":", 1)[0], int(registry.host.rsplit(":", 1)[1]))
    stack.start_tracker()
    origin = stack.start_origin(upstreams=[{**stack.upstream(stack.seeder_user, stack.seeder_password),
                                            "url": proxy.url}])
    agent = stack.start_agent()
    return proxy, origin, agent


def test_a_cold_blob_flows_before_the_origin_has_it(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, agent = cold_stack(stack, registry)
    before = registry.settle(quiet=0.5)
    pull = Pull(agent, "private/relay", blob)
    try:
        # the origin's admission check and size lookup, then 3 MiB of the blob, and no more
        proxy.hold_after(3 * MIB)
        pull.start()
        assert pull.first.wait(BOUND), "no first byte while the origin's fetch is held"
        assert pull.status == 200
        assert blob.path.read_bytes().startswith(pull.body)  # (the first 64 KiB, as the registry has them)
        # ... while the origin has at most 3 MiB of the 12: the bytes came through the relay
        assert proxy.held()
        assert origin.metric("shoal_origin_seed_requests_total", result="fetched") == 0
        assert origin.metric("shoal_origin_relay_streams") == 1
        assert agent.metric("shoal_agent_relay_bytes_total") > 0
    finally:
        proxy.release()
        pull.go_on.set()
    pull.join(BOUND)
    assert not pull.is_alive()
    assert "sha256:" + hashlib.sha256(pull.body).hexdigest() == blob.digest
    # the agent joined the swarm when the blob was seeded, and caches and seeds it
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
             what="the swarm download to complete")
    wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 0, what="the relay to end")
    relayed = agent.metric("shoal_agent_relay_bytes_total")
    assert 0 < relayed <= blob.size
    assert origin.metric("shoal_origin_relay_bytes_total") >= relayed
    # the relay brought the whole blob (the fetch was held, the link is loopback): none of it was
    # sent again as the blob's first copy
    assert relayed == blob.size
    assert origin.metric("shoal_origin_first_copy_bytes_total") == 0
    # the registry sent the blob once: to the origin
    pulls = registry.settle(quiet=0.5)
    assert registry.blob_gets(pulls[len(before):]).get(blob.digest) == 1
    proxy.cut()


def relay_status(origin: Component, token: str, digest: str, ticket: str | None) -> tuple[int, bytes]:
    status, _, body = api.ticket_get(origin.config["listen"], protocol.RELAY.path(digest=digest), token,
                                     protocol.RELAY_TICKET_HEADER, ticket, BOUND)
    return status, body


def ask_relay(stack: Stack, digest: str, node: str, credential: str | None,
              key: peercerts.NodeKey | None = None) -> Any:
    """Node `node`'s admission asked with `relay` (a RelayTicket while the origin is to fetch):
    enrolled now with a fresh key, or already with `key`."""
    assert stack.origin is not None
    if key is None:
        key = peercerts.NodeKey.generate()
        api.grants(stack.origin.url, stack.node_token, node, key)
    request = protocol.AdmissionRequest(node, stack.registry.host, "private/relay", relay=True)
    origin_url = stack.origin.url
    return api.run(lambda http: OriginClient(http, origin_url, stack.node_token).admission(
        Digest.parse(digest), request, credential, key.private_key, within=BOUND))


def test_the_relay_is_only_for_the_node_the_ticket_was_given_to(stack: Stack, registry: Registry,
                                                                images: Images) -> None:
    """Every way in but the one: no node token, no ticket, a made-up ticket, a ticket for
    another blob (which uses it up), and a ticket only for a puller the registry admitted."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    other = min(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, _agent = cold_stack(stack, registry)
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()
    try:
        proxy.hold_after(3 * MIB)
        # a puller the registry refuses gets no ticket (nor a fetch)
        wrong = base64.b64encode(f"{stack.node_user}:wrong".encode()).decode()
        with pytest.raises(ApiError) as refused:
            ask_relay(stack, blob.digest, "intruder", f"Basic {wrong}")
        assert refused.value.status == 403
        ticket = ask_relay(stack, blob.digest, "node-a", node_login)
        assert isinstance(ticket, protocol.RelayTicket)
        assert relay_status(origin, "", blob.digest, ticket.ticket)[0] == 401  # the node token first
        assert relay_status(origin, stack.node_token, blob.digest, None)[0] == 403
        assert relay_status(origin, stack.node_token, blob.digest, "made-up-" + ticket.ticket[8:])[0] == 403
        # a ticket is for its blob only, and good once
        assert relay_status(origin, stack.node_token, other.digest, ticket.ticket)[0] == 403
        assert relay_status(origin, stack.node_token, blob.digest, ticket.ticket)[0] == 403
        # a fresh one streams what the origin has of the blob, to the end once it is seeded
        fresh = ask_relay(stack, blob.digest, "node-b", node_login)
        assert isinstance(fresh, protocol.RelayTicket)
        result: list[tuple[int, bytes]] = []
        reader = threading.Thread(target=lambda: result.append(
            relay_status(origin, stack.node_token, blob.digest, fresh.ticket)), daemon=True)
        reader.start()
        wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 1, what="the relay to start")
        proxy.release()
        reader.join(BOUND)
        assert not reader.is_alive()
        status, body = result[0]
        assert status == 200
        assert 0 < len(body) <= blob.size and blob.path.read_bytes().startswith(body)
    finally:
        proxy.release()
        proxy.cut()
    # once the blob is seeded there is nothing to relay: the admission comes with the metainfo
    wait_for(lambda: origin.metric("shoal_origin_seed_requests_total", result="fetched") >= 1,
             what="the blob seeded")
    answer = ask_relay(stack, blob.digest, "node-c", node_login)
    assert isinstance(answer, protocol.Admission)


def test_a_node_that_resets_the_relay_mid_write_leaves_no_error(stack: Stack, registry: Registry,
                                                                 images: Images) -> None:
    """A node stops reading the relay (its swarm delivered) and its connection is reset while the
    origin waits for room to write: aiohttp then raises a plain ConnectionError("Connection
    lost"), which once escaped the relay handler as an ERROR and a traceback in the origin's log
    (seen in test_ops's `shoal up` run). It is a node hanging up, like any other."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, _agent = cold_stack(stack, registry)
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()
    try:
        proxy.hold_after(3 * MIB)
        ticket = ask_relay(stack, blob.digest, "node-a", node_login)
        assert isinstance(ticket, protocol.RelayTicket)
        host, port = origin.config["listen"].rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # a small window that this client never reads from: the origin's writes fill its send
            # buffer and wait there, 12 MiB being far more than both buffers hold
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(BOUND)
            sock.connect((host, int(port)))
            sock.sendall((f"GET {protocol.RELAY.path(digest=blob.digest)} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Bearer {stack.node_token}\r\n"
                          f"{protocol.RELAY_TICKET_HEADER}: {ticket.ticket}\r\n\r\n").encode())
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
            wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 1, what="the relay to start")
            proxy.release()
            # the whole blob at the origin: the relay has more than the buffers take, so it waits
            wait_for(lambda: origin.metric("shoal_origin_seed_requests_total", result="fetched") >= 1,
                     what="the blob seeded")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, not a FIN
        wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 0, what="the relay to end")
    finally:
        proxy.release()
        proxy.cut()
    log = origin.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]


def test_pieces_a_relay_brought_are_not_sent_again_as_the_first_copy(stack: Stack, registry: Registry,
                                                                     images: Images) -> None:
    """A node says in its first first-copy request how many of the blob's first pieces it has
    (those its relay brought, origin/firstcopy.py): the origin sends those to no one again, but
    skips no further than its relay to that node went, whatever the node says."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, _agent = cold_stack(stack, registry)
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()
    keys = {n: peercerts.NodeKey.generate() for n in ("node-a", "node-b")}
    for n, key in keys.items():
        api.grants(origin.url, stack.node_token, n, key)
    try:
        proxy.hold_after(3 * MIB)
        ticket = ask_relay(stack, blob.digest, "node-a", node_login, keys["node-a"])
        assert isinstance(ticket, protocol.RelayTicket)
        # node-a reads 2 MiB of the relay and hangs up (the origin has at most 3 MiB to send)
        status, _, head = api.ticket_get(origin.config["listen"], protocol.RELAY.path(digest=blob.digest),
                                         stack.node_token, protocol.RELAY_TICKET_HEADER, ticket.ticket,
                                         BOUND, limit=2 * MIB)
        assert status == 200 and head == blob.path.read_bytes()[:2 * MIB]
    finally:
        proxy.release()
    wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 0, what="the relay to end")
    admitted = {n: api.admission(origin.url, stack.node_token, blob.digest, n, key, stack.registry.host,
                                 "private/relay", node_login) for n, key in keys.items()}
    tickets = {n: a.first_copy for n, a in admitted.items() if a is not None and a.first_copy is not None}
    assert tickets.keys() == keys.keys()
    meta = metainfo.parse(next(a for a in admitted.values() if a is not None).metainfo)

    def first_copy(node: str, have: int) -> int:
        status, headers, body = api.ticket_get(
            origin.config["listen"], protocol.FIRST_COPY.path(digest=blob.digest), stack.node_token,
            protocol.FIRST_COPY_TICKET_HEADER, tickets[node], BOUND,
            extra={protocol.FIRST_COPY_HAVE_HEADER: str(have)})
        assert status == 200
        index = int(headers[protocol.FIRST_COPY_PIECE_HEADER])
        assert body == blob.path.read_bytes()[index * meta.piece_length:][:meta.piece_length]
        return index

    for bad in ("-1", "x", "1" * 11):  # a count of pieces, or a 400 (and no piece taken)
        status, _, body = api.ticket_get(origin.config["listen"], protocol.FIRST_COPY.path(digest=blob.digest),
                                         stack.node_token, protocol.FIRST_COPY_TICKET_HEADER, tickets["node-b"],
                                         BOUND, extra={protocol.FIRST_COPY_HAVE_HEADER: bad})
        assert status == 400 and protocol.FIRST_COPY_HAVE_HEADER.encode() in body
    # the round starts after the whole pieces the relay sent node-a: about the 2-3 MiB the origin
    # had written to its socket (a chunk more once the fetch went on), of 12
    deferred = first_copy("node-b", meta.num_pieces)
    assert 2 * MIB // meta.piece_length <= deferred <= 4 * MIB // meta.piece_length < meta.num_pieces
    # node-b had no relay: its claim to every piece skips nothing
    assert origin.metric("shoal_origin_first_copy_skipped_bytes_total") == 0
    # node-a's claim to every piece skips the pieces its relay sent, no more, once
    assert first_copy("node-a", meta.num_pieces) == deferred + 1
    assert origin.metric("shoal_origin_first_copy_skipped_bytes_total") == deferred * meta.piece_length
    assert first_copy("node-a", meta.num_pieces) == deferred + 2
    proxy.cut()
