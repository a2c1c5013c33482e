"""Real registry clients for tests (containerd, skopeo, podman) and checks that what they
downloaded hashes to its digest."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from tests.support.images import Image
from tests.support.procs import Component

CLIENT_TIMEOUT = 180


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = CLIENT_TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


class Containerd:
    """containerd 1.6 as root with a private root/state/socket; pulls through hosts.toml.

    With `cri`, its CRI plugin (kubelet's image service, tests/support/cri.py) runs too, reading
    hosts.toml from `certs_dir` (`registry.config_path`), with the native snapshotter (overlayfs
    needs more than a temp dir may offer) and CNI, opt and streaming kept inside the work dir or
    on loopback. CRI's images live in containerd's `k8s.io` namespace."""

    def __init__(self, workdir: Path, *, cri: bool = False) -> None:
        self.workdir = workdir
        self.sock = workdir / "ctd.sock"
        self.cri = cri
        self.certs_dir = workdir / "certs.d"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.workdir / "config.toml"
        top, tables = 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n', ""
        if self.cri:
            cri = 'plugins."io.containerd.grpc.v1.cri"'
            top = ""
            tables = (
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{self.workdir / "opt"}"\n'
                f'[{cri}]\n  disable_tcp_service = true\n  stream_server_address = "127.0.0.1"\n'
                '  stream_server_port = "0"\n'
                f'[{cri}.containerd]\n  snapshotter = "native"\n'
                f'[{cri}.cni]\n  bin_dir = "{self.workdir / "cni"}"\n  conf_dir = "{self.workdir / "cni"}"\n'
                f'[{cri}.registry]\n  config_path = "{self.certs_dir}"\n'
            )
        config.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\nstate = "{self.workdir / "state"}"\n{top}'
            f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            f'[debug]\n  address = ""\n{tables}'
        )
        log = open(self.workdir / "containerd.log", "ab")  # noqa: SIM115 (child keeps it)
        self.proc = subprocess.Popen(["containerd", "-c", str(config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("containerd exited at start")
            if self.sock.exists() and self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("containerd did not start")

    def ctr(self, *args: str, check: bool = True, namespace: str = "shoal") -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", str(self.sock), "-n", namespace, *args], check=check)

    def hosts_dir(self, registry_host: str, registry_url: str, mirror: Component) -> Path:
        """hosts.toml: the registry as `server`, the agent as the (only) mirror host."""
        d = self.certs_dir / registry_host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(
            f'server = "{registry_url}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        return self.certs_dir

    def pull(self, ref: str, hosts_dir: Path, *, user: str | None = None) -> subprocess.CompletedProcess[str]:
        args = ["images", "pull", "--plain-http", "--hosts-dir", str(hosts_dir), "--snapshotter", "native"]
        if user:
            args += ["--user", user]
        return self.ctr(*args, ref)

    def verify_content(self, digests: list[str], *, namespace: str = "shoal") -> None:
        """Each blob in containerd's content store hashes to its digest."""
        for digest in digests:
            out = subprocess.run(["ctr", "-a", str(self.sock), "-n", namespace, "content", "get", digest],
                                 capture_output=True, timeout=60, check=True).stdout
            assert "sha256:" + hashlib.sha256(out).hexdigest() == digest, digest

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def skopeo_copy(source: str, dest: Path, *, all_platforms: bool = True, creds: str | None = None,
                timeout: float = CLIENT_TIMEOUT) -> None:
    cmd = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
    if all_platforms:
        cmd.append("--all")
    if creds:
        cmd += ["--src-creds", creds]
    run([*cmd, f"docker://{source}", f"dir:{dest}"], timeout=timeout)


def verify_dir(dest: Path, image: Image, *, platforms: list[str] | None = None) -> int:
    """Every blob skopeo wrote is named by its digest and hashes to it; every blob of the
    image (of the given platforms) is there. Returns how many blobs were checked."""
    files = {p.name: p for p in dest.iterdir() if len(p.name) == 64}
    for name, path in files.items():
        assert sha256_path(path) == name, f"{name} does not hash to its name"
    expected = _expected_blobs(image, platforms)
    missing = expected - set(files)
    assert not missing, f"blobs missing from the copy: {sorted(missing)}"
    return len(files)


def _expected_blobs(image: Image, platforms: list[str] | None) -> set[str]:
    manifests = [image.manifests[image.digest]]
    if image.platforms:
        manifests = [image.manifests[d] for p, d in image.platforms.items() if platforms is None or p in platforms]
    out: set[str] = set()
    for body in manifests:
        doc = json.loads(body)
        out.add(doc["config"]["digest"].split(":")[1])
        out.update(layer["digest"].split(":")[1] for layer in doc["layers"])
    return out


class Podman:
    """podman with its own root (vfs) and a registries.conf that makes the agent a mirror."""

    def __init__(self, registry_host: str, mirror: Component) -> None:
        # podman refuses a runroot path longer than 50 characters
        self.workdir = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
        self.conf = self.workdir / "registries.conf"
        self.conf.write_text(
            f'[[registry]]\nlocation = "{registry_host}"\ninsecure = true\n\n'
            f'[[registry.mirror]]\nlocation = "{mirror.config["listen"]}"\ninsecure = true\n'
        )

    def podman(self, *args: str) -> subprocess.CompletedProcess[str]:
        base = ["podman", "--root", str(self.workdir / "root"), "--runroot", str(self.workdir / "run"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        return run([*base, *args], env={"CONTAINERS_REGISTRIES_CONF": str(self.conf)})

    def verify_image(self, ref: str, image: Image) -> None:
        """podman's image id is its config digest; saved layers unpack to the right payloads."""
        image_id, manifest_digest = self.podman("image", "inspect", "--format", "{{.Id}} {{.Digest}}",
                                                ref).stdout.split()
        config = next(b for b in image.blobs.values() if "config" in b.media_type)
        assert image_id == config.hex
        assert manifest_digest == image.digest
        saved = self.workdir / "saved"
        self.podman("save", "--format", "oci-dir", "-o", str(saved), ref)
        payloads = {b.payload for b in image.blobs.values() if b.payload}
        found: set[tuple[str, str]] = set()
        for blob in (saved / "blobs" / "sha256").iterdir():
            assert sha256_path(blob) == blob.name
            raw = blob.read_bytes()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            try:
                with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                    for member in tar.getmembers():
                        f = tar.extractfile(member)
                        if f is not None:
                            found.add((member.name, hashlib.sha256(f.read()).hexdigest()))
            except tarfile.ReadError:
                continue  # config or manifest
        assert payloads <= found, "unpacked layer content differs from what was pushed"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
