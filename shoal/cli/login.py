"""The operator credential `shoal seed` and `shoal audit` present to the origin: a shoal operator
token, or a registry login in the forms containerd, podman and skopeo users know (user and
password, a containers auth.json / docker config.json, a token from the registry's token
server). Never the node token. Errors are one line and never show a secret."""

from __future__ import annotations

import argparse
import base64
import binascii
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from shoal.operator_tokens import TOKEN_PREFIX

TOKEN_ENV = "SHOAL_OPERATOR_TOKEN_FILE"  # noqa: S105 (a variable name)
NO_CREDENTIAL = (f"no operator credential: give --token-file FILE (or ${TOKEN_ENV}), --user USER, --authfile FILE "
                 "or --registry-token-file FILE")


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("operator credential (one of; never the node token)")
    group.add_argument("--token-file", help=f"file holding a shoal operator token (default: ${TOKEN_ENV})")
    group.add_argument("--user", metavar="USER[:PASSWORD]",
                       help="registry login; without :PASSWORD it is asked for (or read with --password-stdin)")
    group.add_argument("--password-stdin", action="store_true", help="read the --user password from standard input")
    group.add_argument("--authfile", metavar="FILE",
                       help="containers auth.json or docker config.json holding a login for the registry (without "
                            "any credential option: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, "
                            "~/.config/containers/auth.json, ~/.docker/config.json are searched)")
    group.add_argument("--registry-token-file", metavar="FILE", help="file holding a token from the registry's "
                                                                    "token server")
    group.add_argument("--registry", metavar="HOST[:PORT]",
                       help="which registry's login to take from an auth file (default: the images' registry)")


def authorization(args: argparse.Namespace, registry: str | None = None) -> str:
    """The Authorization value to send, from the options (SystemExit with one line if none or
    several are given, or one cannot be used)."""
    given = [flag for flag, value in (("--token-file", args.token_file), ("--user", args.user),
                                      ("--authfile", args.authfile),
                                      ("--registry-token-file", args.registry_token_file)) if value]
    if len(given) > 1:
        raise SystemExit(f"shoal: give one operator credential, not {' and '.join(given)}")
    if args.password_stdin and not args.user:
        raise SystemExit("shoal: --password-stdin needs --user")
    host = args.registry or registry
    if args.token_file:
        return _operator_token(args.token_file, "--token-file")
    if args.user:
        return _basic(*_login(args.user, args.password_stdin))
    if args.registry_token_file:
        token = _read(args.registry_token_file, "--registry-token-file")
        if not token or any(c.isspace() for c in token) or not token.isascii():
            raise SystemExit(f"shoal: {args.registry_token_file!r} does not hold a single token")
        return f"Bearer {token}"
    if args.authfile:
        return _from_authfile(Path(args.authfile), host, required=True) or ""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return _operator_token(env, f"${TOKEN_ENV}")
    searched = _default_authfiles()
    for path in searched:
        if path.is_file():
            found = _from_authfile(path, host, required=False)
            if found:
                return found
    raise SystemExit(f"shoal: {NO_CREDENTIAL} (no login for {host or 'the registry'} in "
                     f"{', '.join(str(p) for p in searched)})")


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"shoal: {what}: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"shoal: {what}: {path!r} is not text") from None


def _operator_token(path: str, what: str) -> str:
    token = _read(path, what)
    if not token.startswith(TOKEN_PREFIX) or any(c.isspace() for c in token) or not token.isascii():
        # (the node token file, most likely: it no longer opens operator routes)
        raise SystemExit(f"shoal: {what}: {path!r} does not hold a shoal operator token ({TOKEN_PREFIX}...; "
                         "shoal-origin add-operator issues them)")
    return f"Bearer {token}"


def _login(user: str, password_stdin: bool) -> tuple[str, str]:
    name, sep, password = user.partition(":")
    if not name:
        raise SystemExit("shoal: --user needs a user name")
    if sep:
        return name, password
    if password_stdin:
        return name, sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise SystemExit("shoal: no password for --user (give --password-stdin, or run at a terminal)")
    try:
        return name, getpass.getpass(f"password for {name}: ")
    except (EOFError, KeyboardInterrupt):
        raise SystemExit("shoal: no password given") from None


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _default_authfiles() -> list[Path]:
    """Where podman, skopeo and docker keep logins, in their order of precedence."""
    paths = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    else:  # podman's own fallback without a runtime directory (root on a plain server: /run/containers/0)
        paths.append(Path("/run/containers") / str(os.getuid()) / "auth.json")
    home = Path.home()
    paths += [home / ".config" / "containers" / "auth.json", home / ".docker" / "config.json"]
    return paths


def _host_of(key: str) -> str:
    """An `auths` key as a bare host[:port] ("https://host/v1/" in old docker files)."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def _from_authfile(path: Path, host: str | None, *, required: bool) -> str | None:
    try:
        doc: Any = json.loads(path.read_text())
    except OSError as exc:
        raise SystemExit(f"shoal: --authfile: cannot read {str(path)!r}: {exc.strerror}") from None
    except ValueError:
        raise SystemExit(f"shoal: {str(path)!r} is not a JSON auth file") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    entries = {_host_of(k): v for k, v in auths.items()} if isinstance(auths, dict) else {}
    if host is None:
        if len(entries) != 1:
            if not required:
                return None
            raise SystemExit(f"shoal: {str(path)!r}: say which registry's login to use with --registry HOST")
        host = next(iter(entries))
    entry = entries.get(host)
    if not isinstance(entry, dict) or not entry.get("auth"):
        helpers = isinstance(doc, dict) and (doc.get("credsStore") or host in (doc.get("credHelpers") or {}))
        if isinstance(entry, dict) and entry.get("identitytoken"):
            reason = "holds an identity token for it, which shoal does not support (use --user)"
        elif helpers:
            reason = "sends it to a credential helper, which shoal does not support (use --user)"
        else:
            reason = "has no login for it"
        if not required and not isinstance(entry, dict) and not helpers:
            return None
        raise SystemExit(f"shoal: {str(path)!r} {reason}: {host}")
    try:
        user, sep, _password = base64.b64decode(str(entry["auth"]), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        user, sep = "", ""
    if not sep or not user:
        raise SystemExit(f"shoal: {str(path)!r}: the login for {host} is not base64(user:password)")
    return f"Basic {entry['auth']}"
