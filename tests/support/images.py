"""Build real OCI images (layouts on disk) for tests: tar layers of seeded random bytes,
configs, manifests, and two-platform indexes. Pushed to the registry with skopeo."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    path: Path
    # For layers: the name and sha256 of the one file inside the tar (to check unpacked content).
    payload: tuple[str, str] | None = None

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


@dataclass
class Image:
    """An image in an OCI layout: its top manifest (or index) and every blob it references."""

    layout: Path
    tag: str
    digest: str  # of the top-level manifest or index
    media_type: str
    manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> body (incl. top)
    blobs: dict[str, Blob] = field(default_factory=dict)  # digest -> blob (configs and layers)
    platforms: dict[str, str] = field(default_factory=dict)  # "linux/amd64" -> manifest digest

    def large_blobs(self, threshold: int) -> list[Blob]:
        return [b for b in self.blobs.values() if b.size >= threshold]

    @property
    def total_blob_bytes(self) -> int:
        return sum(b.size for b in self.blobs.values())


def _write_blob(layout: Path, data: bytes) -> tuple[str, int, Path]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.write_bytes(data)
    return f"sha256:{digest}", len(data), path


def _layer(seed: int, size: int) -> tuple[bytes, tuple[str, str]]:
    """A tar with one file of `size` seeded random bytes (incompressible, reproducible)."""
    rng = random.Random(seed)
    # randbytes takes at most 2**28 bytes at a time (its bit count is a C int)
    payload = b"".join(rng.randbytes(min(64 << 20, size - i)) for i in range(0, size, 64 << 20))
    name = f"data/layer-{seed}.bin"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), (name, hashlib.sha256(payload).hexdigest())


def _manifest(layout: Path, image: Image, layer_sizes: list[int], layer_seeds: list[int], seed: int,
              arch: str) -> tuple[str, int]:
    layers = []
    diff_ids = []
    for size, layer_seed in zip(layer_sizes, layer_seeds, strict=True):
        data, payload = _layer(layer_seed, size)
        digest, length, path = _write_blob(layout, data)
        image.blobs[digest] = Blob(digest, length, OCI_LAYER, path, payload)
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": length})
        diff_ids.append(digest)  # uncompressed layers: diff id == digest
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/bin/true"], "Labels": {"shoal.test.seed": str(seed)}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, sort_keys=True).encode()
    cdigest, csize, cpath = _write_blob(layout, config)
    image.blobs[cdigest] = Blob(cdigest, csize, OCI_CONFIG, cpath)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": layers,
    }, sort_keys=True).encode()
    digest, size, _ = _write_blob(layout, body)
    image.manifests[digest] = body
    return digest, size


def build_image(layout: Path, *, tag: str, layer_sizes: list[int], seed: int,
                platforms: list[str] | None = None, layer_seeds: list[int] | None = None) -> Image:
    """One manifest (or, with `platforms`, an index of one manifest per platform; platforms
    share the first layer, the rest differ). `layer_seeds` picks each layer's content (a layer
    seed gives the same bytes in any image: a new version sharing its base layers)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    image = Image(layout, tag, "", OCI_MANIFEST)
    if not platforms:
        seeds = layer_seeds or [seed * 1000 + i for i in range(len(layer_sizes))]
        digest, size = _manifest(layout, image, layer_sizes, seeds, seed, "amd64")
        media, top_size = OCI_MANIFEST, size
    else:
        entries = []
        for n, plat in enumerate(platforms):
            os_, arch = plat.split("/")[:2]
            # the first layer is shared by every platform, the others differ
            seeds = [seed * 1000] + [(seed * 1000) + 100 * n + i for i in range(1, len(layer_sizes))]
            digest, size = _manifest(layout, image, layer_sizes, seeds, seed * 10 + n, arch)
            image.platforms[plat] = digest
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                            "platform": {"os": os_, "architecture": arch}})
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                          sort_keys=True).encode()
        digest, top_size, _ = _write_blob(layout, body)
        image.manifests[digest] = body
        media = OCI_INDEX
    image.digest, image.media_type = digest, media
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": media, "digest": digest, "size": top_size,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return image


def push(image: Image, *, registry: str, repo: str, user: str | None = None, password: str | None = None) -> None:
    """skopeo copy --all the layout to the registry (plain HTTP), keeping every digest."""
    cmd = ["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--quiet"]
    if user is not None:
        cmd += ["--dest-creds", f"{user}:{password}"]
    cmd += [f"oci:{image.layout}:{image.tag}", f"docker://{registry}/{repo}:{image.tag}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"skopeo push failed: {result.stderr.strip()}")
