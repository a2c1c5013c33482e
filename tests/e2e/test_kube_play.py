"""The Helm chart's agent pod, as rendered, runs: `podman kube play` of the DaemonSet's pod (the
nearest real runtime here; no Kubernetes API server is installable) with the image from bin/image.
It becomes ready, writes hosts.toml into a host directory, a host containerd pulls a private image
through it; when the pod stops the file is gone and the next pull goes straight to the registry.

What kubelet would do and podman cannot is done here: the ConfigMap and the Secret become host
directories (hostPath volumes with the same contents); the downward API's node name and host IP
become values, expanded in the arguments as kubelet does; the containers' `ports` (informational
with the host network) are dropped, as podman refuses them there. Everything else (init step,
security contexts, hostPath cache and certs.d, emptyDir, command, probes) is the chart's. Slow
(the image build): run with --slow.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import protocol
from tests.deploy import chart
from tests.e2e.conftest import MIB, USERS, Images
from tests.support.clients import Containerd
from tests.support.podman import containers_conf, podman
from tests.support.procs import free_port, http_get, metric_sum, parse_metrics, wait_for
from tests.support.registry import Registry, pulls_since
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UID = 65532  # the image's user
HOST_IP = "127.0.0.1"


def as_pod(docs: list[dict[str, Any]], host: Path, stack: Stack) -> dict[str, Any]:
    """The DaemonSet's pod, with its ConfigMap and Secret as host directories."""
    template = chart.find(docs, "DaemonSet")["spec"]["template"]
    spec = template["spec"]
    config = host / "config"
    config.mkdir()
    for key, text in chart.find(docs, "ConfigMap", chart.name("agent"))["data"].items():
        (config / key).write_text(text)
    keys = host / "keys"
    keys.mkdir()
    for item in next(v for v in spec["volumes"] if v["name"] == "keys")["secret"]["items"]:
        source = {"node.token": stack.keys["node_token"], "origin-public.pem": stack.keys["origin_public_key"]}
        (keys / item["path"]).write_bytes(source[item["key"]].read_bytes())
        os.chown(keys / item["path"], UID, UID)
        os.chmod(keys / item["path"], 0o400)
    replaced = {"config": config, "keys": keys}
    spec["volumes"] = [{"name": v["name"], "hostPath": {"path": str(replaced[v["name"]]), "type": "Directory"}}
                       if v["name"] in replaced else v for v in spec["volumes"]]
    downward = {"spec.nodeName": "kube-node-1", "status.hostIP": HOST_IP,
                "metadata.labels['topology.kubernetes.io/zone']": "zone-a"}  # the label Kubernetes copies
    for container in spec["containers"] + spec.get("initContainers", []):
        # with the host network, ports only document what the pod binds (kubelet maps nothing);
        # podman 4.3 refuses port mappings without a bridge
        container.pop("ports", None)
        container["env"] = [{"name": e["name"], "value": downward[e["valueFrom"]["fieldRef"]["fieldPath"]]}
                            if "valueFrom" in e else e for e in container.get("env", [])]
        # kubelet expands $(VAR) in command and args; podman does not
        values = {e["name"]: e["value"] for e in container["env"]}
        for key in ("command", "args"):
            if key in container:
                container[key] = [expand(arg, values) for arg in container[key]]
    # podman 4.3 here fails to remove a finished "once" init container ("cannot remove container
    # ... as it is running", about 20 s after starting it); "always" keeps it, which kubelet's
    # init containers never are anyway (they run once per pod start either way)
    annotations = {"io.podman.annotations.init.container.type": "always"}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "shoal-agent-kube-node-1", "labels": template["metadata"]["labels"],
                         "annotations": annotations}, "spec": spec}


def expand(arg: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg)


def pull(containerd: Containerd, certs: Path, ref: str, digests: list[str]) -> float:
    started = time.monotonic()
    containerd.ctr("images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native",
                   "--user", f"alice:{USERS['alice']}", ref)
    took = time.monotonic() - started
    for digest in digests:
        out = subprocess.run(["ctr", "-a", str(containerd.sock), "-n", "shoal", "content", "get", digest],
                             capture_output=True, timeout=60, check=True).stdout
        assert "sha256:" + hashlib.sha256(out).hexdigest() == digest
    return took


def test_the_charts_agent_pod_runs_keeps_hosts_toml_and_leaves_nothing(
        shoal_image: str, stack: Stack, registry: Registry, images: Images, containerd: Containerd,
        tmp_path: Path) -> None:
    stack.start_tracker()
    stack.start_origin()
    first = images.get("private/kube1", layers=[6 * MIB, 100_000], seed=401)
    second = images.get("private/kube2", layers=[6 * MIB, 100_000], seed=402)
    host = tmp_path / "node"
    host.mkdir()
    certs, cache = host / "etc-containerd-certs.d", host / "var-lib-shoal-agent"
    mirror_port = free_port(HOST_IP)
    repository, tag = shoal_image.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "upstreams": [{"name": registry.host, "url": registry.url}],
        "secrets": {"existingSecret": "test-keys"},
        "agent": {"mirrorPort": mirror_port, "torrentPort": free_port(HOST_IP),
                  "cache": {"hostPath": str(cache)}, "metrics": {"enabled": False},
                  "containerd": {"configPath": str(certs)},
                  # the origin runs beside the test, not behind a cluster Service
                  "config": {"origin": stack.origin.url if stack.origin else ""}},
    }
    docs = chart.template(values, tmp_path)
    pod = tmp_path / "pod.yaml"
    pod.write_text(yaml.safe_dump(as_pod(docs, host, stack)))
    env = {"CONTAINERS_CONF": str(containers_conf(tmp_path / "containers.conf"))}
    mirror = f"http://127.0.0.1:{mirror_port}"
    hosts = certs / registry.host / "hosts.toml"

    def mirroring() -> bool:
        return hosts.exists() and mirror in tomllib.loads(hosts.read_text()).get("host", {})

    try:
        podman("kube", "play", "--replace", str(pod), env=env, timeout=180)
        try:
            wait_for(mirroring, timeout=60, what="the pod's agent writing hosts.toml")
        except TimeoutError:
            print(podman("logs", "shoal-agent-kube-node-1-agent", check=False).stderr[-3000:])
            raise
        # the init step made the host directories the agent's; the agent runs as its image's user
        assert cache.stat().st_uid == UID
        assert (certs / registry.host).stat().st_uid == UID
        assert hosts.stat().st_uid == UID
        inspect = podman("inspect", "--format", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
                         "shoal-agent-kube-node-1-agent").stdout.split()
        assert inspect == [f"{UID}:{UID}", "true"]

        through = pull(containerd, certs, f"{registry.host}/private/kube1:v1", [first.digest, *first.blobs])
        status, body = http_get(protocol.METRICS.url(mirror))
        assert status == 200
        samples = parse_metrics(body.decode())
        assert metric_sum(samples, "shoal_agent_requests_total", kind="blobs", method="GET",
                          status="200") == len(first.blobs)
        assert metric_sum(samples, "shoal_agent_containerd_mirroring") == 1
        for digest in first.blobs:  # the cache is on the node's host path, every blob whole
            hexd = digest.split(":")[1]
            cached = cache / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
            assert hashlib.sha256(cached.read_bytes()).hexdigest() == hexd
        # the pod stops as kubelet stops it (SIGTERM, then a grace period): the file is gone
        podman("pod", "stop", "--time", "30", "shoal-agent-kube-node-1", env=env, timeout=60)
        assert not hosts.exists()
    finally:
        podman("kube", "down", str(pod), env=env, check=False, timeout=120)
    # and the next pull goes to the registry at once
    before = registry.settle()
    direct = pull(containerd, certs, f"{registry.host}/private/kube2:v1", [second.digest, *second.blobs])
    assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(second.blobs, 1)
    print(f"\npull through the pod's agent {through:.2f} s; after the pod stopped, straight "
          f"to the registry {direct:.2f} s")
    leftover = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert not [n for n in leftover if n.startswith("shoal-agent-kube-node-1")]
