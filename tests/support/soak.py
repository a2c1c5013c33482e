"""A cluster under a long, mixed load, as one runs for days (issue 10): tracker, origin and agents as
real processes with a small cache budget so eviction never stops; clients pulling random images
through random agents (every body hashed), Range requests, clients hanging up mid-blob, and every
agent pulling the same new image at once. Samples the processes and metrics as it goes; the
verdict is in tests/support/soakcheck.py.

Used by `python -m bench.soak` (30 minutes, production timing) and tests/e2e/test_soak.py (a few
minutes, short announce interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import soakdata
from tests.support.procs import Component, free_port, metric_sum, proc_stats, series
from tests.support.registry import Registry
from tests.support.soakdata import SoakImage
from tests.support.stack import Stack

MIB = 1 << 20
ACCEPT = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Plan:
    seconds: float
    images: int = 60
    layers: int = 133
    min_layer: int = 1 * MIB
    max_layer: int = 40 * MIB
    cache_budget: int = 300 * MIB
    journal_roll: int = 1 * MIB  # the agents' journal.roll_bytes (1 MiB is the default)
    agents: int = 2
    clients: tuple[int, int] = (4, 8)  # concurrent clients, redrawn every minute
    think: tuple[float, float] = (0.0, 4.0)  # a client's pause between two actions, seconds
    tracker_interval: int = 30  # the tracker's announce interval (30 s is the default)
    # how long swarm tokens and node certificates live (renewed at half-life; 24 h is the default)
    swarm_token_ttl: int = 86400
    sample_every: float = 5.0
    range_share: float = 0.1
    hangup_share: float = 0.05
    together_every: float = 60.0  # every agent pulls the same never-pulled image at once
    seed: int = 1
    log_level: str = "info"


@dataclass
class Request:
    t: float  # seconds since the start, when the request was sent
    agent: int
    kind: str  # manifest, blob, range, hangup
    digest: str
    size: int  # bytes received
    status: int
    ttfb: float
    seconds: float
    ok: bool
    error: str | None = None


@dataclass
class Run:
    plan: Plan
    images: list[SoakImage]
    stack: Stack
    registry: Registry
    started: float = 0.0
    requests: list[Request] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)
    requested: set[str] = field(default_factory=set)  # distinct blob digests clients asked for
    sizes: dict[str, int] = field(default_factory=dict)
    registry_log_offset: int = 0  # where this run's part of the registry's access log starts

    @property
    def components(self) -> dict[str, Component]:
        out = {}
        if self.stack.tracker is not None:
            out["tracker"] = self.stack.tracker
        if self.stack.origin is not None:
            out["origin"] = self.stack.origin
        for n, agent in enumerate(self.stack.agents):
            out[f"agent{n}"] = agent
        return out


def start(plan: Plan, workdir: Path, registry: Registry, *, pusher: tuple[str, str], node_user: tuple[str, str],
          seeder_user: tuple[str, str], redis: dict[str, object] | None = None) -> Run:
    """Build and push the images, start tracker, origin and agents (the caller closes run.stack).
    With `redis` (a tracker's `redis` section): two tracker replicas on it, the agents spread
    over both."""
    images = soakdata.build(workdir / "content", images=plan.images, layers=plan.layers,
                            min_size=plan.min_layer, max_size=plan.max_layer, seed=plan.seed)
    asyncio.run(soakdata.push_all(registry.url, pusher[0], pusher[1], images))
    stack = Stack(workdir / "stack", registry, node_user=node_user, seeder_user=seeder_user)
    run = Run(plan, images, stack, registry)
    log = {"level": plan.log_level}
    if redis is None:
        stack.start_tracker(interval=f"{plan.tracker_interval}s", log=log)
        stack.start_origin(log=log, swarm_token_ttl=f"{plan.swarm_token_ttl}s")
    else:
        second = f"127.0.0.1:{free_port()}"
        stack.start_tracker(interval=f"{plan.tracker_interval}s", log=log, redis=redis)
        stack.start_tracker(listen=second, name="tracker1", interval=f"{plan.tracker_interval}s", log=log,
                            redis=redis)
        stack.start_origin(log=log, swarm_token_ttl=f"{plan.swarm_token_ttl}s", tracker=None,
                           trackers=[stack.cluster.tracker_url, f"http://{second}"])
    for _ in range(plan.agents):
        # production deadlines (the test stack's are shorter)
        stack.start_agent(cache={"max_bytes": plan.cache_budget}, journal={"roll_bytes": plan.journal_roll}, log=log,
                          swarm={"first_piece_timeout": "10s", "stall_timeout": "10s", "seed_timeout": "120s"})
    for image in images:
        for blob in image.blobs:
            run.sizes[blob.digest] = blob.size
    run.registry_log_offset = registry.log_path.stat().st_size
    return run


def drive(run: Run) -> None:
    """The workload for plan.seconds, sampling all along; then until every journal is shipped."""
    asyncio.run(_drive(run))


async def _drive(run: Run) -> None:
    plan = run.plan
    rng = random.Random(plan.seed)
    run.started = time.monotonic()
    stop = asyncio.Event()
    active = [plan.clients[1]]
    together_count = max(1, min(len(run.images) // 4, int(plan.seconds // plan.together_every)))
    fresh = run.images[-together_count:]  # kept for the "everyone at once" pulls
    everyday = run.images[:-together_count]
    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        client = _Client(run, http)

        async def worker(w: int) -> None:
            wrng = random.Random(plan.seed * 1000 + w)
            while not stop.is_set():
                if w >= active[0]:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    continue
                agent = wrng.randrange(plan.agents)
                image = wrng.choice(everyday)
                roll = wrng.random()
                if roll < plan.hangup_share:
                    await client.hang_up(agent, image, wrng.choice(image.layers), wrng)
                elif roll < plan.hangup_share + plan.range_share:
                    await client.range(agent, image, wrng.choice(image.layers), wrng)
                else:
                    await client.pull(agent, image)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wrng.uniform(*plan.think))

        async def conductor() -> None:
            next_together = plan.together_every / 2
            next_redraw = 60.0
            while not stop.is_set():
                now = time.monotonic() - run.started
                if now >= next_redraw:
                    active[0] = rng.randint(*plan.clients)
                    next_redraw += 60.0
                if now >= next_together and fresh:
                    image = fresh.pop(0)
                    everyday.append(image)
                    await asyncio.gather(*(client.pull(a, image) for a in range(plan.agents)))
                    next_together += plan.together_every
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        async def sampler() -> None:
            idle = _CpuIdle()
            while not stop.is_set():
                run.samples.append(await asyncio.to_thread(sample, run, idle))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), plan.sample_every)

        tasks = [asyncio.create_task(worker(w)) for w in range(plan.clients[1])]
        tasks += [asyncio.create_task(conductor()), asyncio.create_task(sampler())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), plan.seconds)
        stop.set()
        await asyncio.gather(*tasks)
    # everything each agent journaled reaches the collector
    deadline = time.monotonic() + 120
    idle = _CpuIdle()
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(sample, run, idle)
        if all(last.get(f"agent{n}.journal_unshipped_bytes", 1) == 0 for n in range(plan.agents)):
            break
        await asyncio.sleep(1)
    run.samples.append(await asyncio.to_thread(sample, run, idle))


class _Client:
    def __init__(self, run: Run, http: aiohttp.ClientSession) -> None:
        self.run = run
        self.http = http

    def url(self, agent: int, repo: str, kind: str, ref: str) -> str:
        listen = self.run.stack.agents[agent].config["listen"]
        return f"http://{listen}/v2/{repo}/{kind}/{ref}?ns={self.run.registry.host}"

    def _note(self, sent: float, agent: int, kind: str, digest: str, **values: Any) -> None:
        self.run.requests.append(Request(t=sent - self.run.started, agent=agent, kind=kind, digest=digest,
                                         seconds=time.monotonic() - sent, **values))

    async def pull(self, agent: int, image: SoakImage) -> None:
        sent = time.monotonic()
        try:
            async with self.http.get(self.url(agent, image.repo, "manifests", image.tag),
                                     headers={"Accept": ACCEPT}) as r:
                body = await r.read()
                ok = r.status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == image.manifest_digest
                self._note(sent, agent, "manifest", image.manifest_digest, size=len(body), status=r.status,
                           ttfb=time.monotonic() - sent, ok=ok, error=None if ok else f"manifest: {r.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._note(sent, agent, "manifest", image.manifest_digest, size=0, status=0, ttfb=0.0, ok=False,
                       error=type(exc).__name__)
            return
        gate = asyncio.Semaphore(3)  # containerd's default of three blobs at once

        async def one(blob: soakdata.Layer) -> None:
            async with gate:
                await self.blob(agent, image.repo, blob)

        await asyncio.gather(*(one(b) for b in image.blobs))

    async def blob(self, agent: int, repo: str, blob: soakdata.Layer) -> None:
        self.run.requested.add(blob.digest)
        sent = time.monotonic()
        ttfb, got, status, error = 0.0, 0, 0, None
        h = hashlib.sha256()
        try:
            async with self.http.get(self.url(agent, repo, "blobs", blob.digest)) as r:
                status = r.status
                async for chunk in r.content.iter_chunked(1 << 20):
                    if not got:
                        ttfb = time.monotonic() - sent
                    got += len(chunk)
                    h.update(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        ok = error is None and status == 200 and "sha256:" + h.hexdigest() == blob.digest
        if not ok and error is None:
            error = f"status {status}, {got} bytes, sha256:{h.hexdigest()[:12]}"
        self._note(sent, agent, "blob", blob.digest, size=got, status=status, ttfb=ttfb, ok=ok, error=error)

    async def range(self, agent: int, image: SoakImage, blob: soakdata.Layer, rng: random.Random) -> None:
        self.run.requested.add(blob.digest)
        start = rng.randrange(blob.size)
        end = min(blob.size - 1, start + rng.randrange(1, 4 * MIB))
        sent = time.monotonic()
        ttfb, status, body, error = 0.0, 0, b"", None
        try:
            async with self.http.get(self.url(agent, image.repo, "blobs", blob.digest),
                                     headers={"Range": f"bytes={start}-{end}"}) as r:
                status = r.status
                ttfb = time.monotonic() - sent
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        expected = await asyncio.to_thread(_pread, blob.path, start, end - start + 1)
        ok = error is None and status == 206 and body == expected
        if not ok and error is None:
            error = f"range: status {status}, {len(body)} bytes, {'right' if body == expected else 'wrong'} bytes"
        self._note(sent, agent, "range", blob.digest, size=len(body), status=status, ttfb=ttfb, ok=ok, error=error)

    async def hang_up(self, agent: int, image: SoakImage, image_blob: soakdata.Layer, rng: random.Random) -> None:
        """Read part of a blob, then close the connection (a cancelled pull)."""
        self.run.requested.add(image_blob.digest)
        repo = image.repo
        want = rng.randrange(64 << 10, max(64 << 10, min(image_blob.size, 4 * MIB)) + 1)
        sent = time.monotonic()
        got, status, ttfb, error = b"", 0, 0.0, None
        try:
            async with self.http.get(self.url(agent, repo, "blobs", image_blob.digest)) as r:
                status = r.status
                ttfb = time.monotonic() - sent
                while len(got) < want:
                    chunk = await r.content.read(min(1 << 20, want - len(got)))
                    if not chunk:
                        break
                    got += chunk
                r.close()  # drop the connection mid-body
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = type(exc).__name__
        expected = await asyncio.to_thread(_pread, image_blob.path, 0, len(got))
        ok = error is None and status == 200 and got == expected
        if not ok and error is None:
            error = f"hang-up: status {status}, prefix {'right' if got == expected else 'wrong'}"
        self._note(sent, agent, "hangup", image_blob.digest, size=len(got), status=status, ttfb=ttfb, ok=ok,
                   error=error)


def _pread(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


class _CpuIdle:
    """The machine's CPU idle share since the previous call (from /proc/stat)."""

    def __init__(self) -> None:
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    def __call__(self) -> float:
        now = self._read()
        idle, total = now[0] - self.last[0], now[1] - self.last[1]
        self.last = now
        return 100.0 * idle / total if total else 100.0


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def sample(run: Run, idle: _CpuIdle) -> dict[str, float]:
    """One row of the time series (blocking: /proc, /metrics, directory sizes)."""
    row: dict[str, float] = {"t": time.monotonic() - run.started, "cpu_idle": idle()}
    for name, comp in run.components.items():
        if comp.proc is None or comp.proc.poll() is not None:
            row[f"{name}.down"] = 1
            continue
        pid = comp.proc.pid
        with contextlib.suppress(OSError):
            rss, cpu = proc_stats(pid)
            row[f"{name}.rss"], row[f"{name}.cpu_seconds"] = rss, cpu
            row[f"{name}.fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            status = Path(f"/proc/{pid}/status").read_text()
            row[f"{name}.threads"] = float(next(line.split()[1] for line in status.splitlines()
                                                if line.startswith("Threads:")))
        data_dir = comp.config.get("data_dir")
        if data_dir:
            row[f"{name}.data_dir_bytes"] = _dir_bytes(Path(data_dir))
        try:
            m = comp.metrics()
        except (OSError, AssertionError):
            continue
        if name.startswith("agent"):
            for key in ("cache_bytes", "cache_in_use_bytes", "cache_reserved_bytes", "journal_disk_bytes",
                        "journal_unshipped_bytes", "registry_bytes_total", "journal_records_total",
                        "journal_shipped_records_total", "cache_evictions_total"):
                row[f"{name}.{key}"] = metric_sum(m, f"shoal_agent_{key}")
            row[f"{name}.fallbacks"] = metric_sum(m, "shoal_agent_fallbacks_total")
            for sample in series(m, "shoal_agent_fallbacks_total"):
                if sample.value:
                    row[f"{name}.fallbacks.{sample.labels['reason']}"] = sample.value
            for source in ("cache", "peers", "registry"):
                row[f"{name}.served.{source}"] = metric_sum(m, "shoal_agent_served_bytes_total", source=source)
        elif name == "origin":
            row["origin.registry_bytes_total"] = metric_sum(m, "shoal_origin_registry_bytes_total")
            row["origin.cache_bytes"] = metric_sum(m, "shoal_origin_cache_bytes")
        else:
            for key in ("peers", "torrents", "torrents_without_seeders"):
                row[f"tracker.{key}"] = metric_sum(m, f"shoal_tracker_{key}")
    return row
