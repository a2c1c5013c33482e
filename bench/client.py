"""The pull client every emulated host runs: resolve a tag, fetch the manifest and every blob with
containerd's default of 3 concurrent downloads, hash each against its digest, report timings.

    python -m bench.client --endpoint URL --image REPO:TAG --go-at EPOCH --out FILE
    python -m bench.client --endpoint URL --image REPO:TAG --go-stdin --out FILE [--skip DIGEST,...]

With `--go-stdin` the client prints "ready" once it is loaded and waits for a line on stdin that
holds the epoch to start at: a harness starting 64 clients on two cores cannot guess when the
last one will be ready. `--skip` lists blobs the host already has (a rolling update: containerd
does not fetch the layers it holds), so the client fetches only the others.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ACCEPT = ", ".join(["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])


def pull(endpoint: str, image: str, concurrency: int, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Blocking sockets in threads, not an event loop: a host's link paced by tc delivers a packet
    at a time, and an asyncio client woke its loop for each (16 of them took 0.13 of a core in
    the pull of a 16-host create at 2.5 MB/s a host, CPU the emulated nodes lacked; 0.06 in
    threads, bench/RESULTS.md section 27): a thread blocked in recv costs a few microseconds a
    packet, as containerd's Go client does."""
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or 80
    repo, _, tag = image.rpartition(":")
    v2 = f"{url.path.rstrip('/')}/v2/{repo}"

    def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    status, body = get(f"{v2}/manifests/{tag}", {"Accept": ACCEPT})
    if status != 200:  # reported as such, not as the KeyError a body of errors would give
        return {"bytes": 0, "errors": [f"manifest {tag}: status {status}: {body[:200]!r}"]}
    manifest = json.loads(body)
    if "manifests" in manifest:
        child = manifest["manifests"][0]["digest"]
        _, body = get(f"{v2}/manifests/{child}", {"Accept": ACCEPT})
        manifest = json.loads(body)
    blobs = [d for d in [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
             if d not in skip]

    def fetch(digest: str) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.request("GET", f"{v2}/blobs/{digest}")
            r = conn.getresponse()
            h = hashlib.sha256()
            received = 0
            while chunk := r.read1(1 << 20):  # what one recv brought
                h.update(chunk)
                received += len(chunk)
            ok = r.status == 200 and "sha256:" + h.hexdigest() == digest
            return received, None if ok else f"{digest}: status {r.status}, sha256:{h.hexdigest()}"
        except (OSError, http.client.HTTPException) as exc:
            return 0, f"{digest}: {type(exc).__name__}: {exc}"
        finally:
            conn.close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(fetch, blobs))
    return {"bytes": sum(n for n, _ in results), "errors": [e for _, e in results if e is not None]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--image", required=True)
    go = parser.add_mutually_exclusive_group(required=True)
    go.add_argument("--go-at", type=float)
    go.add_argument("--go-stdin", action="store_true")
    parser.add_argument("--skip", default="", help="comma-separated digests the host already has")
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=3)
    args = parser.parse_args()
    go_at = args.go_at
    if args.go_stdin:
        print("ready", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 2  # the harness went away
        go_at = float(line)
    time.sleep(max(0.0, go_at - time.time()))
    started = time.time()
    try:
        result = pull(args.endpoint, args.image, args.concurrency, frozenset(filter(None, args.skip.split(","))))
    except Exception as exc:  # reported, not raised: the harness collects every host
        result = {"bytes": 0, "errors": [f"{type(exc).__name__}: {exc}"]}
    result.update(started=started, finished=time.time())
    Path(args.out).write_text(json.dumps(result))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
