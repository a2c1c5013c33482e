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

Run as `python -m shoal_agent.watchdog`; never by hand.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import signal
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from shoal import logs
from shoal_agent.hostsconf import Plan, State, apply

log = logging.getLogger("shoal_agent.watchdog")


@dataclass(frozen=True, slots=True)
class Job:
    plan: Plan
    health: str  # the agent's /readyz
    interval: float
    failures: int  # failed checks in a row before containerd is pointed away from the agent
    log_level: str
    log_format: str

    def to_json(self) -> str:
        return json.dumps({"plan": json.loads(self.plan.to_json()), "health": self.health,
                           "interval": self.interval, "failures": self.failures,
                           "log_level": self.log_level, "log_format": self.log_format})

    @classmethod
    def from_json(cls, text: str) -> Job:
        doc = json.loads(text)
        return cls(plan=Plan.from_json(json.dumps(doc["plan"])), health=doc["health"],
                   interval=float(doc["interval"]), failures=int(doc["failures"]),
                   log_level=doc["log_level"], log_format=doc["log_format"])


def healthy(url: str, timeout: float) -> bool:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        return conn.getresponse().status == 200
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
            print("failed", flush=True)
        self._last_error = error
        if state is not self.state and not error:
            self.state = state
            log.info("containerd's hosts.toml for %s: %s", ", ".join(r.name for r in self.plan.registries),
                     {State.MIRROR: f"through this agent ({self.plan.mirror})",
                      State.REDUCED: "straight to the registry (agent not ready)",
                      State.REMOVED: "removed (the operator's files restored)"}[state])
            if state is not State.REMOVED:
                print(state.value, flush=True)


def run(job: Job) -> int:
    keeper = Keeper(job.plan)
    # Files from a run that ended without stopping name an agent that is not ready yet.
    keeper.bring(State.REDUCED)
    failed = 0
    while True:
        started = time.monotonic()
        failed = 0 if healthy(job.health, job.interval) else failed + 1
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


def main() -> int:
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
