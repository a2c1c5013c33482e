"""What the subcommands share: how a failed call reads, sizes for people."""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import urlsplit

import aiohttp

from shoal import errors
from shoal.clients import ApiError
from shoal.redaction import redact

DEFAULT_ORIGIN = "http://127.0.0.1:6970"
# What a call can fail with: the server could not be reached or did not answer in time, or it
# answered with a refusal (ApiError), or with a body that is not what the protocol says.
CALL_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ApiError, errors.BadRequest, ValueError)


def check_url(url: str, flag: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"shoal: {flag} must be an http:// or https:// URL, not {redact(url)!r}")
    if "@" in url:
        # a login in the URL was echoed whole in every failure line and in `shoal status`'s table
        # (they end up in terminals and CI logs); the commands' own login options carry it
        raise SystemExit(f"shoal: {flag}: no login in the URL (it would be printed): shoal seed and shoal audit "
                         "take --token-file, --user or --authfile")
    return url.rstrip("/")


def origin_failed(command: str, origin: str, exc: BaseException) -> int:
    """Say on stderr, in one line, why a call to the origin failed; the exit status."""
    if isinstance(exc, ApiError):
        print(f"shoal {command}: the origin refused: {failure(exc, origin)}", file=sys.stderr)
    else:
        print(f"shoal {command}: cannot reach the origin: {failure(exc, origin)}", file=sys.stderr)
    return 1


def failure(exc: BaseException, url: str, *, what: str = "the origin") -> str:
    """One line for a failed call to `url`: the server's own message when it refused, else what
    went wrong in plain words (refused, name not found, TLS, timeout) and what to check."""
    if isinstance(exc, ApiError):
        return f"HTTP {exc.status}: {exc.detail}" if exc.detail else f"HTTP {exc.status}"
    if isinstance(exc, errors.BadRequest):
        return f"a malformed answer ({exc})"
    if isinstance(exc, ValueError):
        return f"an answer that is not JSON ({url}: is that {what}'s address?)"
    if isinstance(exc, errors.ShoalError):
        return str(exc)
    parts = urlsplit(url)
    where = parts.netloc or url
    return errors.connection_problem(exc, where, what=what)


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
