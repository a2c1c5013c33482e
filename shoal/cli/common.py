"""What the subcommands share: a small JSON-over-HTTP helper (urllib: the CLI needs no event
loop), sizes for people, the node token."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_ORIGIN = "http://127.0.0.1:6970"


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 10.0,
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


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")



def node_token(args: argparse.Namespace) -> str | None:
    path = args.node_token_file or os.environ.get("SHOAL_NODE_TOKEN_FILE")
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"shoal: cannot read the node token file {path!r}: {exc.strerror}") from None


