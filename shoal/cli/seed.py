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
from shoal.cli.display import SeedProgress
from shoal.clients import ApiError, OperatorClient

POLL_SECONDS = 0.5


def cmd_seed(args: argparse.Namespace) -> int:
    follow = Following()
    try:
        return asyncio.run(_seed(args, follow))
    except KeyboardInterrupt:
        follow.close()
        # Ctrl-C ends only this client: the origin owns the job and carries on with it.
        if follow.job_id is not None:
            print(f"\nshoal seed: stopped following; pre-seed job {follow.job_id} goes on at the origin "
                  f"{follow.origin} (follow it again: shoal seed --follow {follow.job_id} --origin {follow.origin})",
                  file=sys.stderr)
        else:
            print("\nshoal seed: interrupted before the origin answered; if it took the job, the job goes on "
                  "there", file=sys.stderr)
        return 130


class Following:
    """What Ctrl-C has to tell: which job at which origin, once it is known; the progress display."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        self.origin: str | None = None
        self.progress: SeedProgress | None = None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


async def _seed(args: argparse.Namespace, follow: Following) -> int:
    urls = [check_url(url, "--origin") for url in (args.origin or [DEFAULT_ORIGIN])]
    if args.follow and args.images:
        raise SystemExit("shoal seed: give IMAGE... to start a job, or --follow JOB to follow one, not both")
    if not args.follow and not args.images:
        raise SystemExit("shoal seed: name at least one IMAGE (or --follow JOB)")
    if args.follow and len(urls) > 1:
        raise SystemExit("shoal seed: --follow: give the one --origin that took the job")
    registries = {image.partition("/")[0] for image in args.images}
    authorization = login.authorization(args, registries.pop() if len(registries) == 1 else None)
    async with aiohttp.ClientSession() as http:
        if args.follow:
            origin_url, origin = urls[0], OperatorClient(http, urls[0], authorization)
            try:
                job = await origin.preseed_job(args.follow)
            except CALL_ERRORS as exc:
                return origin_failed("seed", origin_url, exc)
        else:
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
                    print(f"shoal seed: {origin_url}: {failure(exc, origin_url)}; trying {urls[i + 1]}",
                          file=sys.stderr)
        follow.job_id, follow.origin = job.id, origin_url
        print(f"pre-seed job {job.id}: {', '.join(job.images)}", flush=True)
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        follow.progress = progress = SeedProgress()
        try:
            while True:
                progress.update(job)
                if job.finished:
                    break
                if time.monotonic() > deadline:
                    progress.close()
                    print(f"shoal seed: still running after {args.timeout:g}s; job {job.id} goes on at the origin "
                          f"(shoal seed --follow {job.id} --origin {origin_url})", file=sys.stderr)
                    return 1
                await asyncio.sleep(POLL_SECONDS)
                try:
                    job = await origin.preseed_job(job.id)
                except CALL_ERRORS as exc:
                    progress.close()
                    print(f"shoal seed: lost the job ({failure(exc, origin_url)}); it goes on at the origin "
                          f"(shoal seed --follow {job.id} --origin {origin_url})", file=sys.stderr)
                    return 1
        finally:
            progress.close()
    for manifest in job.manifests:
        print(f"  manifest {manifest}")
    rate = ""
    if job.elapsed_seconds > 0 and job.bytes_done:
        rate = f", {size_text(job.bytes_done / job.elapsed_seconds)}/s"
    print(f"{job.state}: {job.blobs_done} blobs ({size_text(job.bytes_done)}) seeded in "
          f"{job.elapsed_seconds:.1f}s{rate}")
    for error in job.errors:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if job.state == "done" else 1
