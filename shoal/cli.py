"""`shoal`, the operator CLI: `up` (single node, embedded default), `seed` (pre-seed images),
`status` (cache and swarm state).

`shoal up` runs the tracker, origin and agent as three child processes (components never import
each other; the CLI only writes their configuration and supervises them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import yaml

from shoal import protocol
from shoal.cluster import Cluster, make_keys

DEFAULT_ORIGIN = "http://127.0.0.1:6970"


def _http(method: str, url: str, body: Any = None, *, timeout: float = 10.0,
          token: str | None = None, raw_text: bool = False) -> tuple[int, Any]:
    if not url.startswith(("http://", "https://")):
        raise urllib.error.URLError(f"not an http(s) URL: {url}")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 (scheme checked above)
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (operator-given URL)
            raw = resp.read()
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), int(exc.code)
    if raw_text and 200 <= status < 300:
        return status, raw.decode(errors="replace")
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


# ----- shoal seed ---------------------------------------------------------------------------------


def _node_token(args: argparse.Namespace) -> str | None:
    path = args.node_token_file or os.environ.get("SHOAL_NODE_TOKEN_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"shoal: cannot read the node token file {path!r}: {exc.strerror}") from None


def cmd_seed(args: argparse.Namespace) -> int:
    origin = args.origin.rstrip("/")
    token = _node_token(args)
    try:
        status, job = _http("POST", protocol.PRESEED.url(origin),
                            protocol.PreseedRequest(args.images, args.platform).to_json(), token=token)
    except (urllib.error.URLError, OSError) as exc:
        print(f"shoal seed: cannot reach the origin at {origin}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if status != 202 or not isinstance(job, dict):
        message = job["errors"][0]["message"] if isinstance(job, dict) and job.get("errors") else job
        print(f"shoal seed: origin refused the request ({status}): {message}", file=sys.stderr)
        return 1
    print(f"pre-seed job {job['id']}: {', '.join(job['images'])}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    tty = sys.stdout.isatty()
    last_line = ""
    while True:
        status, job = _http("GET", protocol.PRESEED_JOB.url(origin, job=str(job['id'])), token=token)
        if status != 200 or not isinstance(job, dict):
            print(f"shoal seed: lost the job ({status})", file=sys.stderr)
            return 1
        total, done = job["bytes_total"], job["bytes_done"]
        pct = 100.0 * done / total if total else (100.0 if job["state"] == "done" else 0.0)
        line = (f"[{job['state']}] {job['blobs_done']}/{job['blobs_total']} blobs, "
                f"{_size(done)} / {_size(total)} ({pct:.0f}%)")
        if line != last_line:
            print(("\r" + line.ljust(70)) if tty else line, end="" if tty else "\n", flush=True)
            last_line = line
        if job["state"] in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            print(f"\nshoal seed: still running after {args.timeout:g}s; job {job['id']} continues",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    if tty:
        print()
    for manifest in job["manifests"]:
        print(f"  manifest {manifest}")
    print(f"{job['state']}: {job['blobs_done']} blobs ({_size(job['bytes_done'])}) seeded "
          f"in {job['elapsed_seconds']:.1f}s")
    for error in job["errors"]:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if job["state"] == "done" else 1


# ----- shoal audit --------------------------------------------------------------------------------

AUDIT_COLUMNS = ("ts", "node", "principal", "method", "kind", "repository", "reference", "digest", "status",
                 "bytes", "source", "authz_method", "outcome")


def cmd_audit(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("image", args.image), ("repository", args.repository), ("digest", args.digest),
                               ("principal", args.principal), ("node", args.node), ("since", args.since),
                               ("until", args.until)) if v}
    query["limit"] = str(args.limit)
    query["format"] = "json" if args.format == "table" else args.format
    url = protocol.AUDIT.url(args.origin, query)
    try:
        status, body = _http("GET", url, token=_node_token(args), timeout=60, raw_text=args.format != "table")
    except (urllib.error.URLError, OSError) as exc:
        print(f"shoal audit: cannot reach the origin at {args.origin}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if status != 200:
        message = body["errors"][0]["message"] if isinstance(body, dict) and body.get("errors") else body
        print(f"shoal audit: origin answered {status}: {message}", file=sys.stderr)
        return 1
    if args.format != "table":
        sys.stdout.write(body)
        return 0
    events = body["events"]
    rows = [[_short(e.get(c)) for c in AUDIT_COLUMNS] for e in events]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(AUDIT_COLUMNS)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(AUDIT_COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"{len(events)} event(s)", file=sys.stderr)
    return 0


def _short(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text[:19] if text.startswith("sha256:") else text


# ----- shoal status -------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    rc = 0
    for label, url in (("agent", args.agent), ("origin", args.origin), ("tracker", args.tracker)):
        if not url:
            continue
        try:
            status, doc = _http("GET", protocol.STATUS.url(url))
        except (urllib.error.URLError, OSError) as exc:
            print(f"{label:8} {url}: unreachable ({getattr(exc, 'reason', exc)})")
            rc = 1
            continue
        if status != 200 or not isinstance(doc, dict):
            print(f"{label:8} {url}: HTTP {status}")
            rc = 1
            continue
        doc.pop("blobs", None)
        summary = ", ".join(f"{k}={_size(v) if k.endswith('bytes') else v}" for k, v in doc.items())
        print(f"{label:8} {url}: {summary}")
    return rc


# ----- shoal up -----------------------------------------------------------------------------------


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "shoal"


def up_configs(args: argparse.Namespace, data: Path) -> dict[str, dict[str, Any]]:
    """The three components' configurations for a single node."""
    parts = urlsplit(args.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"shoal up: --upstream must be an http(s) URL, got {args.upstream!r}")
    name = args.name or parts.netloc
    keys = make_keys(data / "keys")
    upstream: dict[str, Any] = {"name": name, "url": args.upstream}
    if args.username:
        if not args.password_file:
            raise SystemExit("shoal up: --username needs --password-file")
        upstream["username"] = args.username
        upstream["password"] = {"file": str(Path(args.password_file).resolve())}
    ip = args.torrent_ip
    cluster = Cluster(keys, [upstream], tracker_url=f"http://{args.tracker_listen}",
                      origin_url=f"http://{args.origin_listen}", log={"level": args.log_level, "format": "text"})
    return {
        "tracker": cluster.tracker(listen=args.tracker_listen, data_dir=str(data / "tracker")),
        "origin": cluster.origin(listen=args.origin_listen, data_dir=data / "origin",
                                 torrent_listen=f"{ip}:{args.origin_torrent_port}",
                                 cache={"max_bytes": args.origin_cache}),
        "agent": cluster.agent(listen=args.listen, data_dir=data / "agent",
                               torrent_listen=f"{ip}:{args.agent_torrent_port}",
                               auth={"unauthenticated": args.unauthenticated}, cache={"max_bytes": args.cache}),
    }


def cmd_keygen(args: argparse.Namespace) -> int:
    paths = make_keys(Path(args.directory))
    for name, path in paths.items():
        print(f"{name:20} {path}")
    return 0


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            status, _ = _http("GET", protocol.READYZ.url(url), timeout=1.0)
            if status == 200:
                return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


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
            procs[name] = subprocess.Popen([sys.executable, "-m", name, "--config", str(path)],
                                           start_new_session=True, preexec_fn=_die_with_parent)
            if not _wait_ready(f"http://{configs[name]['listen']}", procs[name]):
                print(f"shoal up: {name} failed to start (see its messages above)", file=sys.stderr)
                return 1
        upstream = configs["agent"]["upstreams"][0]
        anonymous = ("use the node credentials" if args.unauthenticated == "node"
                     else "get the registry's challenge (ctr --user, podman login)")
        print(f"\nshoal is up for {upstream['url']} (clients call it {upstream['name']})\n"
              f"  mirror  http://{args.listen}   tracker http://{args.tracker_listen}   "
              f"origin http://{args.origin_listen}\n"
              f"  data    {data}\n\n"
              f"containerd: /etc/containerd/certs.d/{upstream['name']}/hosts.toml\n"
              f"  server = \"{upstream['url']}\"\n"
              f"  [host.\"http://{args.listen}\"]\n    capabilities = [\"pull\", \"resolve\"]\n\n"
              f"pre-seed:  shoal seed --origin http://{args.origin_listen} "
              f"--node-token-file {data / 'keys' / 'node.token'} {upstream['name']}/REPO:TAG\n"
              f"auth: pulls without credentials {anonymous}\n"
              "Ctrl-C stops all three.", flush=True)
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"shoal up: {name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping, rc = True, 1
            time.sleep(0.2)
    finally:
        for proc in reversed(list(procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rc


# ----- entry ---------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description="shoal: P2P pull-through cache for registries")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run tracker, origin and agent for one upstream on this node")
    up.add_argument("--upstream", required=True, help="origin registry URL, e.g. https://registry.example.com")
    up.add_argument("--name", help="how clients name the registry (host[:port]); default: the URL's host")
    up.add_argument("--username", help="registry user for the node and the origin seeder")
    up.add_argument("--password-file", help="file holding that user's password")
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
    up.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    up.set_defaults(func=cmd_up)

    seed = sub.add_parser("seed", help="pre-seed images (tags or digests) at the origin")
    seed.add_argument("images", nargs="+", metavar="IMAGE", help="registry/name:tag or registry/name@digest")
    seed.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"origin URL (default {DEFAULT_ORIGIN})")
    seed.add_argument("--platform", action="append", default=[],
                      help="only this platform of an index, e.g. linux/amd64 (repeatable; default all)")
    seed.add_argument("--no-wait", action="store_true", help="submit and return without following progress")
    seed.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the job")
    seed.add_argument("--node-token-file", help="file holding the cluster's node token "
                      "(default: $SHOAL_NODE_TOKEN_FILE)")
    seed.set_defaults(func=cmd_seed)

    aud = sub.add_parser("audit", help="query the pull journal at the origin's collector")
    aud.add_argument("--origin", default=DEFAULT_ORIGIN, help=f"origin URL (default {DEFAULT_ORIGIN})")
    aud.add_argument("--image", help="registry/name[:tag][@digest]")
    aud.add_argument("--repository", help="repository name, e.g. team/app")
    aud.add_argument("--digest", help="blob or manifest digest")
    aud.add_argument("--principal", help="user the registry confirmed")
    aud.add_argument("--node", help="agent node name")
    aud.add_argument("--since", help="RFC 3339 UTC time, e.g. 2026-11-27T00:00:00Z")
    aud.add_argument("--until", help="RFC 3339 UTC time (exclusive)")
    aud.add_argument("--limit", type=int, default=1000)
    aud.add_argument("--format", choices=["table", "jsonl", "csv", "json"], default="table")
    aud.add_argument("--node-token-file", help="file holding the cluster's node token "
                     "(default: $SHOAL_NODE_TOKEN_FILE)")
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


if __name__ == "__main__":
    sys.exit(main())
