"""The hosts.toml watchdog: a child process of the agent that points containerd at the agent only
while the agent answers.

It must be a separate process: a hung agent (SIGSTOP, a stuck event loop) cannot take itself out
of containerd's configuration, and containerd 1.6/1.7 waits on a connected but silent mirror
without a deadline (`dial_timeout` exists only from 2.1, and covers connecting only).

Protocol with the agent (agent/app.py): the first line on stdin is the job (JSON); then "stop"
means the agent is stopping cleanly (files removed, the operator's restored) and end of file
means the agent is gone without stopping (files reduced to the registry alone, for the agent's
restart to take over). On stdout it reports "mirror" or "reduced" when that changes, and
"failed" when it cannot write the files.

Run as `python -m shoal_agent.watchdog` by the agent. Two more uses, for service managers, as
`shoal-agent-hosts` (or `python -P -m shoal_agent.watchdog`): `--release --config AGENT.yaml`
(after the agent's process ended, whatever the way: systemd's ExecStopPost=) points files that
still name the agent at the registry; `--prepare USER --config AGENT.yaml` (as root, before the
agent starts: systemd's ExecStartPre=+) makes each registry's directory under config_path and
gives it to USER, so that the agent can write there and nowhere else in containerd's directory.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hmac
import http.client
import json
import logging
import os
import pwd
import secrets
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shoal import logs, protocol
from shoal.config import read_yaml
from shoal.errors import ConfigError
from shoal_agent import config as agent_config
from shoal_agent.hostsconf import Plan, State, apply, plan_for, release

log = logging.getLogger("shoal_agent.watchdog")


@dataclass(frozen=True, slots=True)
class Job:
    plan: Plan
    health: str  # the agent's /readyz
    interval: float
    failures: int  # failed checks in a row before containerd is pointed away from the agent
    log_level: str
    log_format: str
    # Shared with the agent only (through the pipe): its /readyz proves it, so that another
    # process on the agent's port is never taken for the agent.
    secret: bytes

    def to_json(self) -> str:
        return json.dumps({"plan": json.loads(self.plan.to_json()), "health": self.health,
                           "interval": self.interval, "failures": self.failures,
                           "log_level": self.log_level, "log_format": self.log_format,
                           "secret": self.secret.hex()})

    @classmethod
    def from_json(cls, text: str) -> Job:
        doc = json.loads(text)
        return cls(plan=Plan.from_json(json.dumps(doc["plan"])), health=doc["health"],
                   interval=float(doc["interval"]), failures=int(doc["failures"]),
                   log_level=doc["log_level"], log_format=doc["log_format"], secret=bytes.fromhex(doc["secret"]))


def healthy(url: str, timeout: float, secret: bytes) -> bool:
    """/readyz answers 200, with the proof of `secret` for a fresh challenge."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    challenge = secrets.token_hex(16)
    try:
        conn.request("GET", parts.path or "/", headers={protocol.WATCHDOG_CHALLENGE_HEADER: challenge})
        resp = conn.getresponse()
        proof = resp.getheader(protocol.WATCHDOG_PROOF_HEADER) or ""
        return resp.status == 200 and hmac.compare_digest(proof, protocol.watchdog_proof(secret, challenge))
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Keeper:
    """Applies one state to every registry directory; reports and logs changes."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.state: State | None = None
        self._last_error = ""

    def bring(self, state: State) -> None:
        errors = []
        for registry in self.plan.registries:
            try:
                apply(self.plan, registry, state)
            except OSError as exc:
                errors.append(f"{registry.name}: {exc.strerror or exc}")
        error = "; ".join(errors)
        if error and error != self._last_error:
            log.error("cannot write containerd's hosts.toml under %s: %s", self.plan.config_path, error)
            report("failed")
        self._last_error = error
        if state is not self.state and not error:
            self.state = state
            log.info("containerd's hosts.toml for %s: %s", ", ".join(r.name for r in self.plan.registries),
                     {State.MIRROR: f"through this agent ({self.plan.mirror})",
                      State.REDUCED: "straight to the registry (agent not ready)",
                      State.REMOVED: "removed (or the operator's own put back)"}[state])
            if state is not State.REMOVED:
                report(state.value)


def report(line: str) -> None:
    """A line to the agent. The agent may be gone (killed: this process is reducing the files
    because of it): then nothing more is said, and nothing is left for Python to flush at exit."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run(job: Job) -> int:
    keeper = Keeper(job.plan)
    # Files from a run that ended without stopping name an agent that is not ready yet.
    keeper.bring(State.REDUCED)
    failed = 0
    while True:
        started = time.monotonic()
        failed = 0 if healthy(job.health, job.interval, job.secret) else failed + 1
        if failed == 0:
            keeper.bring(State.MIRROR)
        elif failed >= job.failures or keeper.state is not State.MIRROR:
            keeper.bring(State.REDUCED)
        wait = max(0.0, job.interval - (time.monotonic() - started))
        readable, _, _ = select.select([sys.stdin], [], [], wait)
        if readable:
            line = sys.stdin.readline()
            if line.strip() == "stop":
                keeper.bring(State.REMOVED)
                return 0
            if not line:
                log.warning("the agent is gone: containerd pulls go straight to the registry")
                keeper.bring(State.REDUCED)
                return 0


def _plan(config_file: str) -> Plan | None:
    config = agent_config.load(read_yaml(config_file))
    return plan_for(config) if config.containerd.config_path is not None else None


def release_files(config_file: str) -> int:
    plan = _plan(config_file)
    failed = 0
    for registry in plan.registries if plan is not None else ():
        assert plan is not None
        try:  # each registry on its own: one that fails does not keep the others naming the agent
            if release(plan, registry):
                print(f"shoal-agent: {registry.name}/hosts.toml: the agent ended without stopping; "
                      "containerd goes to the registry")
        except OSError as exc:
            print(f"shoal-agent-hosts: {registry.name}: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
    return 2 if failed else 0


def prepare(owner: str, config_file: str) -> int:
    """As root: each registry's directory made (if missing) and given to `owner`. Through file
    descriptors opened without following links, relative to config_path, so that a link swapped
    in meanwhile cannot turn the chown onto another directory."""
    plan = _plan(config_file)
    user = pwd.getpwnam(owner)
    if plan is None:
        return 0
    Path(plan.config_path).mkdir(mode=0o755, parents=True, exist_ok=True)
    top = os.open(plan.config_path, os.O_RDONLY | os.O_DIRECTORY)
    failed = 0
    try:
        for registry in plan.registries:
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(registry.name, 0o755, dir_fd=top)
                fd = os.open(registry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                try:
                    os.fchown(fd, user.pw_uid, user.pw_gid)
                finally:
                    os.close(fd)
            except OSError as exc:
                reason = "a symbolic link, not prepared" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
                print(f"shoal-agent-hosts: {plan.config_path}/{registry.name}: {reason}", file=sys.stderr)
                failed += 1
    finally:
        os.close(top)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--watch"]:  # the agent's own child (agent/configurator.py)
        return watch()
    parser = argparse.ArgumentParser(prog="shoal-agent-hosts",
                                     description="containerd's hosts.toml, for service managers")
    parser.add_argument("--config", required=True, help="the agent's configuration")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--release", action="store_true",
                      help="point files that still name the agent at the registry (after it ended)")
    mode.add_argument("--prepare", metavar="USER",
                      help="make each registry's directory under config_path and give it to USER")
    args = parser.parse_args(argv)
    try:
        return prepare(args.prepare, args.config) if args.prepare else release_files(args.config)
    except (ConfigError, OSError, KeyError) as exc:
        print(f"shoal-agent watchdog: {exc}", file=sys.stderr)
        return 2


def watch() -> int:
    # Ctrl-C in a terminal and systemd's stop reach every process of the agent: the agent
    # stops cleanly and then says "stop" (or, killed, closes stdin). Until then containerd
    # keeps the agent, which is still serving.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = Job.from_json(sys.stdin.readline())
    logs.setup("agent", level=job.log_level, fmt="json" if job.log_format == "json" else "text")
    return run(job)


if __name__ == "__main__":
    sys.exit(main())
