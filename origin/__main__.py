"""`python -m shoal_origin --config FILE` (console script `shoal-origin`), and, run on the origin
host (see README, Trust): `shoal-origin forget-node NAME --config FILE [--ban | --unban]` releases
(or bans) an enrolled node's name; `shoal-origin enroll-node NAME --public-key FILE --config FILE`
binds a name to a node's key ahead of its start, or again after a ban."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from shoal import errors, protocol
from shoal.config import read_yaml
from shoal.entry import run_component
from shoal.errors import ConfigError
from shoal_origin import app, collector, config

FLAGS = {
    "--listen": ("listen", "address of the seed and pre-seed API"),
    "--data-dir": ("data_dir", "blob store directory"),
    "--tracker": ("tracker", "tracker base URL"),
    "--torrent-listen": ("torrent.listen", "BitTorrent listen address (ip:port)"),
    "--registration-token-file": ("registration_token.file", "file holding the tracker's secret"),
    "--log-level": ("log.level", "debug, info, warning or error"),
}


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    """A node command's parser: the node's name and the origin's configuration."""
    parser = argparse.ArgumentParser(prog=f"shoal-origin {command}", description=description)
    parser.add_argument("node", help="the node's name (its `node` setting)")
    parser.add_argument("--config", required=True, help="the origin's YAML configuration file")
    return parser


def forget_node(argv: Sequence[str]) -> int:
    parser = _parser("forget-node", "Release a node's name so that it can enroll again with a new key (a node "
                                    "that lost its data directory). Its old key no longer gets swarm tokens or "
                                    "has journal batches accepted.")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--ban", action="store_true",
                     help="a compromised node: refuse its key under any name, and its name to any new key "
                          "until enroll-node binds one (the node's new key, after deleting its data_dir/node.key)")
    how.add_argument("--unban", action="store_true",
                     help="lift the ban of the keys banned under this name, and free the name")
    args = parser.parse_args(argv)
    try:
        protocol.node_name(args.node)
    except errors.BadRequest as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    try:
        database = _database(args.config)
    except ConfigError as exc:
        print(f"shoal-origin: config error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.unban:
            lifted = collector.unban(database, args.node)
            print(f"lifted {lifted} ban(s) of keys banned under {args.node!r}")
            return 0 if lifted else 1
        released = collector.forget_node(database, args.node, ban=args.ban)
    except ValueError as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"shoal-origin: cannot open {str(database)!r}: {exc}", file=sys.stderr)
        return 2
    if released:
        print(f"node {args.node!r} is banned: its key under any name, its name for any new key until "
              "enroll-node binds one" if args.ban else f"node {args.node!r} may enroll again with a new key")
        return 0
    print(f"no node named {args.node!r} has enrolled", file=sys.stderr)
    return 1


def _database(config_file: str) -> Path:
    return Path(config.load(read_yaml(config_file)).data_dir) / collector.AUDIT_DB


def enroll_node(argv: Sequence[str]) -> int:
    parser = _parser("enroll-node", "Bind a node's name to its public key (PEM; on the node: openssl pkey -in "
                                    "DATA_DIR/node.key -pubout): before the node first starts, so nobody can take "
                                    "its name, or again after a ban.")
    parser.add_argument("--public-key", required=True, help="the node's public key, a PEM file")
    parser.add_argument("--replace", action="store_true", help="rebind a name bound to another (live) key")
    args = parser.parse_args(argv)
    try:
        protocol.node_name(args.node)
        database = _database(args.config)
        collector.enroll_node(database, args.node, Path(args.public_key).read_text(), replace=args.replace)
    except (errors.BadRequest, ConfigError, ValueError) as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    print(f"node {args.node!r} is bound to that key")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["forget-node"]:
        return forget_node(args[1:])
    if args[:1] == ["enroll-node"]:
        return enroll_node(args[1:])
    return run_component("origin", args, flags=FLAGS, load=config.load, build=app.build,
                         epilog="shoal-origin forget-node NAME --config FILE [--ban | --unban]: release or ban an "
                                "enrolled node's name; shoal-origin enroll-node NAME --public-key FILE --config FILE: "
                                "bind a name to a node's key (see each one's --help)")


if __name__ == "__main__":
    sys.exit(main())
