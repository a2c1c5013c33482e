"""`shoal`, the operator CLI: `up` (single node, embedded default), `seed` (pre-seed images),
`audit` (query the journal), `status` (cache and swarm state). `seed` and `audit` present an
operator credential (shoal.cli.login), never the node token.

`shoal up` runs the tracker, origin and agent as three child processes (components never import
each other; the CLI only writes their configuration and supervises them).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from shoal.cli import login
from shoal.cli.audit import cmd_audit
from shoal.cli.common import DEFAULT_ORIGIN
from shoal.cli.seed import cmd_seed
from shoal.cli.status import cmd_status
from shoal.cli.up import cmd_keygen, cmd_up


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="shoal: P2P pull-through cache for registries")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run tracker, origin and agent for one or more registries on this node")
    up.add_argument("--upstream", required=True, action="append", metavar="[NAME=]URL",
                    help="a registry URL, e.g. https://registry.example.com (repeatable: one per registry); "
                         "NAME= sets how clients name it (default: the URL's host[:port])")
    up.add_argument("--name", help="how clients name the registry, with one --upstream (or use NAME=URL)")
    up.add_argument("--username", action="append", default=[],
                    help="registry user for the node and the origin seeder: once per --upstream, in the same "
                         "order (each registry gets only its own login; '-' for one that needs none)")
    up.add_argument("--password-file", action="append", default=[],
                    help="file holding that user's password (as often as --username)")
    up.add_argument("--data-dir", help="state directory (default: $XDG_DATA_HOME/shoal)")
    up.add_argument("--listen", default="127.0.0.1:5050", help="mirror address for containerd/podman")
    up.add_argument("--tracker-listen", default="127.0.0.1:6969")
    up.add_argument("--origin-listen", default="127.0.0.1:6970")
    up.add_argument("--torrent-ip", default="127.0.0.1", help="address BitTorrent listens and announces on")
    up.add_argument("--agent-torrent-port", type=int, default=6881)
    up.add_argument("--origin-torrent-port", type=int, default=6882)
    up.add_argument("--cache", default="20GiB", help="agent cache budget")
    up.add_argument("--unauthenticated", choices=["challenge", "node"], default="challenge",
                    help="pulls without credentials: relay the registry's challenge (default) or use the "
                         "node credentials (--username) for them")
    up.add_argument("--origin-cache", default="50GiB", help="origin cache budget")
    up.add_argument("--operator", action="append", default=[], metavar="USER=ROLES",
                    help="a registry user who may sign in as an operator with their registry login, and their "
                         "roles, e.g. alice=seed,audit (repeatable; seed, audit, admin); the local admin token "
                         "works without it")
    up.add_argument("--containerd-hosts-dir", metavar="DIR",
                    help="containerd's hosts directory (its config_path, e.g. /etc/containerd/certs.d): the agent "
                         "keeps DIR/<name>/hosts.toml pointing at itself while it is ready")
    up.add_argument("--seed-on-push", action="append", default=[], metavar="REPO[:TAG]",
                    help="pre-seed what the registry reports pushed to repositories matching REPO and tags "
                         "matching TAG (globs, e.g. 'team/*:v*'; TAG default '*'; repeatable): the origin takes "
                         "the registry's notifications (README \"Pre-seed on push\")")
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    up.set_defaults(func=cmd_up)

    seed = sub.add_parser("seed", help="pre-seed images (tags or digests) at the origin")
    seed.add_argument("images", nargs="+", metavar="IMAGE", help="registry/name:tag or registry/name@digest")
    seed.add_argument("--origin", action="append", default=None,
                      help=f"origin URL (default {DEFAULT_ORIGIN}); repeat it for several origins: the first "
                           "that can be reached takes the job, and has each blob seeded by its owners")
    seed.add_argument("--platform", action="append", default=[],
                      help="only this platform of an index, e.g. linux/amd64 (repeatable; default all)")
    seed.add_argument("--no-wait", action="store_true", help="submit and return without following progress")
    seed.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the job")
    login.add_options(seed)
    seed.set_defaults(func=cmd_seed)

    aud = sub.add_parser("audit", help="query the pull journal at the origin's collector")
    aud.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"origin URL (default {DEFAULT_ORIGIN})")
    aud.add_argument("--image", help="registry/name[:tag][@digest]")
    aud.add_argument("--repository", help="repository name, e.g. team/app")
    aud.add_argument("--digest", help="blob or manifest digest")
    aud.add_argument("--principal", help="user the registry confirmed, or an operator (token:NAME for a token)")
    aud.add_argument("--node", help="agent node name")
    aud.add_argument("--since", help="RFC 3339 UTC time, e.g. 2026-11-27T00:00:00Z")
    aud.add_argument("--until", help="RFC 3339 UTC time (exclusive)")
    aud.add_argument("--limit", type=int, default=1000)
    aud.add_argument("--format", choices=["table", "jsonl", "csv", "json"], default="table")
    login.add_options(aud)
    aud.set_defaults(func=cmd_audit)

    keygen = sub.add_parser("keygen", help="create the cluster's keys and tokens in a directory (kept if present)")
    keygen.add_argument("directory")
    keygen.set_defaults(func=cmd_keygen)

    status = sub.add_parser("status", help="show cache and swarm state")
    status.add_argument("--agent", default="http://127.0.0.1:5050")
    status.add_argument("--origin", default=DEFAULT_ORIGIN)
    status.add_argument("--tracker", default="http://127.0.0.1:6969")
    status.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rc: int = args.func(args)
    return rc

