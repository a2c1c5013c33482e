"""Real processes: Debian's docker-registry with htpasswd, shoal components on 127.0.0.x,
containerd, podman, skopeo and docker as clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import Containerd
from tests.support.images import Image, build_image, push
from tests.support.registry import Registry
from tests.support.stack import Stack
from tests.support.tokenworld import USERS as TOKEN_USERS
from tests.support.tokenworld import TokenWorld, open_world

# Users of the origin registry: `alice` pushes test images; the origin seeder and the agents
# use their own identities, so the registry's audit tells who fetched what.
USERS = {"alice": "alicepw", "seeder": "seederpw", "node": "nodepw"}
MIB = 1 << 20

for tool in ("docker-registry", "skopeo", "containerd", "ctr", "podman", "htpasswd", "dockerd"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run ./bin/test, which installs the Debian packages")


@pytest.fixture(scope="session")
def e2e_root() -> Iterator[Path]:
    # Short path: containerd's socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="shoal-e2e-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(e2e_root: Path) -> Iterator[Registry]:
    reg = Registry(e2e_root / "registry", users=USERS)
    reg.start()
    yield reg
    reg.close()


class Images:
    """Images built once per session and pushed to the registry as alice."""

    def __init__(self, root: Path, registry: Registry) -> None:
        self.root = root
        self.registry = registry
        self._built: dict[str, Image] = {}

    def get(self, repo: str, *, layers: list[int], seed: int, platforms: list[str] | None = None,
            tag: str = "v1") -> Image:
        key = f"{repo}:{tag}"
        if key not in self._built:
            image = build_image(self.root / key.replace("/", "_").replace(":", "_"), tag=tag,
                                layer_sizes=layers, seed=seed, platforms=platforms)
            push(image, registry=self.registry.host, repo=repo, user="alice", password=USERS["alice"])
            self._built[key] = image
        return self._built[key]

    def app(self) -> Image:
        """The main test image: a 64 MiB+ layer, mid-size layers, small ones (below the swarm threshold)."""
        return self.get("private/app", layers=[64 * MIB + 4321, 6 * MIB, 2 * MIB, 300_000], seed=11)

    def multi(self) -> Image:
        """A two-platform index; the platforms share their first layer."""
        return self.get("private/multi", layers=[24 * MIB, 3 * MIB, 200_000], seed=12,
                        platforms=["linux/amd64", "linux/arm64"])


@pytest.fixture(scope="session")
def images(e2e_root: Path, registry: Registry) -> Images:
    return Images(e2e_root / "images", registry)


@pytest.fixture
def stack(tmp_path: Path, registry: Registry) -> Iterator[Stack]:
    s = Stack(tmp_path / "stack", registry, node_user=("node", USERS["node"]),
              seeder_user=("seeder", USERS["seeder"]))
    yield s
    s.close()


@pytest.fixture(scope="session")
def world(e2e_root: Path) -> Iterator[TokenWorld]:
    """The registry with token auth (tests/support/tokenworld.py); a test that changes its ACL
    puts it back."""
    w = open_world(e2e_root / "tokenworld")
    yield w
    w.close()


@pytest.fixture
def tstack(tmp_path: Path, world: TokenWorld) -> Iterator[Stack]:
    """A stack on the token-auth registry, with no node credentials the registry knows."""
    s = Stack(tmp_path / "stack", world.registry, node_user=("nobody", "unused"),
              seeder_user=("seeder", TOKEN_USERS["seeder"]))
    yield s
    s.close()


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    ctd = Containerd(Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp")))
    ctd.start()
    yield ctd
    ctd.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


ImageFactory = Callable[..., Image]
