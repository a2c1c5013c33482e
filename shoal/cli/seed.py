"""`shoal seed`: pre-seed images at the origin and follow the job."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error

from shoal import protocol
from shoal.cli.common import http_json, node_token, size_text


def cmd_seed(args: argparse.Namespace) -> int:
    origin = args.origin.rstrip("/")
    token = node_token(args)
    try:
        status, job = http_json("POST", protocol.PRESEED.url(origin),
                                protocol.PreseedRequest(args.images, args.platform).to_json(), token=token)
    except (urllib.error.URLError, OSError) as exc:
        print(f"shoal seed: cannot reach the origin at {origin}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    if status != 202 or not isinstance(job, dict):
        message = job["errors"][0]["message"] if isinstance(job, dict) and job.get("errors") else job
        print(f"shoal seed: origin refused the request ({status}): {message}", file=sys.stderr)
        return 1
    print(f"pre-seed job {job['id']}: {', '.join(job['images'])}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    tty = sys.stdout.isatty()
    last_line = ""
    while True:
        status, job = http_json("GET", protocol.PRESEED_JOB.url(origin, job=str(job['id'])), token=token)
        if status != 200 or not isinstance(job, dict):
            print(f"shoal seed: lost the job ({status})", file=sys.stderr)
            return 1
        total, done = job["bytes_total"], job["bytes_done"]
        pct = 100.0 * done / total if total else (100.0 if job["state"] == "done" else 0.0)
        line = (f"[{job['state']}] {job['blobs_done']}/{job['blobs_total']} blobs, "
                f"{size_text(done)} / {size_text(total)} ({pct:.0f}%)")
        if line != last_line:
            print(("\r" + line.ljust(70)) if tty else line, end="" if tty else "\n", flush=True)
            last_line = line
        if job["state"] in ("done", "failed"):
            break
        if time.monotonic() > deadline:
            print(f"\nshoal seed: still running after {args.timeout:g}s; job {job['id']} continues",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    if tty:
        print()
    for manifest in job["manifests"]:
        print(f"  manifest {manifest}")
    print(f"{job['state']}: {job['blobs_done']} blobs ({size_text(job['bytes_done'])}) seeded "
          f"in {job['elapsed_seconds']:.1f}s")
    for error in job["errors"]:
        print(f"  error: {error}", file=sys.stderr)
    return 0 if job["state"] == "done" else 1


