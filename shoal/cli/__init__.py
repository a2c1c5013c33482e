"""`shoal`, the operator CLI: `up` (single node, embedded default), `seed` (pre-seed images),
`audit` (query the journal), `status` (cache and swarm state). `seed` and `audit` present an
operator credential (shoal.cli.login), never the node token.

`shoal up` runs the tracker, origin and agent as three child processes (components never import
each other; the CLI only writes their configuration and supervises them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shoal.cli import login
from shoal.cli.audit import cmd_audit
from shoal.cli.common import DEFAULT_ORIGIN
from shoal.cli.seed import cmd_seed
from shoal.cli.status import cmd_status
from shoal.cli.up import cmd_keygen, cmd_up
from shoal.cliargs import HelpFormatter, VersionAction


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="shoal: P2P pull-through cache for registries",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    up = command("up", "run tracker, origin and agent for one or more registries on this node")
    up.add_argument("--upstream", required=True, action="append", metavar="[NAME=]URL",
                    help="a registry URL, e.g. https://registry.example.com (repeatable: one per registry); "
                         "NAME= sets how clients name it (without it: the URL's host[:port])")
    up.add_argument("--name", help="how clients name the registry, with one --upstream (or use NAME=URL)")
    up.add_argument("--username", action="append", default=[],
                    help="registry user the origin seeder fetches with (and the agent, for pulls without "
                         "credentials, with --unauthenticated node): once per --upstream, in the same order "
                         "(each registry gets only its own login; '-' for one that needs none); needs --password-file")
    up.add_argument("--password-file", action="append", default=[],
                    help="file holding that user's password (as often as --username, which it needs)")
    up.add_argument("--data-dir", help="state directory (without it: $XDG_DATA_HOME/shoal, else "
                    "~/.local/share/shoal)")
    up.add_argument("--listen", default="127.0.0.1:5050", help="mirror address for containerd/podman")
    up.add_argument("--tracker-listen", default="127.0.0.1:6969", help="the tracker's HTTP address")
    up.add_argument("--origin-listen", default="127.0.0.1:6970", help="the origin's HTTP address (shoal seed, "
                                                                      "shoal audit)")
    up.add_argument("--torrent-ip", default="127.0.0.1", help="address BitTorrent listens and announces on")
    up.add_argument("--agent-torrent-port", type=int, default=6881, help="the agent's BitTorrent (TLS) port")
    up.add_argument("--origin-torrent-port", type=int, default=6882, help="the origin seeder's BitTorrent (TLS) port")
    up.add_argument("--cache", default="20GiB", help="agent cache budget")
    up.add_argument("--unauthenticated", choices=["challenge", "node"], default="challenge",
                    help="pulls without credentials: relay the registry's challenge, or use the "
                         "node credentials (--username) for them")
    up.add_argument("--origin-cache", default="50GiB", help="origin cache budget")
    up.add_argument("--operator", action="append", default=[], metavar="USER=ROLES",
                    help="a registry user who may sign in as an operator with their registry login, and their "
                         "roles, e.g. alice=seed,audit (repeatable; seed, audit, admin); the local admin token "
                         "works without it")
    up.add_argument("--containerd-hosts-dir", metavar="DIR",
                    help="containerd's hosts directory (its config_path, e.g. /etc/containerd/certs.d): the agent "
                         "keeps DIR/<name>/hosts.toml pointing at itself while it is ready (without it: "
                         "the banner shows the hosts.toml to write)")
    up.add_argument("--seed-on-push", action="append", default=[], metavar="REPO[:TAG]",
                    help="pre-seed what the registry reports pushed to repositories matching REPO and tags "
                         "matching TAG (globs, e.g. 'team/*:v*'; TAG default '*'; repeatable): the origin takes "
                         "the registry's notifications (README \"Pre-seed on push\")")
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="the components' log level")
    up.set_defaults(func=cmd_up)

    seed = command("seed", "pre-seed images (tags or digests) at the origin")
    seed.add_argument("images", nargs="*", metavar="IMAGE", help="registry/name:tag or registry/name@digest")
    seed.add_argument("--origin", action="append", default=None,
                      help=f"origin URL (without it: {DEFAULT_ORIGIN}); repeat it for several origins: the first "
                           "that can be reached takes the job, and has each blob seeded by its owners")
    seed.add_argument("--platform", action="append", default=[],
                      help="only this platform of an index, e.g. linux/amd64 (repeatable; without it: all)")
    seed.add_argument("--no-wait", action="store_true", help="submit and return without following progress")
    seed.add_argument("--follow", metavar="JOB", help="follow a job submitted before (its id), instead of "
                                                     "submitting one")
    seed.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the job")
    login.add_options(seed)
    seed.set_defaults(func=cmd_seed)

    aud = command("audit", "query the pull journal at the origin's collector")
    aud.add_argument("--origin", default=DEFAULT_ORIGIN, help="the origin's URL (its collector)")
    aud.add_argument("--image", help="registry/name[:tag][@digest]")
    aud.add_argument("--repository", help="repository name, e.g. team/app")
    aud.add_argument("--digest", help="blob or manifest digest")
    aud.add_argument("--principal", help="user the registry confirmed, or an operator (token:NAME for a token)")
    aud.add_argument("--node", help="agent node name")
    aud.add_argument("--since", help="RFC 3339 UTC time, e.g. 2026-11-27T00:00:00Z")
    aud.add_argument("--until", help="RFC 3339 UTC time (exclusive)")
    aud.add_argument("--limit", type=int, default=1000, help="at most this many events")
    aud.add_argument("--format", choices=["table", "jsonl", "csv", "json"], default="table",
                     help="a table for people, or the collector's own JSON lines, CSV or JSON")
    login.add_options(aud)
    aud.set_defaults(func=cmd_audit)

    keygen = command("keygen", "create the cluster's keys and tokens in a directory (kept if present)")
    keygen.add_argument("directory", help="where the keys go (created if missing)")
    keygen.set_defaults(func=cmd_keygen)

    status = command("status", "show cache and swarm state")
    status.add_argument("--agent", default="http://127.0.0.1:5050", help="the agent's URL ('' to skip it)")
    status.add_argument("--origin", default=DEFAULT_ORIGIN, help="the origin's URL ('' to skip it)")
    status.add_argument("--tracker", default="http://127.0.0.1:6969", help="the tracker's URL ('' to skip it)")
    status.add_argument("--format", choices=["table", "json"], default="table",
                        help="a table for people, or JSON (each component's status document)")
    status.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C outside what a command handles itself (a password prompt, a table being
        # printed): a line, not a traceback; 130 as shells report a SIGINT.
        print(f"\nshoal {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc
