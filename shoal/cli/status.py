"""`shoal status`: cache and swarm state of a node's components."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp

from shoal import clients
from shoal.cli import display
from shoal.cli.common import CALL_ERRORS, check_url, failure, size_text


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    rc = 0
    rows: list[list[str]] = []
    docs: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http:
        for label, url in (("agent", args.agent), ("origin", args.origin), ("tracker", args.tracker)):
            if not url:
                continue
            url = check_url(url, f"--{label}")
            try:
                doc = await clients.status(http, url)
            except CALL_ERRORS as exc:
                rows.append([label, url, "error", failure(exc, url, what=f"the {label}")])
                docs[label] = {"url": url, "error": failure(exc, url, what=f"the {label}")}
                rc = 1
                continue
            doc.pop("blobs", None)
            docs[label] = {"url": url, **doc}
            summary = ", ".join(f"{k}={size_text(v) if k.endswith('bytes') and isinstance(v, int) else v}"
                                for k, v in doc.items())
            rows.append([label, url, "ok", summary])
    if args.format == "json":
        print(json.dumps(docs, indent=2))
    else:
        display.table(["COMPONENT", "ADDRESS", "STATE", "DETAILS"], rows)
    return rc
