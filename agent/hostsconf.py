"""containerd's `<config_path>/<registry>/hosts.toml`, kept in step with the agent's health.

Three states per registry directory (agent/watchdog.py picks one):

- MIRROR: the agent first, the registry as `server`. A file the operator had there is kept as
  `hosts.toml.shoal-orig` and merged: its top-level keys (its own `server`, `ca`, ...) and its
  hosts stay, the agent's host goes before them.
- REDUCED (agent running but not ready, hung, or gone without stopping): the operator's file again
  if there was one, else the registry alone. containerd re-reads the file on every pull, so the
  next pull goes straight to the registry; nothing is restarted.
- REMOVED (the agent stopped cleanly): the operator's file again, or no file at all (and the
  directory, if the agent made it and it is empty).

Every write is atomic (a temporary file made with O_EXCL, fsync, rename): containerd never reads
half a file. A file is ours when its first line is MARKER; anything else in `hosts.toml` is the
operator's. Nothing here follows a symbolic link: a registry directory, `hosts.toml` or its backup
that is one is left alone (an error the watchdog logs), so that whoever can write in a registry
directory cannot make the agent write or copy files elsewhere.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import ipaddress
import json
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import atomic
from shoal.config import split_hostport
from shoal_agent.config import AgentConfig

MARKER = "# written by shoal-agent"
BACKUP = "hosts.toml.shoal-orig"
DEFAULT_DIR = "_default"  # containerd's directory for every registry without its own


class State(enum.Enum):
    MIRROR = "mirror"
    REDUCED = "reduced"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class Registry:
    """One directory under config_path: `name` is containerd's (`host[:port]` or `_default`),
    `server` the registry's URL (None for `_default`: containerd then uses each image's registry)."""

    name: str
    server: str | None


@dataclass(frozen=True, slots=True)
class Plan:
    config_path: str
    mirror: str  # how containerd reaches the agent, e.g. http://127.0.0.1:5050
    dial_timeout: float
    registries: tuple[Registry, ...]

    def to_json(self) -> str:
        return json.dumps({"config_path": self.config_path, "mirror": self.mirror,
                           "dial_timeout": self.dial_timeout,
                           "registries": [[r.name, r.server] for r in self.registries]})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        doc = json.loads(text)
        return cls(config_path=doc["config_path"], mirror=doc["mirror"], dial_timeout=float(doc["dial_timeout"]),
                   registries=tuple(Registry(name, server) for name, server in doc["registries"]))


def local_url(listen: str) -> str:
    """http://host:port on which this host reaches the agent's `listen` address."""
    host, port = split_hostport(listen)
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def plan_for(config: AgentConfig) -> Plan:
    settings = config.containerd
    assert settings.config_path is not None
    registries = [Registry(u.name, u.url) for u in config.upstreams]
    if settings.default_host:
        registries.append(Registry(DEFAULT_DIR, None))
    return Plan(config_path=settings.config_path, mirror=settings.mirror or local_url(config.listen),
                dial_timeout=settings.dial_timeout, registries=tuple(registries))


def _quote(value: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is."""
    return '"' + re.sub(r'["\\\x00-\x1f\x7f]', lambda m: f"\\u{ord(m.group()):04x}", value) + '"'


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def mirror_host(plan: Plan) -> str:
    # dial_timeout: containerd >= 2.1 gives up connecting to a dead agent after it (the default
    # is 30 s); 1.6 and 1.7 ignore the key (a refused connection fails at once there anyway).
    if "[" in plan.mirror:
        # An IPv6 mirror (http://[::1]:5050): containerd 1.6's TOML parser refuses a table
        # header whose quoted key holds "]" ("table key cannot contain ']'") and then ignores
        # the whole file, so the host goes in as a key of [host] with an inline table, which it
        # reads (and orders before the operator's [host."..."] tables, as the header would be).
        return (f"[host]\n"
                f"{_quote(plan.mirror)} = {{ capabilities = [\"pull\", \"resolve\"], "
                f"dial_timeout = {_quote(_duration(plan.dial_timeout))} }}\n")
    return (f"[host.{_quote(plan.mirror)}]\n"
            f"  capabilities = [\"pull\", \"resolve\"]\n"
            f"  dial_timeout = {_quote(_duration(plan.dial_timeout))}\n")


def render(plan: Plan, registry: Registry, state: State, original: str | None) -> str | None:
    """The hosts.toml for `state`, or None for no file. `original` is the operator's file."""
    if state is not State.MIRROR:
        if original is not None:
            return original
        if state is State.REMOVED or registry.server is None:
            return None
        return (f"{MARKER} (agent not ready: the registry alone)\n"
                f"server = {_quote(registry.server)}\n")
    head = f"{MARKER}: the agent first, then the registry\n"
    if original is not None:
        merged = merge(original, mirror_host(plan))
        if merged is not None:
            return f"{head}# the operator's file is kept in {BACKUP}\n{merged}"
    server = f"server = {_quote(registry.server)}\n" if registry.server is not None else ""
    return f"{head}{server}\n{mirror_host(plan)}"


_TABLE_LINE = re.compile(r"^[ \t]*\[", re.MULTILINE)


def merge(original: str, host_table: str) -> str | None:
    """The operator's file with `host_table` before its first table, so that the agent is tried
    first and the file's own keys and hosts still apply. None if the file is not valid TOML (then
    containerd could not use it either) or already names the agent's host."""
    try:
        whole = tomllib.loads(original)
    except tomllib.TOMLDecodeError:
        return None
    ours = tomllib.loads(host_table)["host"]
    if any(name in whole.get("host", {}) for name in ours):
        return None
    top = {k: v for k, v in whole.items() if not isinstance(v, dict)}
    # The first line that opens a table and leaves exactly the top-level keys before it (a line
    # starting with "[" inside a multi-line array fails that test).
    cut = len(original)
    for match in _TABLE_LINE.finditer(original):
        if _parses_to(original[:match.start()], top):
            cut = match.start()
            break
    prefix, rest = original[:cut], original[cut:]
    if prefix and not prefix.endswith("\n"):
        prefix += "\n"
    merged = f"{prefix}\n{host_table}\n{rest}"
    try:
        if list(tomllib.loads(merged).get("host", {}))[: len(ours)] != list(ours):
            return None
    except tomllib.TOMLDecodeError:
        return None
    return merged


def _parses_to(text: str, expected: dict[str, Any]) -> bool:
    try:
        return tomllib.loads(text) == expected
    except tomllib.TOMLDecodeError:
        return False


def is_ours(text: str | None) -> bool:
    return text is not None and text.startswith(MARKER)


def release(plan: Plan, registry: Registry) -> bool:
    """After the agent ended without stopping cleanly (its watchdog too: SIGKILL of the whole
    service, an OOM kill): a file of ours that still names the agent goes to the registry alone.
    Files a clean stop removed or restored are left as they are."""
    current = _read(Path(plan.config_path) / registry.name / "hosts.toml")
    if not is_ours(current):
        return False
    assert current is not None
    try:
        hosts = tomllib.loads(current).get("host", {})
    except tomllib.TOMLDecodeError:
        hosts = {}
    return plan.mirror in hosts and apply(plan, registry, State.REDUCED)


def apply(plan: Plan, registry: Registry, state: State) -> bool:
    """Bring one registry's directory to `state`; True if a file changed."""
    directory = Path(plan.config_path) / registry.name
    if directory.is_symlink():
        raise OSError(errno.ELOOP, f"{directory} is a symbolic link: left as it is")
    target = directory / "hosts.toml"
    backup = directory / BACKUP
    current = _read(target)
    saved = _read(backup)
    if current is not None and not is_ours(current):
        # The operator's file (first sight, or they edited it since): it is the original now.
        saved = current
        if state is State.MIRROR:
            _write(backup, current)
    wanted = render(plan, registry, state, saved)
    changed = False
    if wanted is None:
        if current is not None:
            target.unlink()
            changed = True
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: the operator's certificates stay
    elif wanted != current:
        _write(target, wanted)
        changed = True
    if state is not State.MIRROR and saved is not None:
        # the original is in force again (written just above, or never replaced)
        with contextlib.suppress(FileNotFoundError):
            backup.unlink()
    return changed


def _read(path: Path) -> str | None:
    try:
        # O_NONBLOCK: a FIFO planted there must not hold the watchdog
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link: left as it is") from None
        raise
    with os.fdopen(fd, encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file: left as it is")
        try:
            return f.read()
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, f"{path} is not UTF-8 (TOML is): left as it is") from None


def _write(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        os.chmod(path.parent, 0o755)  # noqa: S103 like the directories around it (the agent's umask is 077)
    # containerd runs as root and reads the file whatever its mode; 0644 like the files around it
    atomic.write_text(path, text, mode=0o644)
