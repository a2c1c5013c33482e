"""The origin's static operator tokens: a file of operators, each with a name, roles, the
repositories it may pre-seed, and the SHA-256 of its token (never the token itself).

`shoal-origin add-operator` and `shoal up` write the file (shoal.cluster, the CLI); the origin
reads it (origin/operators.py). A token is `shoal_op_` + 32 random bytes, base64url: the prefix
tells a shoal operator token from a registry's, so the origin never forwards one to the registry.

Why a bare SHA-256 is enough here, where passwords need a slow salted hash: the tokens are
generated, 256 bits of randomness each, never chosen by a person. A stolen file gives hashes
whose preimages cannot be guessed or looked up; a slow hash would only slow every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import atomic

ROLES = ("seed", "audit", "admin")
TOKEN_PREFIX = "shoal_op_"  # noqa: S105 (a prefix, not a secret)
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
MAX_GLOB = 512


class TokenFileError(ValueError):
    """The operators file cannot be used; the message says why (never a token)."""


@dataclass(frozen=True, slots=True)
class StaticOperator:
    name: str
    sha256: str  # hex of the token's SHA-256
    roles: tuple[str, ...]
    # `registry/name` globs (fnmatch, `*` crosses `/`) this operator may pre-seed with the seed
    # role; none by default: a token that leaks seeds nothing it was not meant to.
    repositories: tuple[str, ...] = ()
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "roles": list(self.roles),
                "repositories": list(self.repositories), "created": self.created}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise TokenFileError(f"operator name {name!r}: use a-z, 0-9, '.', '_', '-' (at most 64 characters)")
    return name


def check_roles(roles: list[str] | tuple[str, ...], where: str = "roles") -> tuple[str, ...]:
    if not roles:
        raise TokenFileError(f"{where}: give at least one of {', '.join(ROLES)}")
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise TokenFileError(f"{where}: unknown role {unknown[0]!r} (roles are {', '.join(ROLES)})")
    return tuple(dict.fromkeys(roles))


def check_globs(globs: list[str] | tuple[str, ...], where: str = "repositories") -> tuple[str, ...]:
    for glob in globs:
        if not isinstance(glob, str) or not 0 < len(glob) <= MAX_GLOB or "/" not in glob:
            raise TokenFileError(f"{where}: expected registry/name globs such as 'registry:5000/team/*'")
    return tuple(globs)


def _operator(doc: Any, i: int) -> StaticOperator:
    where = f"operators[{i}]"
    if not isinstance(doc, dict):
        raise TokenFileError(f"{where}: expected an object")
    unknown = set(doc) - {"name", "sha256", "roles", "repositories", "created"}
    if unknown:
        raise TokenFileError(f"{where}.{sorted(unknown)[0]}: unknown key")
    name, digest, roles = doc.get("name"), doc.get("sha256"), doc.get("roles")
    repositories, created = doc.get("repositories", []), doc.get("created", "")
    if not isinstance(name, str):
        raise TokenFileError(f"{where}.name: expected a string")
    if not isinstance(digest, str) or not _HEX_RE.fullmatch(digest):
        raise TokenFileError(f"{where}.sha256: expected 64 lowercase hex digits")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenFileError(f"{where}.roles: expected a list of roles")
    if not isinstance(repositories, list):
        raise TokenFileError(f"{where}.repositories: expected a list of globs")
    if not isinstance(created, str):
        raise TokenFileError(f"{where}.created: expected a string")
    try:
        check_name(name)
    except TokenFileError as exc:
        raise TokenFileError(f"{where}.name: {exc}") from None
    return StaticOperator(name, digest, check_roles(roles, f"{where}.roles"),
                          check_globs(repositories, f"{where}.repositories"), created)


def parse(text: str) -> list[StaticOperator]:
    try:
        doc = json.loads(text) if text.strip() else {"operators": []}
    except ValueError:
        raise TokenFileError("not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("operators"), list):
        raise TokenFileError('expected {"operators": [...]}')
    operators = [_operator(d, i) for i, d in enumerate(doc["operators"])]
    seen: set[str] = set()
    for op in operators:
        if op.name in seen:
            raise TokenFileError(f"operator {op.name!r} is listed twice")
        seen.add(op.name)
    if len({op.sha256 for op in operators}) != len(operators):
        raise TokenFileError("two operators share one token")
    return operators


def load(path: Path) -> list[StaticOperator]:
    """The operators in `path` (OSError if unreadable, TokenFileError if malformed); a missing
    file is an error too: a typo in the path must not read as "no operators"."""
    return parse(path.read_text())


def save(path: Path, operators: list[StaticOperator]) -> None:
    """Rewrite `path` atomically (a reader sees the old file or the new one, never half of one),
    readable by its owner only, and durably (fsync of the file, then of its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"operators": [op.to_json() for op in operators]}, indent=2) + "\n"
    atomic.write_text(path, body, mode=0o600)


def add(path: Path, name: str, roles: list[str], repositories: list[str] | tuple[str, ...] = ()) -> str:
    """Add operator `name` to `path` (created if missing) and return its new token, which is
    stored nowhere: the caller shows it once."""
    check_name(name)
    entry_roles, globs = check_roles(roles), check_globs(list(repositories))
    operators = load(path) if path.exists() else []
    if any(op.name == name for op in operators):
        raise TokenFileError(f"operator {name!r} exists (remove-operator first to issue a new token)")
    token = new_token()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(path, [*operators, StaticOperator(name, token_hash(token), entry_roles, globs, created)])
    return token


def remove(path: Path, name: str) -> bool:
    """Remove operator `name`; False if there was none."""
    operators = load(path)
    kept = [op for op in operators if op.name != name]
    if len(kept) == len(operators):
        return False
    save(path, kept)
    return True
