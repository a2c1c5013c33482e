"""The pull client every emulated host runs: resolve a tag, fetch the manifest and every blob with
containerd's default of 3 concurrent downloads, hash each against its digest, report timings.

    python -m bench.client --endpoint URL --image REPO:TAG --go-at EPOCH --out FILE
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


async def pull(endpoint: str, image: str, concurrency: int) -> dict[str, Any]:
    repo, _, tag = image.rpartition(":")
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=120)
    received = 0
    errors: list[str] = []
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{endpoint}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}) as r:
            manifest = json.loads(await r.read())
        if "manifests" in manifest:
            child = manifest["manifests"][0]["digest"]
            async with http.get(f"{endpoint}/v2/{repo}/manifests/{child}", headers={"Accept": ACCEPT}) as r:
                manifest = json.loads(await r.read())
        blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
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
    parser.add_argument("--go-at", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=3)
    args = parser.parse_args()
    time.sleep(max(0.0, args.go_at - time.time()))
    started = time.time()
    try:
        result = asyncio.run(pull(args.endpoint, args.image, args.concurrency))
    except Exception as exc:  # reported, not raised: the harness collects every host
        result = {"bytes": 0, "errors": [f"{type(exc).__name__}: {exc}"]}
    result.update(started=started, finished=time.time())
    Path(args.out).write_text(json.dumps(result))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
