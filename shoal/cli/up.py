"""`shoal up`: the single-node embedded default. Writes the three components' configurations
(shoal.cluster) and supervises them as child processes; `shoal keygen` makes a cluster's keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import yaml

from shoal import netaddr, protocol
from shoal.cli import preflight
from shoal.cluster import Cluster, command, make_keys
from shoal.config import split_hostport
from shoal.redaction import redact


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


def program(name: str) -> str:
    """How a shell runs the sibling command `name` for the banner's copy-and-paste lines: the bare
    name when PATH finds this installation's, else its path (bin/shoal runs .venv/bin/shoal, whose
    directory a newcomer's PATH does not hold)."""
    here = Path(sys.argv[0])
    if here.name != "shoal":  # `python -m shoal.cli`: no installed script to point at
        return name
    sibling = here.resolve().parent / name
    found = shutil.which(name)
    if (found and Path(found).resolve() == sibling) or not sibling.exists():
        return name
    return shlex.quote(str(sibling))  # (a checkout path with a space in it)


def _upstreams(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The `upstreams` entries (with the registry login where given), one per --upstream."""
    specs: list[str] = args.upstream
    if args.name and len(specs) > 1:
        raise SystemExit("shoal up: --name names one registry; with several --upstream, write NAME=URL")
    n = len(specs)
    for flag, values in (("--username", args.username), ("--password-file", args.password_file)):
        # one per registry, never one for all: a login goes only to the registry it is for
        if len(values) not in (0, n):
            raise SystemExit(f"shoal up: {flag}: give it once per --upstream ({n}), in the same order "
                             "(each registry gets only its own login)")
    if len(args.username) != len(args.password_file):
        # a password file without its user (or the other way round) would be silently unused
        given, missing = (("--username", "--password-file") if len(args.username) > len(args.password_file)
                          else ("--password-file", "--username"))
        raise SystemExit(f"shoal up: {given} needs {missing}: give --username and --password-file together, "
                         "once per --upstream")
    upstreams: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        name, sep, url = spec.partition("=") if "=" in spec.split("://", 1)[0] else ("", "", spec)
        try:
            parts = urlsplit(url)
            _port = parts.port  # (a port that is not a number: a bad URL, not a traceback)
        except ValueError:
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"shoal up: --upstream must be an http(s) URL (or NAME=URL), got {redact(spec)!r}")
        # any "@": a password holding "/", "?" or "#" ("https://user:pa/ss@host") ends the URL's
        # authority early, so urlsplit sees no login and the URL, password and all, went on
        if parts.username is not None or parts.password is not None or "@" in url:
            raise SystemExit("shoal up: --upstream: no login in the URL (it would be printed and logged); "
                             "use --username and --password-file")
        upstream: dict[str, Any] = {"name": (name if sep else args.name) or parts.netloc, "url": url}
        if args.username:
            user, password_file = args.username[i], args.password_file[i]
            if not user:
                raise SystemExit("shoal up: --username: empty; for a registry that needs no login give "
                                 "--username - --password-file - in its place")
            if user != "-":  # "-": this registry takes pulls without a login
                upstream["username"] = user
                upstream["password"] = {"file": str(Path(password_file).resolve())}
        upstreams.append(upstream)
    names = [u["name"] for u in upstreams]
    if len(set(names)) != len(names):
        raise SystemExit(f"shoal up: --upstream: two registries are named alike ({', '.join(names)}); "
                         "give them names with NAME=URL")
    return upstreams


def up_configs(args: argparse.Namespace, data: Path) -> dict[str, dict[str, Any]]:
    """The three components' configurations for a single node."""
    upstreams = _upstreams(args)
    keys = make_keys(data / "keys")
    operators: dict[str, list[str]] = {}
    for spec in args.operator:
        user, sep, roles = spec.partition("=")
        listed = [r.strip() for r in roles.split(",") if r.strip()]
        if not sep or not user or not listed or not set(listed) <= {"seed", "audit", "admin"}:
            raise SystemExit(f"shoal up: --operator must be USER=ROLES with roles among seed, audit, admin, "
                             f"got {spec!r}")
        operators[user] = listed
    # The agent gets the registry login only when it uses it for pulls without credentials: in
    # challenge mode every pull is the puller's own (least privilege: the node holds no password).
    agent_upstreams = upstreams if args.unauthenticated == "node" else \
        [{"name": u["name"], "url": u["url"]} for u in upstreams]
    ip = args.torrent_ip.strip("[]")  # ::1 or [::1]: written as [::1]:PORT below
    cluster = Cluster(keys, upstreams, tracker_url=f"http://{args.tracker_listen}",
                      origin_url=f"http://{args.origin_listen}", log={"level": args.log_level, "format": "text"})
    # operators sign in with their login at the first registry
    origin_extra: dict[str, Any] = {"operators": {"registry": {"upstream": upstreams[0]["name"],
                                                               "roles": operators}}} if operators else {}
    if args.seed_on_push:
        origin_extra["notifications"] = {"token": {"file": str(keys["notification_token"])},
                                         "upstream": upstreams[0]["name"], "rules": _push_rules(args.seed_on_push)}
    agent_extra: dict[str, Any] = {}
    if args.containerd_hosts_dir:
        agent_extra["containerd"] = {"config_path": str(Path(args.containerd_hosts_dir).resolve())}
    return {
        "tracker": cluster.tracker(listen=args.tracker_listen, data_dir=str(data / "tracker")),
        "origin": cluster.origin(listen=args.origin_listen, data_dir=data / "origin",
                                 torrent_listen=netaddr.hostport(ip, args.origin_torrent_port),
                                 cache={"max_bytes": args.origin_cache}, **origin_extra),
        "agent": cluster.agent(listen=args.listen, data_dir=data / "agent",
                               torrent_listen=netaddr.hostport(ip, args.agent_torrent_port),
                               auth={"unauthenticated": args.unauthenticated}, cache={"max_bytes": args.cache},
                               upstreams=agent_upstreams, **agent_extra),
    }


def _push_rules(specs: list[str]) -> list[dict[str, Any]]:
    """--seed-on-push REPO[:TAG] as the origin's notifications.rules (a tag never holds "/")."""
    rules = []
    for spec in specs:
        repo, tag = (spec.rpartition(":")[0], spec.rpartition(":")[2]) if ":" in spec.rsplit("/", 1)[-1] \
            else (spec, "*")
        if not repo or not tag:
            raise SystemExit(f"shoal up: --seed-on-push must be REPO[:TAG] globs, e.g. 'team/*:v*', got {spec!r}")
        rules.append({"repositories": [repo], "tags": [tag]})
    return rules


def cmd_keygen(args: argparse.Namespace) -> int:
    paths = make_keys(Path(args.directory))
    for name, path in paths.items():
        print(f"{name:20} {path}")
    return 0


def _wait_ready(listen: str, proc: subprocess.Popen[bytes], stopping: Callable[[], bool],
                timeout: float = 60.0) -> bool:
    """Until the child answers /readyz on `listen`. The answer counts only while the child is
    alive and holds the listening socket itself: another shoal on that port answers too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(protocol.READYZ.url(f"http://{listen}"),  # noqa: S310 (http, ours)
                                        timeout=1.0) as resp:
                if resp.status == 200 and proc.poll() is None and preflight.owns_listener(proc.pid, listen):
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def _preflight(args: argparse.Namespace, configs: dict[str, dict[str, Any]]) -> None:
    """SystemExit (status 2 for flags, 1 for the registry), a line per problem, before anything starts."""
    ip = args.torrent_ip.strip("[]")
    ports = [preflight.Port(flag, *split_hostport(value)) for flag, value in (
        ("--listen", args.listen), ("--tracker-listen", args.tracker_listen), ("--origin-listen", args.origin_listen))]
    ports += [preflight.Port("--agent-torrent-port", ip, args.agent_torrent_port),
              preflight.Port("--origin-torrent-port", ip, args.origin_torrent_port)]
    problems = preflight.busy_ports(ports)
    if problems:
        for line in problems:
            print(f"shoal up: {line}", file=sys.stderr)
        raise SystemExit(2)
    # the origin's upstreams hold the seeder's logins (the agent's only in node mode)
    logins = [preflight.Login(u["url"], u.get("username"), (u.get("password") or {}).get("file"))
              for u in configs["origin"]["upstreams"]]
    problems = asyncio.run(preflight.registry_problems(logins))
    if not args.username:  # (`--username -` says a registry needs no login: not asked again)
        for login in logins:
            realm = asyncio.run(preflight.basic_login_wanted(login.url))
            if realm is not None:
                problems.append(f"the registry asks for a login (realm {realm!r}) and none is given: the origin "
                                "could fetch and pre-seed nothing; give --username and --password-file "
                                f"(--upstream {login.url})")
    if problems:
        for line in problems:
            print(f"shoal up: {line}", file=sys.stderr)
        raise SystemExit(1)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (Linux prctl)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cmd_up(args: argparse.Namespace) -> int:
    data = Path(args.data_dir).expanduser().resolve() if args.data_dir else _default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    configs = up_configs(args, data)
    _preflight(args, configs)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = 0
    try:
        for name in ("tracker", "origin", "agent"):
            path = data / f"{name}.yaml"
            path.write_text(yaml.safe_dump(configs[name], sort_keys=False))
            # Each child in its own session: Ctrl-C reaches only this supervisor, which stops
            # each child with one SIGTERM. (With the terminal's SIGINT on top, a second signal
            # cut the origin's cleanup short and it logged unclosed sessions.) The children
            # still go with the supervisor if it is killed outright.
            procs[name] = subprocess.Popen(command(name, path),
                                           start_new_session=True, preexec_fn=_die_with_parent)
            if not _wait_ready(configs[name]["listen"], procs[name], lambda: stopping):
                if stopping:
                    return 0
                print(f"shoal up: {name} failed to start (see its messages above)", file=sys.stderr)
                return 1
        upstreams = configs["agent"]["upstreams"]
        operator_token = data / "keys" / "operator.token"
        anonymous = ("use the node credentials" if args.unauthenticated == "node"
                     else "get the registry's challenge (ctr --user, podman login)")
        shoal = program("shoal")
        token_file = shlex.quote(str(operator_token))  # the banner's lines are pasted into a shell
        operators_file = shlex.quote(str(data / "keys" / "operators.json"))
        served = "\n".join(f"  {u['url']} (clients call it {u['name']})" for u in upstreams)
        if args.containerd_hosts_dir:
            containerd = "".join(f"containerd: the agent keeps {args.containerd_hosts_dir}/{u['name']}/hosts.toml "
                                 "(through the agent while it is ready)\n" for u in upstreams) + "\n"
        else:
            mirror = f"http://{args.listen}"
            # containerd 1.6 cannot read a table header with "]" in its key (an IPv6 mirror)
            host = (f"  [host]\n    \"{mirror}\" = {{ capabilities = [\"pull\", \"resolve\"] }}\n" if "[" in mirror
                    else f"  [host.\"{mirror}\"]\n    capabilities = [\"pull\", \"resolve\"]\n")
            containerd = "".join(f"containerd: /etc/containerd/certs.d/{u['name']}/hosts.toml "
                                 "(or let the agent keep it: --containerd-hosts-dir)\n"
                                 f"  server = \"{u['url']}\"\n{host}\n"
                                 for u in upstreams)
        print(f"\nshoal is up for\n{served}\n"
              f"  mirror  http://{args.listen}   tracker http://{args.tracker_listen}   "
              f"origin http://{args.origin_listen}\n"
              f"  data    {data}\n\n" + containerd +
              f"pre-seed:  {shoal} seed --origin http://{args.origin_listen} "
              f"--token-file {token_file} {upstreams[0]['name']}/REPO:TAG\n"
              + (f"on push:   the registry's notifications endpoint: url http://{args.origin_listen}"
                 f"{protocol.NOTIFICATIONS.path()}, headers Authorization: [\"Bearer <the content of {data / 'keys'}"
                 "/notification.token>\"] (README \"Pre-seed on push\")\n" if args.seed_on_push else "") +
              f"audit:     {shoal} audit --origin http://{args.origin_listen} --token-file {token_file}\n"
              f"status:    {shoal} status --agent http://{args.listen} --origin http://{args.origin_listen} "
              f"--tracker http://{args.tracker_listen}\n"
              f"           (a local admin operator; add others: {program('shoal-origin')} add-operator NAME "
              f"--roles seed --repositories '{upstreams[0]['name']}/*' --operators {operators_file}"
              + (f", or sign in as {', '.join(args.operator)}: {shoal} seed --user USER ..." if args.operator else
                 "; or let registry users sign in: --operator USER=ROLES") + ")\n"
              f"auth: pulls without credentials {anonymous}\n"
              "Ctrl-C stops all three.", flush=True)
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"shoal up: {name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping, rc = True, 1
            time.sleep(0.2)
    finally:
        # Ctrl-C (or SIGTERM) from here on stops the children in order; another one is not a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # One at a time, the agent first: its pulls in flight finish from the swarm while the
        # origin and the tracker still run (stopped together, a pull's swarm stalled with the
        # origin and the agent fetched the rest from the registry, 13-20 s, before it exited).
        for proc in reversed(list(procs.values())):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()  # gone (and its ports closed) before `shoal up` returns
        if procs:
            names = list(procs)
            stopped = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
            print(f"shoal up: stopped {stopped} (their data stays in {data})", flush=True)
    return rc


