"""kubelet's path: containerd's CRI image service (config_path = certs.d) pulls through an agent in
pass-through mode with the pull secret's credentials in the CRI request, as kubelet sends them."""

from __future__ import annotations

import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.conftest import USERS, Images
from tests.e2e.test_hosts_toml import WAIT, registry_alone, through
from tests.support.clients import Containerd
from tests.support.cri import Auth, ImageService
from tests.support.procs import Component, wait_for
from tests.support.registry import Registry, pulls_since
from tests.support.stack import Stack

K8S = "k8s.io"  # the containerd namespace the CRI plugin keeps its images in


@pytest.fixture
def cri() -> Iterator[tuple[Containerd, ImageService]]:
    ctd = Containerd(Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp")), cri=True)
    ctd.start()
    service = ImageService(ctd.sock)
    yield ctd, service
    service.close()
    ctd.close()


def passthrough_agent(stack: Stack) -> Component:
    """An agent holding no registry credentials: every pull uses the puller's (the default
    `auth.unauthenticated: challenge`: an anonymous request gets the registry's 401)."""
    stack.start_tracker()
    stack.start_origin()
    return stack.start_agent(upstreams=[{"name": stack.registry.host, "url": stack.registry.url}],
                             auth={"unauthenticated": "challenge"})



def forget(ctd: Containerd) -> None:
    """Remove every image from the CRI namespace and wait for the GC, so that the next pull
    downloads every blob again."""
    names = ctd.ctr("images", "ls", "-q", namespace=K8S).stdout.split()
    if names:
        ctd.ctr("images", "rm", "--sync", *names, namespace=K8S)
    assert ctd.ctr("content", "ls", "-q", namespace=K8S).stdout.split() == []


def test_kubelet_pull_secret_through_a_passthrough_agent(stack: Stack, registry: Registry, images: Images,
                                                         cri: tuple[Containerd, ImageService]) -> None:
    ctd, service = cri
    image = images.app()
    agent = passthrough_agent(stack)
    ctd.hosts_dir(registry.host, registry.url, agent)
    ref = f"{registry.host}/private/app:v1"
    before = len(registry.settle())
    started = time.monotonic()
    image_ref = service.pull(ref, Auth("alice", USERS["alice"]))
    cold = time.monotonic() - started
    config = next(d for d, b in image.blobs.items() if "config" in b.media_type)
    assert image_ref == config  # CRI's image id is the config digest
    ctd.verify_content([image.digest, *image.blobs], namespace=K8S)
    # the agent, not containerd's fallback to the registry, served every blob
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(image.blobs)
    assert agent.metric("shoal_agent_served_bytes_total") >= image.total_blob_bytes
    # kubelet's view of the image
    status = service.status(ref)
    assert status is not None and status.id == config
    assert ref in status.repo_tags and f"{registry.host}/private/app@{image.digest}" in status.repo_digests
    assert status.size > 0
    assert config in {i.id for i in service.list()}
    # the journal names the puller (the pull secret's user), and so does the registry's own
    # audit for the manifest the agent asked for with alice's credentials
    events = stack.journal(agent, len(image.blobs) + 1)
    served = [e for e in events if e["status"] == 200 and e["digest"] in image.blobs]
    assert {str(e["digest"]) for e in served} == set(image.blobs)
    assert {e["principal"] for e in served} == {"alice"}
    pulls = registry.settle()[before:]
    assert any(p.actor == "alice" and p.digest == image.digest for p in pulls)
    assert {p.actor for p in pulls if p.repository == "private/app"} <= {"alice", "seeder"}
    print(f"\nCRI pull through a cold agent: {cold:.2f}s")


def test_kubelet_pull_with_wrong_or_no_credentials_fails(stack: Stack, registry: Registry, images: Images,
                                                          cri: tuple[Containerd, ImageService]) -> None:
    """The agent has the image cached (alice pulled it) and node credentials of its own are not
    used: a CRI pull with a wrong password, or none, fails at the agent and at the registry."""
    ctd, service = cri
    image = images.app()
    agent = passthrough_agent(stack)
    ctd.hosts_dir(registry.host, registry.url, agent)
    ref = f"{registry.host}/private/app:v1"
    service.pull(ref, Auth("alice", USERS["alice"]))
    forget(ctd)
    served = agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200")
    assert served == len(image.blobs)
    for auth in (Auth("alice", "not-alices-password"), Auth("node", "wrong"), None):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            service.pull(ref, auth)
        assert time.monotonic() - started < 20  # refused, not hung
        # the agent's answer (containerd reports its first host's error; the registry, tried
        # next as `server`, refused too)
        assert (f"pulling from host {agent.config['listen']} failed with status code [manifests v1]: "
                "401 Unauthorized") in str(failed.value.details())
        assert service.status(ref) is None
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == served
    assert agent.metric("shoal_agent_requests_total", kind="manifests", status="401") >= 3
    assert ctd.ctr("content", "ls", "-q", namespace=K8S).stdout.split() == []


def test_kubelet_credentials_bound_to_the_registry_skip_the_agent(stack: Stack, registry: Registry, images: Images,
                                                                   cri: tuple[Containerd, ImageService]) -> None:
    """containerd gives the CRI request's credentials only to the host named in
    AuthConfig.server_address when it is set (ParseAuth): the agent's challenge goes unanswered,
    containerd tries the next host, and the pull comes straight from the registry. Kubelet's
    keyring leaves server_address empty (credentialprovider's BasicDockerKeyring.Add copies a pull
    secret's username, password and email only); a client that sets it bypasses the agent."""
    ctd, service = cri
    image = images.app()
    agent = passthrough_agent(stack)
    ctd.hosts_dir(registry.host, registry.url, agent)
    ref = f"{registry.host}/private/app:v1"
    before = len(registry.settle())
    service.pull(ref, Auth("alice", USERS["alice"], server_address=registry.url))
    ctd.verify_content([image.digest, *image.blobs], namespace=K8S)
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == 0
    assert agent.metric("shoal_agent_requests_total", kind="manifests", status="401") >= 1
    got = registry.blob_gets(registry.settle()[before:])
    assert set(got) == set(image.blobs)


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_cri_pull_time_through_the_agent_and_straight(stack: Stack, registry: Registry, images: Images,
                                                      cri: tuple[Containerd, ImageService]) -> None:
    """Measured (printed with -s): CRI pulls of the test image through a cold agent (its blobs
    come through the swarm from the origin), a warm one (from its cache), and straight from the
    registry (hosts.toml reduced to `server`, as the node configurator leaves it without an agent;
    containerd reads config_path at every pull). Warm and straight alternate, three of each."""
    ctd, service = cri
    image = images.app()
    agent = passthrough_agent(stack)
    ref = f"{registry.host}/private/app:v1"
    auth = Auth("alice", USERS["alice"])
    hosts = ctd.certs_dir / registry.host / "hosts.toml"
    times: dict[str, list[float]] = {"agent, cold cache": [], "agent, warm cache": [], "registry": []}
    for name in ["agent, cold cache", *["agent, warm cache", "registry"] * 3]:
        if name == "registry":
            hosts.write_text(f'server = "{registry.url}"\n')
        else:
            ctd.hosts_dir(registry.host, registry.url, agent)
        started = time.monotonic()
        service.pull(ref, auth)
        times[name].append(time.monotonic() - started)
        ctd.verify_content([image.digest, *image.blobs], namespace=K8S)
        forget(ctd)
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == 4 * len(image.blobs)
    assert agent.metric("shoal_agent_served_bytes_total", source="cache") >= 3 * image.total_blob_bytes
    size = image.total_blob_bytes / (1 << 20)
    print("\n" + "\n".join(f"CRI pull of {size:.0f} MiB, {name}: median {statistics.median(t):.2f}s "
                            f"({', '.join(f'{x:.2f}' for x in t)})" for name, t in times.items()))


def test_kubelet_pulls_through_the_hosts_toml_the_agent_keeps(cri: tuple[Containerd, ImageService], stack: Stack,
                                                              registry: Registry, images: Images) -> None:
    """The CRI plugin's config_path is the directory the agent manages (containerd.config_path):
    kubelet's pulls go through the agent while it is ready, and straight to the registry, without
    waiting, once it hangs (the watchdog reduces the file). (`cri` comes first so that it is torn
    down last: the stopping agent's watchdog writes into its certs.d.)"""
    ctd, service = cri
    image = images.app()
    stack.start_tracker()
    stack.start_origin()
    agent = stack.start_agent(upstreams=[{"name": registry.host, "url": registry.url}],
                              auth={"unauthenticated": "challenge"},
                              containerd={"config_path": str(ctd.certs_dir), "check_interval": "200ms"})
    wait_for(lambda: through(agent, ctd.certs_dir, registry), timeout=WAIT, what="hosts.toml through the agent")
    ref = f"{registry.host}/private/app:v1"
    service.pull(ref, Auth("alice", USERS["alice"]))
    ctd.verify_content([image.digest, *image.blobs], namespace=K8S)
    assert agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200") == len(image.blobs)
    forget(ctd)
    agent.signal(signal.SIGSTOP)
    wait_for(lambda: registry_alone(ctd.certs_dir, registry), timeout=WAIT, what="hosts.toml reduced")
    before = registry.settle()
    started = time.monotonic()
    service.pull(ref, Auth("alice", USERS["alice"]))
    took = time.monotonic() - started
    ctd.verify_content([image.digest, *image.blobs], namespace=K8S)
    assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(image.blobs, 1)
    assert took < 10, took
    print(f"\nCRI pull with the agent hung (hosts.toml reduced): {took:.2f}s")
