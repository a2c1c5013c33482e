"""The shared `main()` of every component: flags, config, logging, run. No component logic."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from aiohttp import web

from shoal import logs
from shoal import web as shoal_web
from shoal.config import LogSettings, read_yaml, set_dotted, split_hostport
from shoal.errors import ConfigError, ShoalError


class ComponentConfig(Protocol):
    @property
    def listen(self) -> str: ...

    @property
    def log(self) -> LogSettings: ...


C = TypeVar("C", bound=ComponentConfig)

# flag -> (dotted config key, help)
Flags = dict[str, tuple[str, str]]


def run_component(
    name: str,
    argv: Sequence[str] | None,
    *,
    flags: Flags,
    load: Callable[[dict[str, Any]], C],
    build: Callable[[C], web.Application],
) -> int:
    parser = argparse.ArgumentParser(prog=f"shoal-{name}", description=f"shoal {name}")
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
        print(f"shoal-{name}: config error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"shoal-{name}: configuration is valid")
        return 0
    logs.setup(name, level=config.log.level, fmt=config.log.format)
    try:
        app = build(config)
        host, port = split_hostport(config.listen)
        shoal_web.run(app, host, port)
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
