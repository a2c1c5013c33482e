"""Tracker throughput: shoal's tracker against Debian's opentracker, same wrk load (an announce
script varying peer id and port), same concurrency, on loopback."""

from __future__ import annotations

import hashlib
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench import services
from bench.loadgen import WrkResult, wrk
from shoal import metainfo, peercerts, protocol, signing
from shoal.cluster import Cluster, command, make_keys, source_path
from shoal.oci import Digest
from tests.support.procs import free_port

LUA = """
counter = 0
request = function()
  counter = counter + 1
  local peer = string.format("-LD0001-%%012d", counter %% 5000)
  local port = 20000 + (counter %% 5000)
  local left = (counter %% 5 == 0) and 0 or 1000
  local path = "%s?info_hash=%s&peer_id=" .. peer .. "&port=" .. port ..
               "&uploaded=0&downloaded=0&left=" .. left .. "&compact=1&numwant=50&token=%s"
  return wrk.format("GET", path)
end
"""


def register_and_script(work: Path, ports: list[int], keys: dict[str, Path], key: Ed25519PrivateKey, raw: bytes,
                        token: str) -> Path:
    """Wait for the trackers on `ports`, register the torrent at the first, and write the wrk
    announce script for it."""
    for port in ports:
        for _ in range(300):
            if services.http_ok(protocol.READYZ.url(f"http://127.0.0.1:{port}")):
                break
            time.sleep(0.1)
    meta = metainfo.parse(raw)
    url = protocol.REGISTER_METAINFO.url(f"http://127.0.0.1:{ports[0]}", digest=str(meta.digest))
    req = urllib.request.Request(url, data=raw, method="PUT",  # noqa: S310 (http, built here)
                                 headers={"Authorization": f"Bearer {keys['registration_token'].read_text()}",
                                          protocol.SIGNATURE_HEADER: signing.sign_metainfo(key, raw)})
    urllib.request.urlopen(req, timeout=10).close()  # noqa: S310
    script = work / "announce.lua"
    script.write_text(LUA % (protocol.ANNOUNCE.path(), quote_from_bytes(meta.tracker_hash), token))
    return script


@dataclass
class TrackerResult:
    connections: int
    shoal: WrkResult
    opentracker: WrkResult


def run(work: Path, *, seconds: int, connections: int = 32) -> TrackerResult:
    work.mkdir(parents=True, exist_ok=True)
    keys = make_keys(work / "keys")
    data = b"tracker bench" * 1000
    digest = Digest(hashlib.sha256(data).hexdigest())
    blob = work / digest.hex
    blob.write_bytes(data)
    port, ot_port = free_port(), free_port()
    key = signing.load_private_key(str(keys["signing_key"]), "signing_key")
    raw = metainfo.create(blob, digest, announce=protocol.ANNOUNCE.url(f"http://127.0.0.1:{port}"),
                          root_cert=peercerts.ca_certificate(key))
    meta = metainfo.parse(raw)
    token = signing.issue_token(key, "bench", 3600, meta.digest.hex)
    config = work / "tracker.yaml"
    cluster = Cluster(keys, [], tracker_url=f"http://127.0.0.1:{port}", origin_url="", log={"level": "warning"})
    # the load generator announces thousands of peers from one address, as for opentracker
    config.write_text(yaml.safe_dump(cluster.tracker(listen=f"127.0.0.1:{port}", max_peers_per_address=100_000)))
    whitelist = work / "whitelist.txt"
    whitelist.write_text(meta.tracker_hash.hex() + "\n")
    logs = [open(work / f"{n}.log", "ab") for n in ("tracker", "opentracker")]  # noqa: SIM115
    shoal = subprocess.Popen(command("tracker", config), stdout=logs[0],
                             stderr=logs[0], env={"PYTHONPATH": source_path(services.ROOT)})
    ot = subprocess.Popen(["opentracker", "-i", "127.0.0.1", "-p", str(ot_port), "-P", str(ot_port),
                           "-w", str(whitelist)], stdout=logs[1], stderr=logs[1])
    try:
        script = register_and_script(work, [port], keys, key, raw, token)
        results = {}
        for name, p in (("shoal", port), ("opentracker", ot_port)):
            results[name] = wrk(f"http://127.0.0.1:{p}", threads=1, connections=connections, seconds=seconds,
                                script=script)
        return TrackerResult(connections, results["shoal"], results["opentracker"])
    finally:
        services.stop_all([shoal, ot])  # (killed after 20 s: a tracker that hangs must not stop the bench)
        for log in logs:
            log.close()
