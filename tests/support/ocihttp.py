"""Push and pull OCI images over plain HTTP with the distribution API itself, for hosts given
as IPv6 literals (`[::1]:5000`): skopeo 1.9 and containerd 1.6 reject such an image reference
("invalid reference format"), so the IPv6 tests speak the wire directly. Every pulled blob is
hashed against its digest."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

from tests.support.images import Image

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
TIMEOUT = 120.0


def _request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
             auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers), exc.read()


def push(image: Image, *, base: str, repo: str, auth: tuple[str, str] | None = None) -> None:
    """Monolithic blob uploads, then the manifest under the image's tag (single-platform images)."""
    assert not image.platforms, "push handles single-platform images"
    for blob in image.blobs.values():
        status, headers, body = _request(f"{base}/v2/{repo}/blobs/uploads/", method="POST", auth=auth)
        assert status == 202, (status, body[:200])
        location = urljoin(f"{base}/", headers["Location"])
        sep = "&" if "?" in location else "?"
        status, _h, body = _request(f"{location}{sep}digest={blob.digest}", method="PUT",
                                    body=blob.path.read_bytes(),
                                    headers={"Content-Type": "application/octet-stream"}, auth=auth)
        assert status == 201, (status, body[:200])
    status, _h, body = _request(f"{base}/v2/{repo}/manifests/{image.tag}", method="PUT",
                                body=image.manifests[image.digest],
                                headers={"Content-Type": image.media_type}, auth=auth)
    assert status == 201, (status, body[:200])


def pull(base: str, repo: str, tag: str, dest: Path) -> dict[str, int]:
    """Pull `repo:tag` from `base` as a registry client does (manifest, then config and layers);
    every body is checked against its digest and written to `dest`. Returns digest -> size."""
    dest.mkdir(parents=True, exist_ok=True)
    status, headers, body = _request(f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    assert status == 200, (status, body[:300])
    digest = headers.get("Docker-Content-Digest", "")
    assert digest == "sha256:" + hashlib.sha256(body).hexdigest(), "manifest does not hash to its digest"
    doc = json.loads(body)
    got: dict[str, int] = {}
    for desc in [doc["config"], *doc["layers"]]:
        status, _h, data = _request(f"{base}/v2/{repo}/blobs/{desc['digest']}")
        assert status == 200, (desc["digest"], status, data[:300])
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"], f"{desc['digest']}: wrong bytes"
        assert len(data) == desc["size"]
        (dest / desc["digest"].split(":", 1)[1]).write_bytes(data)
        got[desc["digest"]] = len(data)
    return got
