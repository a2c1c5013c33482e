"""`shoal audit`: query the pull journal at the origin's collector."""

from __future__ import annotations

import argparse
import sys
import urllib.error
from typing import Any

from shoal import protocol
from shoal.cli.common import http_json, node_token

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
        status, body = http_json("GET", url, token=node_token(args), timeout=60, raw_text=args.format != "table")
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


