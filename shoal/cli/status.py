"""`shoal status`: cache and swarm state of a node's components."""

from __future__ import annotations

import argparse
import urllib.error

from shoal import protocol
from shoal.cli.common import http_json, size_text


def cmd_status(args: argparse.Namespace) -> int:
    rc = 0
    for label, url in (("agent", args.agent), ("origin", args.origin), ("tracker", args.tracker)):
        if not url:
            continue
        try:
            status, doc = http_json("GET", protocol.STATUS.url(url))
        except (urllib.error.URLError, OSError) as exc:
            print(f"{label:8} {url}: unreachable ({getattr(exc, 'reason', exc)})")
            rc = 1
            continue
        if status != 200 or not isinstance(doc, dict):
            print(f"{label:8} {url}: HTTP {status}")
            rc = 1
            continue
        doc.pop("blobs", None)
        summary = ", ".join(f"{k}={size_text(v) if k.endswith('bytes') else v}" for k, v in doc.items())
        print(f"{label:8} {url}: {summary}")
    return rc


