"""containerd, podman and skopeo pull through an agent; every blob they got hashes to its digest."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import Images
from tests.support.clients import Containerd, Podman, run, skopeo_copy, verify_dir
from tests.support.registry import Registry
from tests.support.stack import Stack


def blob_digests(image_manifests: dict[str, bytes], top: str, platform_digest: str | None = None) -> list[str]:
    doc = json.loads(image_manifests[platform_digest or top])
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def test_containerd_pulls_by_tag_through_hosts_toml(stack: Stack, registry: Registry, images: Images,
                                                    containerd: Containerd) -> None:
    image = images.app()
    stack.start(agents=1)
    agent = stack.agents[0]
    hosts = containerd.hosts_dir(registry.host, registry.url, agent)
    containerd.pull(f"{registry.host}/private/app:v1", hosts)
    digests = blob_digests(image.manifests, image.digest)
    containerd.verify_content([image.digest, *digests])
    # the agent, not the fallback `server`, served every blob
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(digests)
    assert agent.metric("shoal_agent_requests_total", kind="manifests", status="200") >= 2


def test_containerd_pulls_index_by_digest(stack: Stack, registry: Registry, images: Images,
                                          containerd: Containerd) -> None:
    image = images.multi()
    stack.start(agents=1)
    agent = stack.agents[0]
    hosts = containerd.hosts_dir(registry.host, registry.url, agent)
    containerd.pull(f"{registry.host}/private/multi@{image.digest}", hosts)
    amd64 = image.platforms["linux/amd64"]
    digests = blob_digests(image.manifests, image.digest, amd64)
    containerd.verify_content([image.digest, amd64, *digests])
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(digests)


def test_podman_pulls_through_registries_conf_mirror(stack: Stack, registry: Registry, images: Images,
                                                     workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    agent = stack.agents[0]
    podman = Podman(registry.host, agent)
    ref = f"{registry.host}/private/app:v1"
    try:
        podman.podman("pull", "--quiet", ref)
        podman.verify_image(ref, image)
    finally:
        podman.close()
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(image.blobs)


def test_skopeo_copies_through_the_agent(stack: Stack, images: Images, workdir: Path) -> None:
    image = images.multi()
    stack.start(agents=1)
    agent = stack.agents[0]
    dest = workdir / "copy"
    skopeo_copy(f"{agent.config['listen']}/private/multi:v1", dest)
    assert verify_dir(dest, image) == len(image.blobs)
    assert (dest / "manifest.json").read_bytes() == image.manifests[image.digest]


def test_skopeo_takes_the_mirror_from_registries_conf_only_as_a_flag(stack: Stack, registry: Registry,
                                                                     images: Images, workdir: Path) -> None:
    """skopeo 1.9 reads the mirror from `--registries-conf FILE` (a global flag it does not list
    in --help), not from $CONTAINERS_REGISTRIES_CONF as podman does: with the variable alone it
    pulls from the registry and the agent sees nothing (README: "Pointing clients at an agent")."""
    image = images.app()
    stack.start(agents=1)
    agent = stack.agents[0]
    conf = workdir / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n\n'
                    f'[[registry.mirror]]\nlocation = "{agent.config["listen"]}"\ninsecure = true\n')
    ref = f"docker://{registry.host}/private/app:v1"
    creds = f"{stack.node_user}:{stack.node_password.read_text()}"
    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--src-creds", creds, ref, f"dir:{workdir / 'env'}"],
        env={"CONTAINERS_REGISTRIES_CONF": str(conf)})
    assert verify_dir(workdir / "env", image) == len(image.blobs)
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == 0
    run(["skopeo", "--registries-conf", str(conf), "copy", "--quiet", "--src-creds", creds, ref,
         f"dir:{workdir / 'flag'}"])
    assert verify_dir(workdir / "flag", image) == len(image.blobs)
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(image.blobs)
