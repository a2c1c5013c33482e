"""The shared `main()` of every component: flags, config, logging, run. No component logic."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import re
import resource
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from aiohttp import web

from shoal import logs, sdnotify
from shoal import web as shoal_web
from shoal.cliargs import HelpFormatter, VersionAction
from shoal.config import LogSettings, read_yaml, set_dotted, split_hostport
from shoal.errors import ConfigError, ShoalError


class ComponentConfig(Protocol):
    @property
    def listen(self) -> str: ...

    @property
    def log(self) -> LogSettings: ...

    @property
    def max_connections(self) -> int: ...


C = TypeVar("C", bound=ComponentConfig)

# glibc's mallopt() parameter for the number of malloc arenas.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """Two malloc arenas instead of glibc's 8 per core. libtorrent's disk and network threads
    and the event loop's worker threads each got an arena that kept the buffers they freed: the
    agent serving 64 clients peaked at 146 MiB RSS with the default and 113 MiB with two
    (tests/e2e/test_load.py), at the same request rate. MALLOC_ARENA_MAX in the environment
    wins; not glibc: nothing to do."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        return  # a libc without mallopt (musl)



def raise_fd_limit() -> None:
    """Open files up to the hard limit, as Go programs do: a service's soft limit is often 1024
    (systemd's default), below the connections a component admits (shoal/web.py) plus
    libtorrent's files and sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def private_files(data_dir: str | None) -> None:
    """What a component writes is its user's alone: the cache holds private layers, the journal
    and audit.db who pulled what. Files followed the umask (0644 on most systems). The umask
    covers every file and directory made from now on (libtorrent's and SQLite's included); the
    data directory itself is closed too, for files an older version left readable."""
    os.umask(0o077)
    if data_dir and os.path.isdir(data_dir):
        os.chmod(data_dir, 0o700)


# flag -> (dotted config key, help)
Flags = dict[str, tuple[str, str]]


def _missing_hint(message: str, config_file: str | None, flags: Flags) -> str:
    """Where a required key is missing, say how to give it: a newcomer who ran the bare
    command (no --config) was told only `data_dir: required key is missing`."""
    m = re.fullmatch(r"(\S+): required key is missing", message)
    if m is None:
        return ""
    flag = next((f for f, (key, _) in flags.items() if key == m.group(1)), None)
    if config_file is None:
        return f" (give --config FILE{f' or {flag}' if flag else ''})"
    return f" (set it in {config_file}{f' or give {flag}' if flag else ''})"


def run_component(
    name: str,
    argv: Sequence[str] | None,
    *,
    flags: Flags,
    load: Callable[[dict[str, Any]], C],
    build: Callable[[C], web.Application],
    epilog: str | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"shoal-{name}", description=f"shoal {name}", epilog=epilog,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    for flag, (key, text) in flags.items():
        parser.add_argument(flag, dest=key, metavar=key.upper().replace(".", "_"), help=f"{text} ({key})")
    args = parser.parse_args(argv)
    try:
        doc = read_yaml(args.config)
        for dotted, _help in flags.values():
            value = getattr(args, dotted, None)
            if value is not None:
                set_dotted(doc, dotted, value)
        config = load(doc)
    except ConfigError as exc:
        print(f"shoal-{name}: config error: {exc}{_missing_hint(str(exc), args.config, flags)}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"shoal-{name}: configuration is valid")
        return 0
    logs.setup(name, level=config.log.level, fmt=config.log.format)
    private_files(getattr(config, "data_dir", None))
    raise_fd_limit()
    limit_malloc_arenas()  # before any thread starts (libtorrent's, the loop's executors)
    try:
        app = build(config)
        host, port = split_hostport(config.listen)
        # systemd (Type=notify): READY=1 when shoal_web.service_ready() says so, watchdog pings,
        # STOPPING=1; nothing when not started by systemd
        shoal_web.run(app, host, port, max_connections=config.max_connections,
                      serving=lambda: sdnotify.service(lambda: shoal_web.service_ready(app)))
    except ConfigError as exc:
        print(f"shoal-{name}: config error: {exc}", file=sys.stderr)
        return 2
    except ShoalError as exc:
        print(f"shoal-{name}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"shoal-{name}: {exc}", file=sys.stderr)
        return 1
    return 0
