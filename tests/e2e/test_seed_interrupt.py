"""Ctrl-C in `shoal seed` ends only the client: no traceback, and one sentence saying that the job
goes on at the origin and how to follow it again (which then works)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.e2e.conftest import Images
from tests.support.faults import CuttableProxy
from tests.support.procs import ROOT
from tests.support.registry import Registry
from tests.support.stack import Stack


def interruptible() -> None:
    """In the child before it runs: Ctrl-C's default disposition. A suite started in the
    background of a non-interactive shell (`./bin/test &`) has SIGINT ignored, which children
    inherit, and Python then installs no KeyboardInterrupt handler: the client, rightly, went on
    following the job (as a shell's background job does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_the_job_running_and_says_so(stack: Stack, registry: Registry, images: Images) -> None:
    image = images.app()
    # the origin reaches the registry through a proxy that holds every answer: the job stays
    # at "resolving" until it is released, so the interrupt comes while it runs
    host, port = registry.host.rsplit(":", 1)
    proxy = CuttableProxy(host, int(port))
    proxy.hold_after(0)
    stack.start_tracker()
    origin = stack.start_origin(upstreams=[{"name": registry.host, "url": proxy.url, "username": stack.seeder_user,
                                            "password": {"file": str(stack.seeder_password)}}])
    token = str(stack.keys["operator_token"])
    seed = subprocess.Popen([sys.executable, "-m", "shoal.cli", "seed", "--origin", origin.url, "--token-file",
                             token, f"{registry.host}/private/app:v1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"}, preexec_fn=interruptible)
    try:
        assert seed.stdout is not None
        first = seed.stdout.readline()  # "pre-seed job ID: IMAGE", once the origin took it
        assert first.startswith("pre-seed job "), first
        job_id = first.split()[2].rstrip(":")
        deadline = time.monotonic() + 10
        while "[resolving]" not in seed.stdout.readline() and time.monotonic() < deadline:
            pass  # the progress display started: the client follows the job
        seed.send_signal(signal.SIGINT)
        try:
            _out, err = seed.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # (have it say where it was: every thread's stack, from faulthandler)
            seed.send_signal(signal.SIGABRT)
            _out, err = seed.communicate(timeout=30)
            raise AssertionError(f"shoal seed did not end 30 s after SIGINT; its stacks:\n{err}") from None
    finally:
        if seed.poll() is None:
            seed.kill()
            seed.wait()
    assert seed.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == [
        f"shoal seed: stopped following; pre-seed job {job_id} goes on at the origin {origin.url} "
        f"(follow it again: shoal seed --follow {job_id} --origin {origin.url})"]

    proxy.release()
    follow = subprocess.run([sys.executable, "-m", "shoal.cli", "seed", "--follow", job_id, "--origin", origin.url,
                             "--token-file", token], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert follow.returncode == 0, follow.stderr
    assert f"done: {len(image.blobs)} blobs" in follow.stdout
    # a log, not a terminal: plain lines, and none of them an empty count
    assert "\x1b" not in follow.stdout and "0/0 blobs" not in follow.stdout
    assert "blobs, " in follow.stdout
    proxy.cut()
