"""Debian's docker engine (docker.io 20.10) as a test client: dockerd run by hand with its own
data/exec roots and socket (vfs storage, no iptables, no bridge), reconfigured with SIGHUP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from tests.support.clients import CLIENT_TIMEOUT, run
from tests.support.images import Image
from tests.support.procs import free_port

# The CLI docker.io installs (another `docker` may come first on PATH).
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"


class Dockerd:
    """dockerd with everything of its own under `workdir` (short: its containerd's socket
    path must stay under 108 bytes). It starts its own containerd, which it stops on exit.

    Docker Hub is unreachable here; dockerd falls back to it (registry-1.docker.io) when a
    mirror fails. So that the fallback never leaves the machine nor waits on DNS, dockerd gets
    HTTP(S)_PROXY pointing at a closed loopback port: a request to Docker Hub is refused at
    once, while loopback addresses (the agent, the test registry) are never proxied."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = workdir / "docker.sock"
        self.daemon_json = workdir / "daemon.json"
        self.client_config = workdir / "client"  # DOCKER_CONFIG: where `docker login` keeps credentials
        self.log_path = workdir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    def start(self, config: dict[str, Any] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_config.mkdir(exist_ok=True)
        self._write_config(config or {})
        log = open(self.log_path, "ab")  # noqa: SIM115 (child keeps it)
        env = {**os.environ, "HTTPS_PROXY": self.refused, "HTTP_PROXY": self.refused, "NO_PROXY": ""}
        self.proc = subprocess.Popen(
            ["dockerd", "--config-file", str(self.daemon_json), "--data-root", str(self.workdir / "data"),
             "--exec-root", str(self.workdir / "exec"), "--pidfile", str(self.workdir / "docker.pid"),
             "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--host", f"unix://{self.sock}"],
            stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited at start: {self.log()[-2000:]}")
            if self.sock.exists() and self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("dockerd did not start")

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Rewrite daemon.json and reload it (SIGHUP: registry-mirrors and insecure-registries
        are reloadable); returns once `docker info` shows them. Both keys are always written:
        a reload keeps the old value of a key the file leaves out."""
        assert self.proc is not None
        config = {"registry-mirrors": [], "insecure-registries": [], **config}
        self._write_config(config)
        self.proc.send_signal(signal.SIGHUP)
        mirrors = [m.rstrip("/") + "/" for m in config["registry-mirrors"]]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = self.registry_config()
            if (now.get("Mirrors") or []) == mirrors and set(config["insecure-registries"]) <= set(now["IndexConfigs"]):
                return
            time.sleep(0.1)
        raise TimeoutError(f"dockerd did not reload its registry settings: {self.registry_config()}")

    def _write_config(self, config: dict[str, Any]) -> None:
        # dockerd 20.10 writes a (deprecated) trust key to /etc/docker/key.json unless told
        # where; it has no flag for that, only this key
        self.daemon_json.write_text(json.dumps({"deprecated-key-path": str(self.workdir / "key.json"), **config}))

    def registry_config(self) -> dict[str, Any]:
        out = self.docker("info", "--format", "{{json .RegistryConfig}}").stdout
        doc = json.loads(out)
        assert isinstance(doc, dict)
        return doc

    def docker(self, *args: str, check: bool = True, timeout: float = CLIENT_TIMEOUT,
               stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [DOCKER, "-H", f"unix://{self.sock}", *args]
        env = {"DOCKER_CONFIG": str(self.client_config)}
        if stdin is None:
            return run(cmd, env=env, timeout=timeout, check=check)
        result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **env})
        if check and result.returncode != 0:
            raise AssertionError(f"docker {args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        return result

    def login(self, registry: str, user: str, password: str) -> None:
        self.docker("login", "--username", user, "--password-stdin", registry, stdin=password)

    def logout_all(self) -> None:
        (self.client_config / "config.json").unlink(missing_ok=True)

    def forget(self) -> None:
        """Remove every image, so the next pull downloads every layer again."""
        ids = self.docker("images", "-aq").stdout.split()
        if ids:
            self.docker("rmi", "-f", *sorted(set(ids)))
        assert self.docker("images", "-aq").stdout.split() == []

    def verify_image(self, ref: str, image: Image) -> None:
        """docker's image id is the config digest, its layers' diff ids are the pushed layers
        (uncompressed: diff id == digest), and `docker save` gives back every blob byte for
        byte (each hashes to its digest)."""
        manifest = json.loads(image.manifests[image.digest])
        config = manifest["config"]["digest"]
        layers = [layer["digest"] for layer in manifest["layers"]]
        doc = json.loads(self.docker("image", "inspect", ref).stdout)[0]
        assert doc["Id"] == config
        assert doc["RootFS"]["Layers"] == layers
        assert any(d.endswith("@" + image.digest) for d in doc["RepoDigests"]), doc["RepoDigests"]
        saved = self.workdir / "saved.tar"
        self.docker("save", "-o", str(saved), ref)
        try:
            with tarfile.open(saved) as tar:
                index = json.load(_member(tar, "manifest.json"))[0]
                assert "sha256:" + _sha256(_member(tar, index["Config"])) == config
                assert ["sha256:" + _sha256(_member(tar, name)) for name in index["Layers"]] == layers
        finally:
            saved.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _member(tar: tarfile.TarFile, name: str) -> Any:
    f = tar.extractfile(name)
    assert f is not None, name
    return f


def _sha256(f: Any) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()
