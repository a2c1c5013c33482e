"""YAML configuration into frozen dataclasses, validated at start.

Each component declares its configuration as nested frozen dataclasses; `load` walks the YAML
document against them. Every problem is one `ConfigError` whose message starts with the dotted
key (`cache.max_bytes: ...`), never a traceback: an unknown key, a wrong type, a bad size or
duration, an unreadable secret file.

Special value types are `Annotated` markers: `Annotated[int, SIZE]` accepts `512MiB`, `2GB` or a
plain integer; `Annotated[float, DURATION]` accepts `500ms`, `30s`, `5m`, `1h` or seconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from shoal import announcing, peercerts
from shoal.errors import ConfigError
from shoal.redaction import redact
from shoal.registry import Credentials

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Marker:
    """A converter for one kind of configuration value."""

    name: str
    convert: Callable[[Any, str], Any]


_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1 << 10, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mi": 1 << 20, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gi": 1 << 30, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "ti": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# A key, or a key above it, named like these carries a secret (`password`, `node_token`,
# `signing_key`, `redis.password.env`): its value is never shown. (`token_realms` is not one.)
_SECRET_NAMES = frozenset({"password", "passwd", "secret", "token", "credential", "credentials", "key"})
_SECRET_SUFFIXES = tuple(f"_{name}" for name in _SECRET_NAMES)


def secret_key(key: str) -> bool:
    """Whether the dotted key names a secret or a part of one."""
    parts = re.split(r"[.\[\]\s]+", key.lower())
    return any(part in _SECRET_NAMES or part.endswith(_SECRET_SUFFIXES) for part in parts)


def shown(value: Any, key: str) -> str:
    """How a configuration error shows the bad `value` of `key`: its repr, with URL credentials
    redacted, or nothing of it at all when the key carries a secret (an error message ends up in
    terminals, logs and CI output)."""
    if secret_key(key):
        return "a value (not shown: the key holds a secret)"
    return redact(repr(value))


def parse_size(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    raise ConfigError(f"{key}: expected a size such as 512MiB, 20GB or a number of bytes, got {shown(value, key)}")


def parse_duration(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{key}: expected a duration such as 500ms, 30s, 5m, 1h or 7d, got {shown(value, key)}")


def parse_url(value: Any, key: str) -> str:
    if isinstance(value, str):
        try:
            # urlsplit raises on an unclosed or invalid IPv6 literal (http://[::1:6969), .port on
            # a port out of range: either is a bad value, not a traceback
            parts = urlsplit(value)
            _port = parts.port
        except ValueError:
            parts = None
        # no user and no password: "http://:secret@host" has an empty user but still a password
        if parts is not None and parts.scheme in ("http", "https") and parts.hostname and \
                parts.username is None and parts.password is None:
            return value.rstrip("/")
    raise ConfigError(f"{key}: expected an http:// or https:// URL without credentials, got {shown(value, key)}")


def parse_hostport(value: Any, key: str) -> str:
    """`host:port`, `[v6]:port` (`[::1]:5050`, `[::]:5050`), or `[v4]:port` (so that one template
    such as `[$(HOST_IP)]:6881` serves IPv4 and IPv6 nodes), returned unchanged after checking.
    An IPv6 address without brackets (`::1:5050`) is refused: its last group and the port
    cannot be told apart."""
    if isinstance(value, str):
        host, _, port = value.rpartition(":")
        if host and port.isdigit() and 0 <= int(port) <= 65535:
            if host.startswith("[") and host.endswith("]"):
                try:
                    ipaddress.ip_address(host[1:-1])
                    return value
                except ValueError:
                    pass
            elif "[" not in host and "]" not in host:
                if ":" in host:
                    raise ConfigError(f"{key}: an IPv6 address goes in brackets, as [::1]:5050, "
                                      f"got {shown(value, key)}")
                return value
    raise ConfigError(f"{key}: expected host:port (e.g. 127.0.0.1:5050 or [::1]:5050), got {shown(value, key)}")


def parse_ip(value: Any, key: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(f"{key}: expected an IP address, got {shown(value, key)}") from None


SIZE = Marker("size", parse_size)
DURATION = Marker("duration", parse_duration)
URL = Marker("url", parse_url)
HOSTPORT = Marker("host:port", parse_hostport)
IP = Marker("ip address", parse_ip)


def split_hostport(value: str) -> tuple[str, int]:
    """(host without brackets, port) of a value parse_hostport accepted."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def read_secret(*, key: str, file: str | None, env: str | None) -> str | None:
    """A secret from a file (trailing newline stripped) or an environment variable.

    The error names the key and the file or variable, never the value.
    """
    if file:
        try:
            return Path(file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read secret file {file!r}: {exc.strerror}") from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{key}: environment variable {env!r} is not set")
        return value
    return None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if value is None and typing.get_origin(base) in (typing.Union, types.UnionType) \
                and type(None) in typing.get_args(base):
            return None  # `key: null` for an optional value: none, as when the key is absent
        for m in meta:
            if isinstance(m, Marker):
                return m.convert(value, key)
        return _convert(base, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, key)
        raise TypeError(f"unsupported union in config schema at {key}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {shown(value, key)}")
        return value
    if origin is list or origin is tuple:
        (item_tp, *_rest) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _k, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return load_section(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value, key)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {shown(value, key)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown(value, key)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value, key)}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {key}")


def did_you_mean(name: str, known: typing.Iterable[str], prefix: str = "") -> str:
    """`; did you mean `cache.max_bytes`?` for the closest known key at that level, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if not close:
        return ""
    dotted = f"{prefix}.{close[0]}" if prefix else close[0]
    return f"; did you mean `{dotted}`?"


def load_section(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, naming the dotted key of any problem."""
    where = prefix or "configuration"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            dotted = f"{prefix}.{name}" if prefix else str(name)
            raise ConfigError(f"{dotted}: unknown key{did_you_mean(str(name), fields, prefix)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted}: required key is missing")
        else:
            # schema defaults are already of the converted type
            if field.default is not dataclasses.MISSING:
                kwargs[name] = field.default
            else:
                factory = cast(Callable[[], Any], field.default_factory)
                kwargs[name] = factory()
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(prefix)
    return obj


def read_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror}") from None
    try:
        doc = _load_unique(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at the top level")
    return doc


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the
    last silently, so a setting an operator believes in could be overridden further down."""

    def __init__(self, text: str, path: str) -> None:
        super().__init__(text)
        self.path = path
        self.where: dict[int, str] = {}  # id(mapping node) -> its dotted key

    def construct_document(self, node: yaml.Node) -> Any:
        self._name(node, "")
        return super().construct_document(node)

    def _name(self, node: yaml.Node, dotted: str) -> None:
        """Record every mapping's dotted key (before construction, which has no notion of it)."""
        if id(node) in self.where:  # an alias of a mapping already named (or a recursive one)
            return
        if isinstance(node, yaml.MappingNode):
            self.where[id(node)] = dotted
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                self._name(value_node, f"{dotted}.{key}" if dotted else str(key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._name(item, f"{dotted}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: construction refuses it with its own error
                break
            if seen is not None:
                parent = self.where.get(id(node), "")
                dotted = f"{parent}.{key}" if parent else str(key)
                raise ConfigError(f"{dotted}: given twice in {self.path} (lines {seen} and {line}); "
                                  "keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_unique(text: str, path: str) -> Any:
    loader = _UniqueKeyLoader(text, path)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply a command-line override such as `cache.max_bytes=10GiB` onto the YAML document."""
    parts = dotted.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


@dataclasses.dataclass(frozen=True, slots=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


@dataclasses.dataclass(frozen=True, slots=True)
class SecretSource:
    """A secret given by file or environment variable, never inline in the YAML."""

    file: str | None = None
    env: str | None = None

    def read(self, key: str) -> str | None:
        return read_secret(key=key, file=self.file, env=self.env)


_UPSTREAM_NAME_RE = re.compile(r"[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9a-fA-F:]+\](:\d{1,5})?")


@dataclasses.dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """An upstream registry. `name` is how clients name it (`host[:port]`, containerd's `?ns=`)."""

    name: str
    url: Annotated[str, URL]
    username: str | None = None
    password: SecretSource = dataclasses.field(default_factory=SecretSource)
    # Token realms (URL prefixes) on other hosts that may receive these credentials, e.g. Docker
    # Hub's https://auth.docker.io/token. A realm anywhere else is never contacted.
    token_realms: list[Annotated[str, URL]] = dataclasses.field(default_factory=list)
    # Hosts the registry may redirect blob downloads to (object storage); none by default.
    redirect_hosts: list[str] = dataclasses.field(default_factory=list)

    def validate(self, prefix: str) -> None:
        if not _UPSTREAM_NAME_RE.fullmatch(self.name):
            raise ConfigError(f"{prefix}.name: expected a registry host[:port], got {shown(self.name, prefix)}")
        if self.username is not None and self.password.file is None and self.password.env is None:
            raise ConfigError(f"{prefix}.password: give file or env when username is set")

    def credentials(self, prefix: str) -> Credentials | None:
        """The registry credentials (reads the secret now, so a bad file fails at start)."""
        if self.username is None:
            return None
        return Credentials(self.username, self.password.read(f"{prefix}.password") or "")


MAX_DOWNLOAD_CONNECTIONS = 1000  # the session's own connections_limit


@dataclasses.dataclass(frozen=True, slots=True)
class TorrentSettings:
    """The BitTorrent side of a component."""

    listen: Annotated[str, HOSTPORT] = "127.0.0.1:6881"
    upload_rate_limit: Annotated[int, SIZE] = 0  # bytes per second, 0 = unlimited
    download_rate_limit: Annotated[int, SIZE] = 0
    # Only for tests that run several nodes on one address.
    allow_multiple_connections_per_ip: bool = False
    # Peers a node connects with per blob it is downloading (0: no limit; the origin's seeder,
    # which downloads nothing, takes any number); bench/RESULTS.md section 27.
    download_connections: int = 4
    # Extra libtorrent settings_pack names and values, passed through.
    libtorrent: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        host, _port = split_hostport(self.listen)
        parse_ip(host, f"{prefix}.listen")
        if self.download_connections != 0 and not 2 <= self.download_connections <= MAX_DOWNLOAD_CONNECTIONS:
            # (libtorrent takes no fewer than 2)
            raise ConfigError(f"{prefix}.download_connections: expected 0 (no limit) or 2 to "
                              f"{MAX_DOWNLOAD_CONNECTIONS}, got {self.download_connections}")
        for name in self.libtorrent:
            if name not in _libtorrent_setting_names():
                hint = did_you_mean(name, _libtorrent_setting_names(), f"{prefix}.libtorrent")
                raise ConfigError(f"{prefix}.libtorrent.{name}: not a libtorrent setting{hint}")
            reserved = announcing.RESERVED_SETTINGS.get(name) or peercerts.RESERVED_SETTINGS.get(name)
            if reserved:
                raise ConfigError(f"{prefix}.libtorrent.{name}: {reserved}")


def _libtorrent_setting_names() -> frozenset[str]:
    import libtorrent as lt

    return frozenset(lt.default_settings().keys())


def check_upstream_names(upstreams: list[UpstreamSettings], key: str) -> None:
    if not upstreams:
        raise ConfigError(f"{key}: configure at least one upstream registry")
    seen: set[str] = set()
    for i, u in enumerate(upstreams):
        if u.name in seen:
            raise ConfigError(f"{key}[{i}].name: {u.name!r} is configured twice")
        seen.add(u.name)


def read_token(source: SecretSource, key: str) -> str:
    """A shared secret that must be present and long enough to resist guessing."""
    value = source.read(key)
    if not value:
        raise ConfigError(f"{key}: give file or env")
    if len(value) < 16:
        raise ConfigError(f"{key}: the secret must be at least 16 characters")
    return value


_ORIGIN_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,62})")


@dataclasses.dataclass(frozen=True, slots=True)
class OriginEntry:
    """One of several origins (shoal/rendezvous.py). `name` is its stable identity: blobs are
    owned by name, so it must be spelled the same in every agent's and origin's list; `url` is
    where it answers (it may change without moving any blob)."""

    name: str
    url: Annotated[str, URL]

    def validate(self, prefix: str) -> None:
        if not _ORIGIN_NAME_RE.fullmatch(self.name):
            raise ConfigError(f"{prefix}.name: expected letters, digits, '.', '_' or '-' (at most 63), "
                              f"got {shown(self.name, prefix)}")


def check_origins(origins: list[OriginEntry], replication: int, key: str, replication_key: str) -> None:
    """Names and URLs each once; a replication factor the list can hold."""
    names: set[str] = set()
    urls: set[str] = set()
    for i, entry in enumerate(origins):
        if entry.name in names:
            raise ConfigError(f"{key}[{i}].name: {entry.name!r} is configured twice")
        if entry.url in urls:
            raise ConfigError(f"{key}[{i}].url: {entry.url!r} is configured twice")
        names.add(entry.name)
        urls.add(entry.url)
    if replication < 1:
        raise ConfigError(f"{replication_key}: must be at least 1")
    # (a list of one is one origin, whatever the default replication says)
    if len(origins) > 1 and replication > len(origins):
        raise ConfigError(f"{replication_key}: {replication} owners per blob, but {key} lists {len(origins)} origins")
