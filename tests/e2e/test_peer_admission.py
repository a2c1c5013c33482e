"""Only nodes the origin admitted to a blob exchange its pieces (issue 12, part 1; issue 13): an
outsider that knows a private blob's info-hash dials the origin seeder and an agent seeding the
blob, with no certificate, a self-signed one, an expired one from the cluster's CA, one from
another cluster's CA, one the origin issued for another blob, or in clear, and gets no byte; the
same client with the certificate of its admission to this blob gets the blob."""

from __future__ import annotations

import datetime as dt
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import metainfo, signing
from shoal.config import split_hostport
from tests.e2e.conftest import Images
from tests.support.peerprobe import chained, forged, listening_ports, node_identity, probe
from tests.support.procs import Component, http_get, wait_for
from tests.support.registry import Registry
from tests.support.stack import Stack


def swarm_address(component: Component) -> tuple[str, int]:
    return split_hostport(component.config["torrent"]["listen"])


def test_outsiders_get_no_byte_from_any_seeder_and_admitted_nodes_get_the_blob(
        stack: Stack, registry: Registry, images: Images) -> None:
    blob = min(images.app().large_blobs(1 << 20), key=lambda b: b.size)  # a blob the swarm carries
    data = blob.path.read_bytes()
    stack.start_tracker()
    origin = stack.start_origin()
    agent = stack.start_agent()
    assert stack.tracker is not None
    status, body = http_get(f"{agent.url}/v2/private/app/blobs/{blob.digest}", timeout=60)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1,
             what="the agent to fetch the blob from the swarm (and seed it)")
    admission, key = stack.admit(blob.digest, node="prober")
    meta = metainfo.parse(admission.metainfo)
    other = max(images.app().large_blobs(1 << 20), key=lambda b: b.size)
    elsewhere = stack.admit(other.digest, node="prober", key=key)[0].grant.certificate
    ca = signing.load_private_key(str(stack.keys["signing_key"]), "signing_key")
    now = dt.datetime.now(dt.UTC)
    outsiders = {
        "no certificate": {"identity": None},
        "a self-signed certificate": {"identity": forged(None)},
        "an expired certificate of the cluster's CA": {
            "identity": forged(ca, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1))},
        "a certificate of another cluster's CA": {"identity": forged(Ed25519PrivateKey.generate())},
        "a plain BitTorrent connection": {"tls": False},
    }
    issued = admission.grant.certificate
    outsiders["a certificate signed by a node's key, the node's certificate as intermediate"] = {
        "identity": chained(node_identity(key, issued))}
    outsiders["the origin's certificate for the same key, admitting it to another blob"] = {
        "identity": node_identity(key, elsewhere)}
    for seeder in (origin, agent):
        address = swarm_address(seeder)
        # the TLS socket is the only way in: no plain BitTorrent listener on any port or family
        assert seeder.proc is not None
        assert listening_ports(seeder.proc.pid) == {address[1], split_hostport(seeder.config["listen"])[1]}
        for n, (who, how) in enumerate(outsiders.items()):
            got = probe(address, meta, source_ip=f"127.0.0.{60 + n}", enough=meta.size, **how)  # type: ignore[arg-type]
            assert got == b"", f"a peer with {who} got {len(got)} bytes from the {seeder.name}"
        # the same client with the certificate of its admission, or one the CA signed now: the blob
        for n, identity in enumerate((node_identity(key, issued), forged(ca))):
            got = probe(address, meta, source_ip=f"127.0.0.{70 + n}", identity=identity, enough=meta.size,
                        within=30)
            assert "sha256:" + hashlib.sha256(got).hexdigest() == blob.digest, f"{len(got)} of {len(data)} bytes"
    # every refused TLS handshake is counted where it was refused
    assert origin.metric("shoal_origin_swarm_refused_handshakes_total") >= 4
    assert agent.metric("shoal_agent_swarm_refused_handshakes_total") >= 4
