"""`shoal seed`: pre-seed images at the origin and follow the job."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp

from shoal import protocol
from shoal.cli import login
from shoal.cli.common import CALL_ERRORS, DEFAULT_ORIGIN, check_url, failure, origin_failed, size_text
from shoal.clients import ApiError, OperatorClient

POLL_SECONDS = 0.5


def cmd_seed(args: argparse.Namespace) -> int:
    return asyncio.run(_seed(args))


async def _seed(args: argparse.Namespace) -> int:
    urls = [check_url(url, "--origin") for url in (args.origin or [DEFAULT_ORIGIN])]
    registries = {image.partition("/")[0] for image in args.images}
    authorization = login.authorization(args, registries.pop() if len(registries) == 1 else None)
    async with aiohttp.ClientSession() as http:
        # Several origins: any of them takes the job (each blob is seeded by its owners), so one
        # that cannot be reached or fails (5xx) is passed over; a refusal is the cluster's answer.
        for i, origin_url in enumerate(urls):
            origin = OperatorClient(http, origin_url, authorization)
            try:
                job = await origin.preseed(protocol.PreseedRequest(args.images, args.platform))
                break
            except CALL_ERRORS as exc:
                last = i == len(urls) - 1
                if last or (isinstance(exc, ApiError) and exc.status < 500) or isinstance(exc, ValueError):
                    return origin_failed("seed", origin_url, exc)
                print(f"shoal seed: {origin_url}: {failure(exc)}; trying {urls[i + 1]}", file=sys.stderr)
        print(f"pre-seed job {job.id}: {', '.join(job.images)}")
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        tty = sys.stdout.isatty()
        last_line = ""
        while True:
            try:
                job = await origin.preseed_job(job.id)
            except CALL_ERRORS as exc:
                print(f"shoal seed: lost the job ({failure(exc)})", file=sys.stderr)
                return 1
            line = _progress(job)
            if line != last_line:
                print(("\r" + line.ljust(70)) if tty else line, end="" if tty else "\n", flush=True)
                last_line = line
            if job.finished:
                break
            if time.monotonic() > deadline:
                print(f"\nshoal seed: still running after {args.timeout:g}s; job {job.id} continues",
                      file=sys.stderr)
                return 1
            await asyncio.sleep(POLL_SECONDS)
    if tty:
        print()
    for manifest in job.manifests:
        print(f"  manifest {manifest}")
    print(f"{job.state}: {job.blobs_done} blobs ({size_text(job.bytes_done)}) seeded in {job.elapsed_seconds:.1f}s")
    for error in job.errors:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if job.state == "done" else 1


def _progress(job: protocol.PreseedJob) -> str:
    total, done = job.bytes_total, job.bytes_done
    pct = 100.0 * done / total if total else (100.0 if job.state == "done" else 0.0)
    return (f"[{job.state}] {job.blobs_done}/{job.blobs_total} blobs, "
            f"{size_text(done)} / {size_text(total)} ({pct:.0f}%)")
