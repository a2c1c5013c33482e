"""Content for long runs: a pool of distinct layers shared among many small images, pushed to the
registry over its HTTP API (blob uploads, cross-repository mounts, manifests)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST

CHUNK = 4 << 20


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    path: Path


@dataclass(frozen=True)
class SoakImage:
    repo: str
    tag: str
    manifest_digest: str
    manifest: Path
    config: Layer
    layers: list[Layer] = field(default_factory=list)

    @property
    def blobs(self) -> list[Layer]:
        return [self.config, *self.layers]


def _write(path: Path, data: bytes) -> Layer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    return Layer(digest, len(data), path)


def build(workdir: Path, *, images: int, layers: int, min_size: int, max_size: int, seed: int) -> list[SoakImage]:
    """`layers` distinct layers of seeded random bytes (sizes uniform in [min_size, max_size]),
    spread over `images` images of one to four layers each; every layer is in some image and a
    few are shared, as base layers are."""
    rng = random.Random(seed)
    (workdir / "blobs").mkdir(parents=True, exist_ok=True)
    pool = []
    for i in range(layers):
        size = rng.randint(min_size, max_size)
        data = random.Random(seed * 100_003 + i).randbytes(size)
        pool.append(_write(workdir / "blobs" / f"layer{i}", data))
    order = list(range(layers))
    rng.shuffle(order)
    per_image: list[list[Layer]] = [[] for _ in range(images)]
    for n, index in enumerate(order):  # every layer once, round robin
        per_image[n % images].append(pool[index])
    for chosen in per_image:
        while len(chosen) < 1 or (len(chosen) < 4 and rng.random() < 0.3):  # some shared extras
            extra = rng.choice(pool)
            if extra not in chosen:
                chosen.append(extra)
    out = []
    for j, chosen in enumerate(per_image):
        config = _write(workdir / "blobs" / f"config{j}", json.dumps({
            "architecture": "amd64", "os": "linux", "config": {"Labels": {"shoal.soak": str(j)}},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in chosen]},
        }, sort_keys=True).encode())
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size} for layer in chosen],
        }, sort_keys=True).encode()
        mpath = workdir / "blobs" / f"manifest{j}"
        mpath.write_bytes(manifest)
        out.append(SoakImage(f"soak/img{j}", "v1", "sha256:" + hashlib.sha256(manifest).hexdigest(), mpath,
                             config, chosen))
    return out


async def push_all(registry_url: str, user: str, password: str, images: list[SoakImage]) -> None:
    """Upload every blob once, mount it into the other repositories that use it, put manifests."""
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    headers = {"Authorization": auth}
    home: dict[str, str] = {}  # digest -> first repository holding it
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as http:
        for image in images:
            for blob in image.blobs:
                if blob.digest in home:
                    url = f"{registry_url}/v2/{image.repo}/blobs/uploads/?mount={blob.digest}&from={home[blob.digest]}"
                    async with http.post(url) as r:
                        if r.status == 201:
                            continue
                await _upload(http, registry_url, image.repo, blob)
                home.setdefault(blob.digest, image.repo)
            async with http.put(f"{registry_url}/v2/{image.repo}/manifests/{image.tag}",
                                data=await asyncio.to_thread(image.manifest.read_bytes),
                                headers={"Content-Type": OCI_MANIFEST}) as r:
                if r.status != 201:
                    raise RuntimeError(f"manifest of {image.repo}: HTTP {r.status} {await r.text()}")


async def _upload(http: aiohttp.ClientSession, base: str, repo: str, blob: Layer) -> None:
    async with http.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        if r.status != 202:
            raise RuntimeError(f"upload start in {repo}: HTTP {r.status}")
        location = r.headers["Location"]
    url = location if location.startswith("http") else base + location
    sep = "&" if "?" in url else "?"
    data = await asyncio.to_thread(blob.path.read_bytes)
    async with http.put(f"{url}{sep}digest={blob.digest}", data=data,
                        headers={"Content-Type": "application/octet-stream"}) as r:
        if r.status != 201:
            raise RuntimeError(f"upload of {blob.digest} to {repo}: HTTP {r.status} {await r.text()}")
