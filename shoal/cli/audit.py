"""`shoal audit`: query the pull journal at the origin's collector."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aiohttp

from shoal import protocol
from shoal.cli import display, login
from shoal.cli.common import CALL_ERRORS, check_url, origin_failed
from shoal.clients import OperatorClient

AUDIT_COLUMNS = ("ts", "node", "principal", "method", "kind", "repository", "reference", "digest", "status",
                 "bytes", "source", "authz_method", "outcome", "action")


def cmd_audit(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(args))


async def _audit(args: argparse.Namespace) -> int:
    origin_url = check_url(args.origin, "--origin")
    query = protocol.AuditQuery(image=args.image, repository=args.repository, digest=args.digest,
                                principal=args.principal, node=args.node, since=args.since, until=args.until,
                                limit=args.limit, format="json" if args.format == "table" else args.format)
    authorization = login.authorization(args, args.image.partition("/")[0] if args.image else None)
    async with aiohttp.ClientSession() as http:
        origin = OperatorClient(http, origin_url, authorization)
        try:
            if args.format != "table":
                sys.stdout.write(await origin.audit_text(query))
                return 0
            events = (await origin.audit(query)).events
        except CALL_ERRORS as exc:
            return origin_failed("audit", origin_url, exc)
    rows = [[_short(e.get(c)) for c in AUDIT_COLUMNS] for e in events]
    display.table([c.upper() for c in AUDIT_COLUMNS], rows, right=("STATUS", "BYTES"))
    print(f"{len(events)} event(s)", file=sys.stderr)
    return 0


def _short(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text[:19] if text.startswith("sha256:") else text
