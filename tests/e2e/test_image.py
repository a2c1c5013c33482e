"""The container image (bin/image) runs every component: the tracker, the origin and an agent, each
from the image with podman (read-only root filesystem, the image's own non-root user, host network,
loopback addresses), become ready, and containerd pulls a private image through the agent.

Slow (the build takes about a minute): run with --slow. The image is built once per run by bin/image
(which reuses an image built from the same commit of a clean tree) and removed at the end if this
run built it; SHOAL_TEST_IMAGE=TAG uses an image built beforehand instead (and keeps it).
SHOAL_PODMAN_FLAGS (as for bin/image) selects podman's storage.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import peercerts, protocol
from shoal.cluster import Cluster, make_keys
from shoal.registry import Credentials
from tests.e2e.conftest import USERS, Images
from tests.support import api
from tests.support.clients import Containerd
from tests.support.podman import podman, ulimits
from tests.support.procs import ROOT, Sample, free_port, http_get, metric_sum, parse_metrics, wait_for
from tests.support.registry import Registry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UID = 65532  # the image's user (bin/image)
ETC, DATA = Path("/etc/shoal"), Path("/var/lib/shoal")  # where the containers see config and data


class Contained:
    """A component run from the image: config directory read-only at /etc/shoal, its own data
    directory read-write at /var/lib/shoal, nothing else writable (no tmpfs on /tmp either)."""

    def __init__(self, image: str, component: str, name: str, config: dict[str, Any], etc: Path, data: Path) -> None:
        self.image, self.component, self.config = image, component, config
        self.container = f"shoal-e2e-{name}-{uuid.uuid4().hex[:8]}"
        self.etc, self.data = etc, data
        (etc / f"{name}.yaml").write_text(yaml.safe_dump(config))
        self.config_path = ETC / f"{name}.yaml"
        data.mkdir(mode=0o700)
        os.chown(data, UID, UID)
        self.started = False

    @property
    def url(self) -> str:
        return f"http://{self.config['listen']}"

    def start(self) -> Contained:
        self.started = True  # from here on close() removes the container, even if `run` fails half-way
        podman("run", "--detach", "--name", self.container, "--network", "host",
               "--read-only", "--read-only-tmpfs=false", "--cap-drop", "all", "--security-opt", "no-new-privileges",
               *ulimits(), "--volume", f"{self.etc}:{ETC}:ro", "--volume", f"{self.data}:{DATA}:rw",
               self.image, f"shoal-{self.component}", "--config", str(self.config_path))
        wait_for(self._ready_or_exited, timeout=60, what=f"{self.container} ready")
        assert self.running(), f"{self.container} exited before it was ready:\n{self.logs()[-3000:]}"
        return self

    def _ready_or_exited(self) -> bool:
        if not self.running():
            return True
        try:
            return http_get(protocol.READYZ.url(self.url), timeout=1.0)[0] == 200
        except OSError:
            return False

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.container).stdout.strip() == "true"

    def pid(self) -> int:
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.container).stdout)

    def logs(self) -> str:
        r = podman("logs", self.container, check=False)
        return r.stdout + r.stderr

    def metrics(self) -> list[Sample]:
        status, body = http_get(protocol.METRICS.url(self.url))
        assert status == 200, status
        return parse_metrics(body.decode())

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.metrics(), name, **labels)

    def close(self) -> None:
        if self.started:
            podman("stop", "--time", "10", self.container, check=False)
            podman("rm", "--force", self.container, check=False)
            self.started = False


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


def test_image_runs_tracker_origin_and_agent_read_only_as_non_root(
        shoal_image: str, tmp_path: Path, registry: Registry, images: Images, containerd: Containerd) -> None:
    image = shoal_image
    labels = podman("image", "inspect", "--format", "{{json .Config.Labels}}", image).stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f'"org.opencontainers.image.version":"{version}"' in labels
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert f'"org.opencontainers.image.revision":"{head}' in labels
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == f"{UID}:{UID}"

    # The host writes the configuration as the containers see it (paths under /etc/shoal and
    # /var/lib/shoal); the secrets stay 0600, owned by the image's user.
    etc = tmp_path / "etc"
    keys = make_keys(etc / "keys")
    (etc / "node.password").write_text(USERS["node"])
    (etc / "seeder.password").write_text(USERS["seeder"])
    for path in [etc, *etc.rglob("*")]:
        os.chown(path, UID, UID)
    inside = {name: ETC / "keys" / path.name for name, path in keys.items()}

    def upstream(user: str) -> dict[str, Any]:
        return {"name": registry.host, "url": registry.url, "username": user,
                "password": {"file": str(ETC / f"{user}.password")}}

    tracker_listen, origin_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cluster = Cluster(inside, [upstream("node")], tracker_url=f"http://{tracker_listen}",
                      origin_url=f"http://{origin_listen}", log={"level": "debug"})
    tracker = Contained(image, "tracker", "tracker",
                        cluster.tracker(listen=tracker_listen, interval="5s", min_interval="1s"),
                        etc, tmp_path / "tracker")
    origin = Contained(image, "origin", "origin",
                       cluster.origin(listen=origin_listen, data_dir=DATA, torrent_listen=f"127.0.0.1:{free_port()}",
                                      upstreams=[upstream("seeder")],
                                      # the seeder's path: a BitTorrent connection between the
                                      # containers (first copies would fill the layers over HTTP)
                                      first_copy=False),
                       etc, tmp_path / "origin")
    agent_ip = "127.0.0.2"
    agent = Contained(image, "agent", "agent",
                      cluster.agent(listen=f"{agent_ip}:{free_port(agent_ip)}", data_dir=DATA,
                                    torrent_listen=f"{agent_ip}:{free_port(agent_ip)}", node="node0",
                                    auth={"unauthenticated": "node"},
                                    swarm={"first_piece_timeout": "5s", "stall_timeout": "5s"}),
                      etc, tmp_path / "agent")
    started = [tracker, origin, agent]
    try:
        for c in started:
            c.start()
        for c in started:
            status = proc_status(c.pid())
            assert status["Uid"].split()[:2] == [str(UID), str(UID)], status["Uid"]
            assert status["Gid"].split()[:2] == [str(UID), str(UID)], status["Gid"]
            assert podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", c.container).stdout.strip() == "true"
        # the root filesystem refuses writes, /tmp included; the data directory takes them
        for probe in ("/usr/lib/probe", "/tmp/probe", "/etc/shoal/probe"):
            r = podman("exec", agent.container, "sh", "-c", f": > {probe}", check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, (probe, r.stderr)
        assert podman("exec", agent.container, "sh", "-c", f": > {DATA}/probe && rm {DATA}/probe",
                      check=False).returncode == 0
        rss = {c.component: int(proc_status(c.pid())["VmRSS"].split()[0]) * 1024 for c in started}
        print(f"idle RSS in the containers (MiB): { {k: round(v / 2**20, 1) for k, v in rss.items()} }")

        app = images.app()
        # the large layers seeded first, so that they cross a BitTorrent connection between the
        # containers (cold, the agent would have the origin's relay of its fetch: origin/relay.py)
        tester = peercerts.NodeKey.generate()
        api.grants(origin.url, keys["node_token"].read_text(), "tester", tester)
        for blob in app.blobs.values():
            if blob.size >= 1 << 20:
                api.admission(origin.url, keys["node_token"].read_text(), blob.digest, "tester", tester,
                              registry.host, "private/app", Credentials("node", USERS["node"]).basic())
        hosts = containerd.workdir / "certs.d"
        (hosts / registry.host).mkdir(parents=True)
        (hosts / registry.host / "hosts.toml").write_text(
            f'server = "{registry.url}"\n\n[host."{agent.url}"]\n  capabilities = ["pull", "resolve"]\n')
        containerd.pull(f"{registry.host}/private/app:v1", hosts)
        layers = [b for b in app.blobs.values() if "config" not in b.media_type]
        digests = [b.digest for b in app.blobs.values()]
        containerd.verify_content([app.digest, *digests])
        # the agent in the container served every blob (none came from containerd's fallback), and
        # the large layers came over BitTorrent from the origin's seeder (libtorrent works in the image)
        assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(digests)
        assert agent.metric("shoal_agent_served_bytes_total") >= sum(b.size for b in app.blobs.values())
        large = [b for b in layers if b.size >= 1 << 20]
        assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") >= len(large)
        # (libtorrent's payload count is exact; its split by peer is sampled, and a one-piece blob
        # done between two samples, its seeder gone by the next, is in neither: by peer, > 0)
        assert agent.metric("shoal_agent_swarm_received_payload_bytes_total") >= sum(b.size for b in large)
        assert agent.metric("shoal_agent_swarm_download_bytes_total", peer="seeder") > 0
        assert agent.metric("shoal_agent_swarm_download_bytes_total", peer="agent") == 0
        # the cache lives in the data directory, on the host's side of the volume
        print(f"agent RSS after the pull: {int(proc_status(agent.pid())['VmRSS'].split()[0]) / 1024:.1f} MiB")
        cached = {p.name for p in (tmp_path / "agent").rglob("*") if p.is_file()}
        assert {b.hex for b in large} <= cached
    except BaseException:
        for c in started:
            if c.started:
                print(f"--- {c.container} ---\n{c.logs()[-4000:]}")
        raise
    finally:
        for c in reversed(started):
            c.close()
    leftover = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert not {c.container for c in started} & set(leftover)
