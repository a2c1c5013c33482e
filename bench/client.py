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
import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ACCEPT = ", ".join(["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])


async def pull(endpoint: str, image: str, concurrency: int, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    repo, _, tag = image.rpartition(":")
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=120)
    received = 0
    errors: list[str] = []
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{endpoint}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}) as r:
            body = await r.read()
            if r.status != 200:  # reported as such, not as the KeyError a body of errors would give
                return {"bytes": 0, "errors": [f"manifest {tag}: status {r.status}: {body[:200]!r}"]}
            manifest = json.loads(body)
        if "manifests" in manifest:
            child = manifest["manifests"][0]["digest"]
            async with http.get(f"{endpoint}/v2/{repo}/manifests/{child}", headers={"Accept": ACCEPT}) as r:
                manifest = json.loads(await r.read())
        blobs = [d for d in [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
                 if d not in skip]
        sem = asyncio.Semaphore(concurrency)

        async def fetch(digest: str) -> None:
            nonlocal received
            async with sem, http.get(f"{endpoint}/v2/{repo}/blobs/{digest}") as r:
                h = hashlib.sha256()
                async for chunk in r.content.iter_chunked(1 << 20):
                    h.update(chunk)
                    received += len(chunk)
                if r.status != 200 or "sha256:" + h.hexdigest() != digest:
                    errors.append(f"{digest}: status {r.status}, sha256:{h.hexdigest()}")

        await asyncio.gather(*(fetch(d) for d in blobs))
    return {"bytes": received, "errors": errors}


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
        result = asyncio.run(pull(args.endpoint, args.image, args.concurrency,
                                  frozenset(filter(None, args.skip.split(",")))))
    except Exception as exc:  # reported, not raised: the harness collects every host
        result = {"bytes": 0, "errors": [f"{type(exc).__name__}: {exc}"]}
    result.update(started=started, finished=time.time())
    Path(args.out).write_text(json.dumps(result))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
