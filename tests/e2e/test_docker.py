"""docker (Debian's docker.io engine) pulls through an agent: as Docker Hub's `registry-mirrors`
(an upstream named docker.io, here pointing at the test registry: nothing leaves the machine),
and from a private registry by the agent's own address. What credentials docker gives a mirror
is measured, not assumed. Every pulled image is checked blob by blob (`docker save`)."""

from __future__ import annotations

import base64
import json
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import MIB, USERS, Images
from tests.support.docker import Dockerd
from tests.support.images import Image
from tests.support.procs import Component
from tests.support.registry import Registry
from tests.support.stack import Stack

HUB_ATTEMPT = 'Error getting v2 registry: Get \\"https://registry-1.docker.io/v2/\\"'


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    """One dockerd for the module (it starts in about a second, but its images are kept on
    vfs); each test reconfigures it (SIGHUP) and leaves no image or login behind."""
    d = Dockerd(Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp")))
    d.start()
    yield d
    d.close()


@pytest.fixture
def docker(dockerd: Dockerd) -> Iterator[Dockerd]:
    yield dockerd
    dockerd.forget()
    dockerd.logout_all()


def hub_image(images: Images) -> Image:
    """An image "on Docker Hub": pushed to the test registry as library/app, the repository
    `docker pull app:v1` names."""
    return images.get("library/app", layers=[24 * MIB, 2 * MIB, 300_000], seed=21)


def hub_agent(stack: Stack, unauthenticated: str) -> Component:
    """An agent whose only upstream is named docker.io (so it serves dockerd's mirror requests,
    which carry no `ns`) and is the test registry; the origin knows it by the same name."""
    registry = stack.registry
    stack.start_tracker()
    stack.start_origin(upstreams=[{"name": "docker.io", "url": registry.url, "username": stack.seeder_user,
                                   "password": {"file": str(stack.seeder_password)}}])
    upstream: dict[str, object] = {"name": "docker.io", "url": registry.url}
    if unauthenticated == "node":
        upstream.update(username=stack.node_user, password={"file": str(stack.node_password)})
    return stack.start_agent(upstreams=[upstream], auth={"unauthenticated": unauthenticated})



def served_blobs(agent: Component) -> float:
    return agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200")


def hub_attempts(docker: Dockerd, since: int) -> int:
    """How many times dockerd tried Docker Hub itself after the log's first `since` characters."""
    return docker.log()[since:].count(HUB_ATTEMPT)


def test_docker_hub_mirror_with_node_credentials(stack: Stack, images: Images, docker: Dockerd) -> None:
    image = hub_image(images)
    agent = hub_agent(stack, "node")
    docker.reconfigure({"registry-mirrors": [agent.url]})
    docker.docker("pull", "app:v1")
    docker.verify_image("app:v1", image)
    assert served_blobs(agent) == len(image.blobs)
    events = stack.journal(agent, len(image.blobs))
    assert {e["principal"] for e in events if e["digest"] in image.blobs and e["status"] == 200} == {"node"}
    assert {e["ns"] for e in events} == {"docker.io"}


# hung: docker waits out its own timeout before it falls back
@pytest.mark.parametrize("failure", ["stopped", pytest.param("hung", marks=pytest.mark.slow)])
def test_docker_falls_back_to_docker_hub_once_when_the_mirror_fails(stack: Stack, images: Images, docker: Dockerd,
                                                                    failure: str) -> None:
    """A mirror that refuses connections (agent stopped) or accepts them and never answers
    (SIGSTOP): dockerd tries Docker Hub once (unreachable here), and the pull fails; it does
    not loop. Measured: how long the pull takes to fail."""
    hub_image(images)
    agent = hub_agent(stack, "node")
    docker.reconfigure({"registry-mirrors": [agent.url]})
    if failure == "stopped":
        agent.stop()
    else:
        agent.signal(signal.SIGSTOP)
    since = len(docker.log())
    started = time.monotonic()
    result = docker.docker("pull", "app:v1", check=False, timeout=120)
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "registry-1.docker.io" in result.stderr
    assert hub_attempts(docker, since) == 1
    # refused: at once; hung: dockerd's 15 s ping timeout for the mirror's /v2/, then Docker Hub
    assert took < (5 if failure == "stopped" else 30), took
    print(f"\ndocker pull with the mirror {failure}: failed after {took:.2f}s")


def test_docker_pulls_a_private_registry_through_the_agent_address(stack: Stack, registry: Registry, images: Images,
                                                                    docker: Dockerd) -> None:
    """dockerd has no mirror setting for other registries: the image is named by the agent's
    address (in insecure-registries; dockerd also treats 127.0.0.0/8 as insecure by default)."""
    image = images.app()
    stack.start(agents=1)  # auth.unauthenticated: node, with the node's registry login
    agent = stack.agents[0]
    address = str(agent.config["listen"])
    docker.reconfigure({"insecure-registries": [address]})
    assert address in docker.registry_config()["IndexConfigs"]
    ref = f"{address}/private/app:v1"
    before = len(registry.settle())
    docker.docker("pull", ref)
    docker.verify_image(ref, image)
    assert served_blobs(agent) == len(image.blobs)
    events = stack.journal(agent, len(image.blobs))
    assert {e["principal"] for e in events if e["digest"] in image.blobs and e["status"] == 200} == {"node"}
    # the registry saw the manifest asked for with the node's login (the agent's), not docker's
    assert {p.actor for p in registry.settle()[before:] if p.digest == image.digest} == {"node"}


def test_docker_gives_a_mirror_only_docker_hub_credentials(stack: Stack, registry: Registry, images: Images,
                                                           docker: Dockerd) -> None:
    """An agent in pass-through mode (`challenge`) as Docker Hub's mirror. A `docker login` to
    the registry behind it (its own address) gives the mirror nothing: the agent's challenge
    goes unanswered, dockerd falls back to Docker Hub and the pull fails. Docker Hub's own login
    (the `auths` entry `docker login` without a server writes) is what dockerd answers a
    mirror's challenge with: then the pull goes through the agent as that user."""
    image = hub_image(images)
    agent = hub_agent(stack, "challenge")
    docker.reconfigure({"registry-mirrors": [agent.url]})
    docker.login(registry.host, "alice", USERS["alice"])
    since = len(docker.log())
    result = docker.docker("pull", "app:v1", check=False, timeout=60)
    assert result.returncode != 0
    # dockerd got the agent's challenge at /v2/ and, having no credentials for it, asked for
    # nothing more (it fails the manifest request itself: "no basic auth credentials")
    assert "no basic auth credentials" in docker.log()[since:]
    assert agent.metric("shoal_agent_requests_total", kind="ping", status="401") >= 1
    assert agent.metric("shoal_agent_requests_total", kind="manifests") == 0
    assert served_blobs(agent) == 0
    assert hub_attempts(docker, since) == 1
    # what `docker login` (to Docker Hub) would store; Docker Hub itself cannot be reached here
    hub_login = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    (docker.client_config / "config.json").write_text(
        json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}}))
    since = len(docker.log())
    docker.docker("pull", "app:v1")
    docker.verify_image("app:v1", image)
    assert hub_attempts(docker, since) == 0
    assert served_blobs(agent) == len(image.blobs)
    events = stack.journal(agent, len(image.blobs))
    assert {e["principal"] for e in events if e["digest"] in image.blobs and e["status"] == 200} == {"alice"}


def test_docker_login_to_the_agent_address_passes_through(stack: Stack, registry: Registry, images: Images,
                                                          docker: Dockerd) -> None:
    """With the image named by the agent's address, `docker login <agent address>` gives docker
    credentials for that address: an agent in pass-through mode relays the registry's challenge
    and forwards them, so a private registry needs no node credentials. Wrong ones are refused."""
    image = images.app()
    stack.start_tracker()
    stack.start_origin()
    agent = stack.start_agent(upstreams=[{"name": registry.host, "url": registry.url}],
                              auth={"unauthenticated": "challenge"})
    address = str(agent.config["listen"])
    docker.reconfigure({"insecure-registries": [address]})
    ref = f"{address}/private/app:v1"
    refused = docker.docker("pull", ref, check=False, timeout=60)
    assert refused.returncode != 0 and "no basic auth credentials" in refused.stderr
    bad = docker.docker("login", "--username", "alice", "--password-stdin", address, stdin="wrong",
                        check=False, timeout=60)
    assert bad.returncode != 0 and "401" in bad.stderr
    assert served_blobs(agent) == 0
    docker.login(address, "alice", USERS["alice"])
    docker.docker("pull", ref)
    docker.verify_image(ref, image)
    assert served_blobs(agent) == len(image.blobs)
    events = stack.journal(agent, len(image.blobs))
    assert {e["principal"] for e in events if e["digest"] in image.blobs and e["status"] == 200} == {"alice"}
