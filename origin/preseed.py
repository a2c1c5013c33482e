"""Pre-seeding: resolve images to their blobs and seed them all before a rollout.

An image is `registry/name:tag` or `registry/name@digest`; `registry` must be one of the
origin's upstream names. An index seeds every platform, or only those asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shoal import errors, protocol
from shoal.oci import Descriptor, Digest, ImageReference, parse_manifest
from shoal_origin.replicas import Replicas
from shoal_origin.seeder import Seeder

log = logging.getLogger(__name__)

MAX_JOBS_KEPT = 100
# An image config read to learn its platform (--platform on a single-platform image): configs are
# a few KiB; a bigger one is not read.
MAX_CONFIG_BYTES = 1 << 20


@dataclass(slots=True)
class BlobState:
    digest: str
    size: int
    repository: str
    state: str = "pending"  # pending, seeding, done, skipped, failed
    error: str | None = None
    image: str | None = None  # the job's image that first named it


@dataclass(slots=True)
class Job:
    id: str
    images: list[str]
    platforms: list[str]
    owner: str | None = None  # the operator who submitted it (a seed operator sees only its own)
    state: str = "resolving"  # resolving, seeding, done, failed
    created: float = field(default_factory=time.time)
    finished: float | None = None
    manifests: list[str] = field(default_factory=list)
    blobs: dict[str, BlobState] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # set when the job has ended (whoever started it may wait for that: origin/notifications.py)
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def summary(self) -> protocol.PreseedJob:
        blobs = list(self.blobs.values())
        done = [b for b in blobs if b.state in ("done", "skipped")]
        return protocol.PreseedJob(
            id=self.id, state=self.state, images=self.images, platforms=self.platforms, manifests=self.manifests,
            blobs_total=len(blobs), blobs_done=len(done), blobs_failed=sum(1 for b in blobs if b.state == "failed"),
            bytes_total=sum(b.size for b in blobs), bytes_done=sum(b.size for b in done), errors=self.errors,
            elapsed_seconds=round((self.finished or time.time()) - self.created, 3),
            blobs=[protocol.PreseedBlob(b.digest, b.size, b.state, b.error, b.image) for b in blobs])


JobFinished = Callable[[Job], Awaitable[None]]


class Preseeder:
    def __init__(self, seeder: Seeder, *, concurrency: int, finished: JobFinished | None = None,
                 replicas: Replicas | None = None) -> None:
        self.seeder = seeder
        # several origins: each blob is seeded by its owners, wherever the job was submitted
        self.replicas = replicas
        self.concurrency = concurrency
        self.finished = finished  # told when a job ends (the origin audits it)
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self, images: list[str]) -> list[ImageReference]:
        """The images as references of this origin's upstreams; BadRequest or NotFound if not."""
        refs = [ImageReference.parse(i) for i in images]  # BadRequest on a malformed reference
        for ref in refs:
            if ref.registry not in self.seeder.upstreams:
                raise errors.NotFound(errors.NAME_UNKNOWN,
                                      f"{ref.registry!r} is not an upstream of this origin")
        return refs

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def submit(self, images: list[str], platforms: list[str], *, owner: str | None = None,
               job_id: str | None = None) -> Job:
        return self.start(self.check(images), platforms, owner=owner, job_id=job_id)

    def start(self, refs: list[ImageReference], platforms: list[str], *, owner: str | None = None,
              job_id: str | None = None) -> Job:
        """Start seeding `refs` (as `check` returned them) now."""
        job = Job(id=job_id or self.new_id(), images=[str(r) for r in refs], platforms=platforms, owner=owner)
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS_KEPT:
            self.jobs.pop(next(iter(self.jobs)))
        task = asyncio.create_task(self._run(job, refs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, job: Job, refs: list[ImageReference]) -> None:
        try:
            for ref in refs:
                for desc in await self._resolve(job, ref):
                    key = str(desc.digest)
                    if key not in job.blobs:
                        job.blobs[key] = BlobState(key, desc.size, f"{ref.registry}/{ref.name}", image=str(ref))
            job.state = "seeding"
            sem = asyncio.Semaphore(self.concurrency)
            await asyncio.gather(*(self._seed(job, b, sem) for b in job.blobs.values()))
            job.state = "failed" if job.errors else "done"
        except errors.ShoalError as exc:
            job.errors.append(str(exc))
            job.state = "failed"
        except Exception as exc:
            log.exception("pre-seed job %s failed", job.id)
            job.errors.append(f"internal error: {type(exc).__name__}")
            job.state = "failed"
        finally:
            job.finished = time.time()
            job.ended.set()
            log.info("pre-seed job %s %s: %d blobs, %d errors", job.id, job.state, len(job.blobs),
                     len(job.errors))
            if self.finished is not None:
                try:
                    await self.finished(job)
                except Exception:
                    log.exception("pre-seed job %s: recording its end failed", job.id)

    async def _platform_of(self, ref: ImageReference, config: Descriptor) -> str | None:
        """os/architecture[/variant] from an image's config blob (read from the registry and
        checked against its digest), None if it says none."""
        if config.size > MAX_CONFIG_BYTES:
            return None
        client = self.seeder.upstreams[ref.registry].client
        body = b"".join([chunk async for chunk in client.stream_blob(ref.name, config.digest)])
        if hashlib.sha256(body).hexdigest() != config.digest.hex:
            raise errors.IntegrityError(f"{ref}: the config blob does not match its digest")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # (a pusher's blob, nested past the stack)
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("os"), str) or \
                not isinstance(doc.get("architecture"), str):
            return None
        variant = doc.get("variant")
        return f"{doc['os']}/{doc['architecture']}" + (f"/{variant}" if isinstance(variant, str) and variant else "")

    async def _resolve(self, job: Job, ref: ImageReference, *, top: bool = True) -> list[Descriptor]:
        client = self.seeder.upstreams[ref.registry].client
        resp = await client.get_manifest(ref.name, ref.reference)
        if resp.status == 404:
            raise errors.NotFound(errors.MANIFEST_UNKNOWN, f"{ref}: manifest unknown")
        if resp.status != 200:
            raise errors.UpstreamError(f"{ref}: registry answered {resp.status}")
        self._check_digest(ref, resp.body)
        job.manifests.append(f"{ref.registry}/{ref.name}@sha256:{hashlib.sha256(resp.body).hexdigest()}")
        parsed = parse_manifest(resp.body, resp.headers.get("Content-Type", ""))
        if not parsed.is_index:
            if top and job.platforms:
                # --platform names what to seed: a single-platform image of another one is not
                # seeded whole without a word (its platform is in its config)
                platform = await self._platform_of(ref, parsed.blobs[0]) if parsed.blobs else None
                if platform not in job.platforms:
                    raise errors.NotFound(errors.MANIFEST_UNKNOWN,
                                          f"{ref}: a single-platform image ({platform or 'platform unknown'}), "
                                          f"not {', '.join(job.platforms)}")
            return list(parsed.blobs)
        children = [c for c in parsed.children
                    if not job.platforms or c.platform in job.platforms]
        if not children:
            raise errors.NotFound(errors.MANIFEST_UNKNOWN,
                                  f"{ref}: no manifest for platform(s) {', '.join(job.platforms)}")
        blobs: list[Descriptor] = []
        for child in children:
            child_ref = ImageReference(ref.registry, ref.name, None, child.digest)
            blobs.extend(await self._resolve(job, child_ref, top=False))
        return blobs

    @staticmethod
    def _check_digest(ref: ImageReference, body: bytes) -> None:
        if ref.digest is not None and hashlib.sha256(body).hexdigest() != ref.digest.hex:
            raise errors.IntegrityError(f"{ref}: manifest does not match its digest")

    async def _seed(self, job: Job, blob: BlobState, sem: asyncio.Semaphore) -> None:
        if blob.size == 0:
            blob.state = "skipped"  # nothing to share; agents answer empty blobs themselves
            return
        registry, _, repo = blob.repository.partition("/")
        async with sem:
            blob.state = "seeding"
            try:
                if self.replicas is None:
                    await self.seeder.ensure_seeded(registry, repo, Digest.parse(blob.digest))
                else:
                    missed = await self.replicas.preseed(registry, repo, Digest.parse(blob.digest))
                    if missed:  # seeded, by fewer owners than it has: said in the job's progress
                        blob.error = "; ".join(missed)
            except errors.ShoalError as exc:
                blob.state = "failed"
                blob.error = str(exc)
                job.errors.append(f"{blob.digest}: {exc}")
                return
            blob.state = "done"
