"""`shoal status`: cache and swarm state of a node's components."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

from shoal import clients
from shoal.cli.common import CALL_ERRORS, check_url, failure, size_text


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


async def _status(args: argparse.Namespace) -> int:
    rc = 0
    async with aiohttp.ClientSession() as http:
        for label, url in (("agent", args.agent), ("origin", args.origin), ("tracker", args.tracker)):
            if not url:
                continue
            url = check_url(url, f"--{label}")
            try:
                doc = await clients.status(http, url)
            except clients.ApiError as exc:
                print(f"{label:8} {url}: {failure(exc)}")
                rc = 1
                continue
            except CALL_ERRORS as exc:
                print(f"{label:8} {url}: unreachable ({failure(exc)})")
                rc = 1
                continue
            doc.pop("blobs", None)
            summary = ", ".join(f"{k}={size_text(v) if k.endswith('bytes') else v}" for k, v in doc.items())
            print(f"{label:8} {url}: {summary}")
    return rc
