"""`python -m shoal_origin --config FILE` (console script `shoal-origin`), and, run on the origin
host (see README, Trust and Operators): `shoal-origin add-operator NAME --roles ROLES --operators FILE`
and `remove-operator` manage operator tokens; `shoal-origin forget-node NAME --config FILE [--ban | --unban]` releases
(or bans) an enrolled node's name; `shoal-origin enroll-node NAME --public-key FILE --config FILE`
binds a name to a node's key ahead of its start, or again after a ban."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from shoal import errors, operator_tokens, protocol
from shoal.config import read_yaml
from shoal.entry import run_component
from shoal.errors import ConfigError
from shoal_origin import app, collector, config

T = TypeVar("T")

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
    except (FileNotFoundError, sqlite3.Error, collector.StoreUnavailable) as exc:
        print(f"shoal-origin: cannot open {str(database)!r}: {exc}", file=sys.stderr)
        return 2
    if released:
        print(f"node {args.node!r} is banned: its key under any name, its name for any new key until "
              "enroll-node binds one" if args.ban else f"node {args.node!r} may enroll again with a new key")
        return 0
    print(f"no node named {args.node!r} has enrolled", file=sys.stderr)
    return 1


def _database(config_file: str) -> collector.Target:
    """The origin's audit store: its audit.db, or the PostgreSQL it is configured with."""
    cfg = config.load(read_yaml(config_file))
    if cfg.audit.postgresql is None:
        return Path(cfg.data_dir) / collector.AUDIT_DB
    return collector.store_for(cfg, create=False)


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
    except (OSError, sqlite3.Error, collector.StoreUnavailable) as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    print(f"node {args.node!r} is bound to that key")
    return 0


def _operator_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"shoal-origin {command}", description=description)
    parser.add_argument("name", help="the operator's name (a-z, 0-9, '.', '_', '-'); audited as token:NAME")
    parser.add_argument("--operators", required=True, metavar="FILE",
                        help="the operators file (the origin's operators.tokens.file)")
    return parser


def _edit_operators(operators: str, change: Callable[[Path], T]) -> T | None:
    """`change` applied to the operators file; None (and one line on stderr) if it cannot be."""
    try:
        return change(Path(operators))
    except operator_tokens.TokenFileError as exc:
        print(f"shoal-origin: {operators}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"shoal-origin: cannot update {operators!r}: {exc.strerror}", file=sys.stderr)
    return None


def add_operator(argv: Sequence[str]) -> int:
    parser = _operator_parser("add-operator", "Add an operator with a new random token, printed once on standard "
                                              "output; the file keeps only its SHA-256. The origin reads the file "
                                              "again within a second.")
    parser.add_argument("--roles", required=True, help="comma-separated: seed, audit, admin")
    parser.add_argument("--repositories", nargs="+", default=[], metavar="GLOB",
                        help="registry/name globs a seed operator may pre-seed, e.g. 'registry:5000/team/*' "
                             "(default: none; admin may seed anything)")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    token = _edit_operators(args.operators, lambda path: operator_tokens.add(path, args.name, roles, args.repositories))
    if token is None:
        return 2
    print(token)
    if "seed" in roles and "admin" not in roles and not args.repositories:
        print(f"shoal-origin: note: {args.name!r} may pre-seed nothing until given --repositories", file=sys.stderr)
    print(f"operator {args.name!r} added with roles {', '.join(roles)}; the token above is shown only now",
          file=sys.stderr)
    return 0


def remove_operator(argv: Sequence[str]) -> int:
    parser = _operator_parser("remove-operator", "Remove an operator: its token is refused from the origin's next "
                                                 "look at the file (within a second).")
    args = parser.parse_args(argv)
    removed = _edit_operators(args.operators, lambda path: operator_tokens.remove(path, args.name))
    if removed is None:
        return 2
    if not removed:
        print(f"shoal-origin: no operator named {args.name!r}", file=sys.stderr)
        return 1
    print(f"operator {args.name!r} removed")
    return 0


COMMANDS = {"forget-node": forget_node, "enroll-node": enroll_node, "add-operator": add_operator,
            "remove-operator": remove_operator}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    return run_component("origin", args, flags=FLAGS, load=config.load, build=app.build,
                         epilog="shoal-origin forget-node NAME --config FILE [--ban | --unban]: release or ban an "
                                "enrolled node's name; shoal-origin enroll-node NAME --public-key FILE --config FILE: "
                                "bind a name to a node's key; shoal-origin add-operator NAME --roles ROLES "
                                "--operators FILE / remove-operator NAME --operators FILE: operator tokens "
                                "(see each one's --help)")


if __name__ == "__main__":
    sys.exit(main())
