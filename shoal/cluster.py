"""How a cluster's components are wired to each other, written once.

A `Cluster` holds what every component shares (the keys, the registries, where the tracker and
the origin listen) and writes each component's configuration document from it. `shoal up`,
the test stack and the benchmarks all build their configurations here, so a key renamed or
added in one component's configuration is renamed or added for all of them.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal import operator_tokens, signing

# The components' import names (their folders are agent/, origin/ and tracker/; pyproject.toml
# maps them so that an installed shoal does not claim site-packages/agent).
MODULES = {"tracker": "shoal_tracker", "origin": "shoal_origin", "agent": "shoal_agent"}
LOCAL_ADMIN = "local-admin"  # the operator make_keys creates (audited as token:local-admin)


def command(component: str, config: Path) -> list[str]:
    """The command line that runs `component` ("tracker", "origin", "agent") with `config`."""
    return [sys.executable, "-m", MODULES[component], "--config", str(config)]


def source_path(root: Path) -> str:
    """A PYTHONPATH that runs every component from the source tree at `root` (shoal/, and agent/,
    origin/, tracker/ under their import names through the links in .mypy-path), whichever tree
    the virtualenv was installed from: tests and benchmarks of a clone or worktree that shares
    another tree's venv run their own code."""
    return f"{root}:{root / '.mypy-path'}"


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Cluster:
    keys: dict[str, Path]  # as make_keys writes them
    upstreams: list[dict[str, Any]]  # `upstreams` entries of the configuration
    tracker_url: str
    origin_url: str
    log: dict[str, Any] = field(default_factory=lambda: {"level": "info"})
    # Several origins: [{"name", "url"}, ...] (origin_url is then unused); origin() takes `name`.
    origins: list[dict[str, str]] = field(default_factory=list)

    def _file(self, name: str) -> dict[str, str]:
        return {"file": str(self.keys[name])}

    def tracker(self, *, listen: str, **extra: Any) -> dict[str, Any]:
        return merged({
            "listen": listen, "registration_token": self._file("registration_token"),
            "node_token": self._file("node_token"), "origin_public_key": str(self.keys["origin_public_key"]),
            "log": self.log,
        }, extra)

    def origin(self, *, listen: str, data_dir: Path, torrent_listen: str, name: str | None = None,
               **extra: Any) -> dict[str, Any]:
        """`name`: which of `origins` this one is (with several origins)."""
        if self.origins:
            assert name is not None, "several origins: name the one to configure"
            extra = merged({"name": name, "origins": self.origins, "peer_token": self._file("peer_token")}, extra)
        return merged({
            "listen": listen, "data_dir": str(data_dir), "upstreams": self.upstreams, "tracker": self.tracker_url,
            "registration_token": self._file("registration_token"), "signing_key": str(self.keys["signing_key"]),
            "node_token": self._file("node_token"), "torrent": {"listen": torrent_listen}, "log": self.log,
            "operators": {"tokens": {"file": str(self.keys["operators"])}},
        }, extra)

    def agent(self, *, listen: str, data_dir: Path, torrent_listen: str, with_swarm: bool = True,
              **extra: Any) -> dict[str, Any]:
        """`with_swarm=False`: an agent without an origin (the registry only)."""
        doc: dict[str, Any] = {"listen": listen, "data_dir": str(data_dir), "upstreams": self.upstreams,
                               "torrent": {"listen": torrent_listen}, "log": self.log}
        if with_swarm:
            doc.update(node_token=self._file("node_token"), origin_public_key=str(self.keys["origin_public_key"]))
            if self.origins:
                doc.update(origins=self.origins)
            else:
                doc.update(origin=self.origin_url)
        return merged(doc, extra)


def make_keys(directory: Path) -> dict[str, Path]:
    """The cluster's secrets, created once (0600): the origin's signing key and its public key,
    the node token (agents), the registration token (origin -> tracker), the peer token (origin
    <-> origin, several origins), the notification token (registry -> origin, pre-seed on push),
    and the operators file
    with one local admin operator, whose token (`operator_token`) `shoal seed` and `shoal audit`
    present on this host."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / file for name, file in (
        ("signing_key", "origin-signing.pem"), ("origin_public_key", "origin-public.pem"),
        ("node_token", "node.token"), ("registration_token", "registration.token"),
        ("operators", "operators.json"), ("operator_token", "operator.token"),
        ("peer_token", "origin-peer.token"), ("notification_token", "notification.token"))}
    if not paths["signing_key"].exists():
        _write_secret(paths["signing_key"], signing.generate_private_key().decode())
    if not paths["origin_public_key"].exists():
        paths["origin_public_key"].write_bytes(signing.public_pem(paths["signing_key"].read_bytes()))
    for name in ("node_token", "registration_token", "peer_token", "notification_token"):
        if not paths[name].exists():
            _write_secret(paths[name], secrets.token_urlsafe(32))
    if not paths["operator_token"].exists():
        if paths["operators"].exists():
            operator_tokens.remove(paths["operators"], LOCAL_ADMIN)  # its token was lost: a new one
        _write_secret(paths["operator_token"], operator_tokens.add(paths["operators"], LOCAL_ADMIN, ["admin"]))
    return paths


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
