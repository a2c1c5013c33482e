"""Starts and stops the hosts.toml watchdog (agent/watchdog.py) beside the agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys

from shoal import protocol
from shoal_agent.config import AgentConfig
from shoal_agent.hostsconf import Plan, State, apply, local_url, plan_for
from shoal_agent.watchdog import Job

log = logging.getLogger(__name__)

FAILURES = 2  # /readyz failures in a row before containerd is pointed away from the agent
STOP_TIMEOUT = 10.0


def job_for(config: AgentConfig) -> Job:
    settings = config.containerd
    return Job(plan=plan_for(config), health=protocol.READYZ.url(local_url(config.listen)),
               interval=settings.check_interval, failures=FAILURES, log_level=config.log.level,
               log_format=config.log.format, secret=secrets.token_bytes(32))


def bring_files(plan: Plan, state: State) -> None:
    """Every registry's file to `state` from the agent's own process (when no watchdog can: before
    the port is bound, after the watchdog died), each registry on its own."""
    for registry in plan.registries:
        try:
            apply(plan, registry, state)
        except OSError as exc:
            log.error("cannot write containerd's hosts.toml for %s under %s: %s", registry.name, plan.config_path,
                      exc.strerror or exc)


class Configurator:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.mirroring = asyncio.Event()  # containerd's files point at this agent
        # Set once the files first point at the agent, or the watchdog could not write them: the
        # agent tells systemd it is started only then (shoal/web.py service_ready), so kubelet's
        # first pulls already go through it, and an unwritable directory does not hold the node's
        # start (the watchdog's error is in the log).
        self.settled = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._spawn()
        self._reader = asyncio.create_task(self._read())

    async def _spawn(self) -> bool:
        """A watchdog process, unless the agent is stopping (decided under the lock, so that
        stop() never misses one being started)."""
        async with self._lock:
            if self._stopping:
                return False
            # -P and cwd "/": the watchdog imports nothing from the directory the agent runs in
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "shoal_agent.watchdog", "--watch", cwd="/",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert self._proc.stdin is not None
            self._proc.stdin.write(self.job.to_json().encode() + b"\n")
            await self._proc.stdin.drain()
            return True

    async def _read(self) -> None:
        while True:
            assert self._proc is not None
            assert self._proc.stdout is not None
            async for line in self._proc.stdout:
                if line.strip() == b"mirror":
                    self.mirroring.set()
                    self.settled.set()
                elif line.strip() == b"reduced":
                    self.mirroring.clear()
                elif line.strip() == b"failed":
                    self.settled.set()
            self.mirroring.clear()
            code = await self._proc.wait()
            if self._stopping:
                return
            # Killed or crashed: a new one takes the files over (it starts from "reduced").
            log.error("the hosts.toml watchdog exited with %d; starting it again", code)
            await asyncio.sleep(1.0)
            if not await self._spawn():
                return

    async def stop(self) -> None:
        """Clean stop: the watchdog removes the files (restores the operator's) and exits. If no
        live watchdog did (it had died, or did not stop in time), the agent does it here: the
        files must never outlive the agent's hold on its port."""
        if self._stopping:
            return
        async with self._lock:  # after a watchdog being started, and no other after it
            self._stopping = True
        done = False
        proc = self._proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                proc.stdin.write(b"stop\n")
                await proc.stdin.drain()
                proc.stdin.close()
                try:
                    done = await asyncio.wait_for(proc.wait(), STOP_TIMEOUT) == 0
                except TimeoutError:
                    log.error("the hosts.toml watchdog did not stop within %.0f s; killed", STOP_TIMEOUT)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if not done:
            bring_files(self.job.plan, State.REMOVED)

