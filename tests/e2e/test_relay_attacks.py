"""Attacks on the cold-blob relay (issue 16 part 4, origin/relay.py): what a lying registry, or a
node asking again and again, can get out of it. Real processes: tracker, origin, agents, the
Debian registry, a scripted liar (tests/support/fakeregistry.py), proxies that hold traffic
at a known point (tests/support/faults.py)."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from shoal import peercerts, protocol
from shoal.registry import Credentials
from tests.e2e.conftest import Images
from tests.e2e.test_relay import ask_relay, cold_stack, relay_status
from tests.support import api
from tests.support.fakeregistry import Canned, FakeServer
from tests.support.faults import CuttableProxy
from tests.support.procs import wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack

MIB = 1 << 20
BOUND = 60.0


def _get(url: str, path: str, result: list[tuple[int, bytes]]) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=BOUND)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        try:
            body = r.read()
        except http.client.IncompleteRead as exc:  # cut when the bytes failed the digest
            body = exc.partial
        result.append((r.status, body))
    finally:
        conn.close()


def test_a_lying_registry_is_not_relayed_a_blob_the_origin_keeps_from_another(
        stack: Stack, registry: Registry, images: Images) -> None:
    """The origin keeps a blob it fetched from the real registry, but not its metainfo (it went
    down while hashing it, or its trackers changed): the blob is in its store, not seeded. A
    registry that says yes to the digest it does not hold must not be relayed those bytes (the
    origin has not vouched that it holds them: agent/provenance.py), here while the seeder's
    registration at the tracker is held (the window the relay would stream the file in)."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    data = blob.path.read_bytes()
    liar = FakeServer("127.0.0.40")
    tracker_proxy: CuttableProxy | None = None
    path = f"/v2/private/relay/blobs/{blob.digest}"
    try:
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size)
        liar.routes[("GET", path)] = Canned(200, {}, os.urandom(blob.size))
        liar.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")

        def upstreams(user: str, password: Path) -> list[dict[str, Any]]:
            return [stack.upstream(user, password), {"name": liar.host, "url": liar.url}]

        tracker = stack.start_tracker()
        host, port = tracker.config["listen"].rsplit(":", 1)
        tracker_proxy = CuttableProxy(host, int(port))
        origin = stack.start_origin(upstreams=upstreams(stack.seeder_user, stack.seeder_password),
                                    tracker=tracker_proxy.url)
        stack.admit(blob.digest, repository="private/relay")  # fetched from the real registry, seeded
        origin.stop()
        meta = Path(origin.config["data_dir"]) / "meta"
        for suffix in (".torrent", ".sig"):
            (meta / f"{hex_of(blob.digest)}{suffix}").unlink()
        origin.start()
        tracker_proxy.hold_after(0)
        agent = stack.start_agent(upstreams=upstreams(stack.node_user, stack.node_password))
        result: list[tuple[int, bytes]] = []
        pull = threading.Thread(target=_get, args=(agent.url, f"{path}?ns={liar.host}", result), daemon=True)
        pull.start()
        # the relay asked for by the agent's admission is over (whatever it sent)
        relayed = re.compile(rf"relayed \d+ of \d+ bytes of {re.escape(blob.digest)}")
        wait_for(lambda: relayed.search(origin.log()) is not None, timeout=BOUND, what="the relay to end")
        tracker_proxy.release()
        pull.join(BOUND)
        assert not pull.is_alive()
        _status, body = result[0]
        assert hashlib.sha256(body).hexdigest() != hex_of(blob.digest)
        assert data[:4096] not in body and data[-4096:] not in body
        assert agent.metric("shoal_agent_relay_bytes_total") == 0
        assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 0
    finally:
        liar.close()
        if tracker_proxy is not None:
            tracker_proxy.release()
            tracker_proxy.cut()


def hex_of(digest: str) -> str:
    return digest.removeprefix("sha256:")


class TwoFaced(FakeServer):
    """Answers the origin (by its User-Agent) from `routes`, the agents from `to_agents`."""

    def __init__(self, ip: str) -> None:
        super().__init__(ip)
        self.to_agents: dict[tuple[str, str], Canned] = {}

    def _answer(self, h: Any) -> None:
        if "shoal-origin" not in h.headers.get("User-Agent", ""):
            canned = self.to_agents.get((h.command, h.path.split("?", 1)[0]))
            if canned is not None:
                h.send_response(canned.status)
                h.send_header("Content-Length", str(canned.declared_length))
                for key, value in canned.headers.items():
                    h.send_header(key, value)
                h.end_headers()
                return
        super()._answer(h)


def test_a_relayed_file_the_swarm_does_not_take_is_not_left_in_downloads(
        stack: Stack, registry: Registry, images: Images) -> None:
    """A registry that tells the agent another size than it told the origin: the origin relays
    and seeds the blob, the agent finds the metainfo does not describe the blob it was asked for
    and falls back to the registry. The relayed file in downloads/ (outside the store's disk
    budget, and only wiped at the next start) must go with the swarm attempt."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    liar = TwoFaced("127.0.0.41")
    path = f"/v2/private/relay/blobs/{blob.digest}"
    try:
        liar.routes[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                             declared_length=blob.size)
        liar.routes[("GET", path)] = Canned(200, {}, blob.path.read_bytes())
        liar.routes[("GET", "/v2/")] = Canned(200, {"Content-Type": "application/json"}, b"{}")
        liar.to_agents[("HEAD", path)] = Canned(200, {"Docker-Content-Digest": blob.digest}, b"",
                                                declared_length=blob.size + 1000)
        upstreams = [{"name": liar.host, "url": liar.url}]
        stack.start_tracker()
        stack.start_origin(upstreams=upstreams)
        agent = stack.start_agent(upstreams=upstreams)
        result: list[tuple[int, bytes]] = []
        _get(agent.url, f"{path}?ns={liar.host}", result)
        assert result and len(result[0][1]) < blob.size + 1000  # (no complete body of the size it was told)
        wait_for(lambda: agent.metric("shoal_agent_fallbacks_total", reason="bad_metainfo") == 1,
                 what="the swarm attempt to end on the metainfo")
        wait_for(lambda: agent.metric("shoal_agent_downloads_total") == 1,
                 what="the download to end")
        downloads = Path(agent.config["data_dir"]) / "cache" / "downloads"
        assert sorted(p.name for p in downloads.iterdir()) == []
    finally:
        liar.close()


def test_a_node_gets_one_relay_of_a_blob_at_a_time(stack: Stack, registry: Registry, images: Images) -> None:
    """A node that redeems each ticket at once and asks again: one relay of the blob for it at a
    time (each one a socket, a file and up to a chunk of the origin's memory, and the blob's
    bytes again through its uplink); the next admission waits for the metainfo as before."""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, _agent = cold_stack(stack, registry)
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()
    relays: list[tuple[int, bytes]] = []
    again: list[object] = []
    try:
        proxy.hold_after(3 * MIB)
        key = peercerts.NodeKey.generate()
        api.grants(origin.url, stack.node_token, "node-a", key)
        ticket = ask_relay(stack, blob.digest, "node-a", node_login, key)
        assert isinstance(ticket, protocol.RelayTicket)
        reader = threading.Thread(target=lambda: relays.append(
            relay_status(origin, stack.node_token, blob.digest, ticket.ticket)), daemon=True)
        reader.start()
        wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 1, what="the relay to start")
        asking = threading.Thread(target=lambda: again.append(
            ask_relay(stack, blob.digest, "node-a", node_login, key)), daemon=True)
        asking.start()
        wait_for(lambda: bool(again) or origin.metric("shoal_origin_relay_tickets_total", result="declined") == 1,
                 timeout=BOUND, what="the second admission to be answered or declined a ticket")
        assert not any(isinstance(a, protocol.RelayTicket) for a in again)
        # ... and no other node either: one relay per blob (origin/relay.py MAX_TICKETS_PER_BLOB)
        other = threading.Thread(target=lambda: again.append(ask_relay(stack, blob.digest, "node-b", node_login)),
                                 daemon=True)
        other.start()
        wait_for(lambda: origin.metric("shoal_origin_relay_tickets_total", result="declined") == 2,
                 timeout=BOUND, what="node-b declined a ticket")
        proxy.release()
        other.join(BOUND)
        asking.join(BOUND)
        reader.join(BOUND)
        assert not asking.is_alive() and not reader.is_alive()
        assert len(again) == 2 and all(isinstance(a, protocol.Admission) for a in again)  # once seeded
        assert relays[0][0] == 200
    finally:
        proxy.release()
        proxy.cut()


def _established(local_port: int, remote_port: int) -> bool:
    """Whether this host has an established TCP connection from `local_port` to `remote_port`."""
    want = (f":{local_port:04X}", f":{remote_port:04X}")
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want[0]) and fields[2].endswith(want[1]) and fields[3] == "01":
                return True
    return False


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_a_node_that_stops_reading_a_relay_is_dropped(stack: Stack, registry: Registry, images: Images) -> None:
    """A node that takes a relay and never reads it: once the relay's write times out the origin
    drops the connection, and what it had buffered for it. (Left open, aiohttp's end of the
    response waited for the node to drain it for as long as the node kept the connection: up to
    a chunk of the origin's memory per ticket, every WRITE_TIMEOUT, for as long as a fetch lasts,
    with the ticket's slot freed for the next one.)"""
    image = images.get("private/relay", layers=[12 * MIB + 77], seed=41)
    blob = max(image.blobs.values(), key=lambda b: b.size)
    proxy, origin, _agent = cold_stack(stack, registry)
    node_login = Credentials(stack.node_user, stack.node_password.read_text()).basic()
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        proxy.hold_after(3 * MIB)
        key = peercerts.NodeKey.generate()
        api.grants(origin.url, stack.node_token, "node-a", key)
        ticket = ask_relay(stack, blob.digest, "node-a", node_login, key)
        assert isinstance(ticket, protocol.RelayTicket)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (it reads nothing anyway)
        host, port = origin.config["listen"].rsplit(":", 1)
        conn.connect((host, int(port)))
        conn.sendall((f"GET {protocol.RELAY.path(digest=blob.digest)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Authorization: Bearer {stack.node_token}\r\n"
                      f"{protocol.RELAY_TICKET_HEADER}: {ticket.ticket}\r\n\r\n").encode())
        wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 1, what="the relay to start")
        # relay.WRITE_TIMEOUT (30 s), or the held fetch's own read timeout, ends the relay
        wait_for(lambda: origin.metric("shoal_origin_relay_streams") == 0, timeout=BOUND, what="the relay to end")
        client_port = conn.getsockname()[1]
        wait_for(lambda: not _established(int(port), client_port), timeout=15,
                 what="the origin to drop the connection of a node that stopped reading")
    finally:
        conn.close()
        proxy.release()
        proxy.cut()
