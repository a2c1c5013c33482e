"""`python -m shoal_origin --config FILE` (console script `shoal-origin`), and
`shoal-origin forget-node NAME --config FILE`: release an enrolled node's name (run on the
origin host; see README, Trust)."""

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


def forget_node(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="shoal-origin forget-node",
        description="Release a node's name so that it can enroll again with a new key (a node that lost "
                    "its data directory). Its old key no longer gets swarm tokens or has journal batches accepted.")
    parser.add_argument("node", help="the node's name (its `node` setting)")
    parser.add_argument("--config", required=True, help="the origin's YAML configuration file")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--ban", action="store_true",
                     help="also refuse the node's key under any name from now on (a compromised node; "
                          "if the node itself is sound, delete its data_dir/node.key so it enrolls with a new key)")
    how.add_argument("--unban", action="store_true",
                     help="lift the ban of the keys banned under this name (the name stays free)")
    args = parser.parse_args(argv)
    try:
        protocol.node_name(args.node)
    except errors.BadRequest as exc:
        print(f"shoal-origin: {exc}", file=sys.stderr)
        return 2
    try:
        data_dir = config.load(read_yaml(args.config)).data_dir
    except ConfigError as exc:
        print(f"shoal-origin: config error: {exc}", file=sys.stderr)
        return 2
    database = Path(data_dir) / collector.AUDIT_DB
    try:
        if args.unban:
            lifted = collector.unban(database, args.node)
            print(f"lifted {lifted} ban(s) of keys banned under {args.node!r}")
            return 0 if lifted else 1
        released = collector.forget_node(database, args.node, ban=args.ban)
    except (FileNotFoundError, sqlite3.Error) as exc:
        print(f"shoal-origin: cannot open {str(database)!r}: {exc}", file=sys.stderr)
        return 2
    if released:
        print(f"node {args.node!r} may enroll again with a new key" + (" (its old key is banned)" if args.ban else ""))
        return 0
    print(f"no node named {args.node!r} has enrolled", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["forget-node"]:
        return forget_node(args[1:])
    return run_component("origin", args, flags=FLAGS, load=config.load, build=app.build,
                         epilog="shoal-origin forget-node NAME --config FILE [--ban | --unban]: release an "
                                "enrolled node's name (see forget-node --help)")


if __name__ == "__main__":
    sys.exit(main())
