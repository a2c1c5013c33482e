"""Pre-seed on push: the registry tells the origin about pushes, the origin seeds what the
operator's rules select, so a rolling update finds the new layers already in the swarm.

Two shapes are read: distribution's notification envelope (`{"events": [...]}`, media type
application/vnd.docker.distribution.events.v1+json) and Harbor's webhook (`PUSH_ARTIFACT`).
Decisions the registry leaves to us:

- Only a tagged manifest push triggers: blob pushes come before their manifest's push, and a
  manifest pushed by digest alone is (with skopeo, docker, buildkit) an index's child whose index
  follows with a tag. The image is seeded by the pushed digest (the tag may move meanwhile).
- The answer is immediate (the registry retries what it does not see acknowledged, and a slow
  endpoint holds back its queue): events are parsed, filtered and queued, never awaited.
- The queue is bounded; past it a push is dropped, counted and logged (a flood cannot grow the
  origin's memory). Pushes of an image already seen within `dedupe_window` are not seeded again.
- An event naming a registry other than the configured upstream is ignored, and whatever is
  seeded is fetched from that upstream with the origin's own credentials, verified by digest.
- Each seeded image is an audit event of principal PRINCIPAL, as an operator's pre-seed is.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge

from shoal import errors
from shoal.oci import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    TAG_RE,
    Digest,
    ImageReference,
    validate_name,
)
from shoal_origin.config import NotificationSettings, PushRule
from shoal_origin.preseed import Job, Preseeder

log = logging.getLogger(__name__)

PRINCIPAL = "registry-notification"
# distribution sends one event per envelope, or a few; a body with more is not a registry's
MAX_EVENTS = 1000
# What became of each event (shoal_origin_push_events_total{result}); every value is exported
# from the start, at 0.
RESULTS = ("queued", "duplicate", "no_rule", "untagged", "not_manifest", "not_push", "foreign", "invalid",
           "dropped", "unauthorized")
DROP_LOG_EVERY = 10.0  # seconds between log lines about dropped pushes (each is counted)
TRIGGERING_TYPES = MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES
# A registry host as events name it (host[:port], IPv6 in brackets): compared and logged, so
# nothing else (control characters would forge log lines).
HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


@dataclass(frozen=True, slots=True)
class Push:
    """A tagged manifest push, as the registry reported it."""

    repository: str
    digest: Digest
    tag: str
    host: str  # the registry the event names (as the pushing client addressed it)
    actor: str | None = None  # who pushed, as the registry says


@dataclass(slots=True)
class Parsed:
    pushes: list[Push] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # result -> events

    def skip(self, result: str) -> None:
        self.skipped[result] = self.skipped.get(result, 0) + 1


def _bad(message: str) -> errors.BadRequest:
    return errors.BadRequest(errors.INVALID_REQUEST, message)


def parse(raw: bytes) -> Parsed:
    """The pushes in a notification body; BadRequest if it is neither shape. A single event that
    does not parse is skipped as "invalid": the registry would resend a refused envelope forever."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # (arrays nested past Python's stack)
        raise _bad("body must be a JSON notification envelope") from None
    if not isinstance(doc, dict):
        raise _bad("body must be a JSON object")
    if "events" in doc:
        events = doc["events"]
        if not isinstance(events, list) or len(events) > MAX_EVENTS:
            raise _bad(f"events must be a list of at most {MAX_EVENTS} events")
        parsed = Parsed()
        for event in events:
            _distribution_event(event, parsed)
        return parsed
    if isinstance(doc.get("type"), str) and isinstance(doc.get("event_data"), dict):
        return _harbor(doc)
    raise _bad("expected a registry notification envelope ({\"events\": [...]}) or a Harbor webhook")


def _str(doc: Any, key: str) -> str | None:
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value else None


def _push(repository: str | None, digest: str | None, tag: str | None, host: str | None,
          actor: str | None, parsed: Parsed) -> None:
    if tag is None:
        parsed.skip("untagged")
        return
    try:
        if (repository is None or digest is None or host is None or not HOST_RE.fullmatch(host)
                or not TAG_RE.fullmatch(tag)):
            raise _bad("incomplete")
        parsed.pushes.append(Push(validate_name(repository), Digest.parse(digest), tag, host.lower(), actor))
    except errors.BadRequest:
        parsed.skip("invalid")


def _distribution_event(event: Any, parsed: Parsed) -> None:
    if not isinstance(event, dict):
        parsed.skip("invalid")
        return
    if event.get("action") != "push":
        parsed.skip("not_push")
        return
    target = event.get("target")
    if not isinstance(target, dict):
        parsed.skip("invalid")
        return
    if target.get("mediaType") not in TRIGGERING_TYPES:
        parsed.skip("not_manifest")  # a blob (its manifest's push follows), or an old schema
        return
    url = _str(target, "url")
    try:
        host = urlsplit(url).netloc if url else None
    except ValueError:  # (an unclosed "[")
        host = None
    _push(_str(target, "repository"), _str(target, "digest"), _str(target, "tag"), host or None,
          _str(event.get("actor"), "name"), parsed)


def _harbor(doc: dict[str, Any]) -> Parsed:
    parsed = Parsed()
    data = doc["event_data"]
    if doc["type"] != "PUSH_ARTIFACT":
        parsed.skip("not_push")
        return parsed
    resources = data.get("resources")
    if not isinstance(resources, list) or len(resources) > MAX_EVENTS:
        raise _bad(f"event_data.resources must be a list of at most {MAX_EVENTS}")
    repository = _str(data.get("repository"), "repo_full_name")
    for resource in resources:
        url = _str(resource, "resource_url")  # host/project/repo:tag
        host = url.split("/", 1)[0] if url and "/" in url else None
        _push(repository, _str(resource, "digest"), _str(resource, "tag"), host, _str(doc, "operator"), parsed)
    return parsed


class Rules:
    """The operator's rules, in order: the first that matches a push decides its platforms."""

    def __init__(self, rules: list[PushRule]) -> None:
        self.rules = list(rules)

    def select(self, repository: str, tag: str) -> PushRule | None:
        for rule in self.rules:
            if (any(fnmatch.fnmatchcase(repository, g) for g in rule.repositories)
                    and any(fnmatch.fnmatchcase(tag, g) for g in rule.tags)):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class Queued:
    """A push waiting for its pre-seed job."""

    ref: ImageReference
    platforms: list[str]
    push: Push
    client_addr: str | None  # the notifying registry
    user_agent: str | None


class NotificationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("shoal_origin_push_events_total",
                              "Registry push notifications by what became of them: queued for a pre-seed, or "
                              "why not (duplicate, no_rule, untagged, not_manifest, not_push, foreign, invalid, "
                              "dropped: the queue was full; unauthorized: a request without the token)",
                              ["result"], registry=registry)
        for result in RESULTS:
            self.events.labels(result)
        self.queued = Gauge("shoal_origin_push_queue", "Pushed images waiting for a pre-seed job",
                            registry=registry)


Recorder = Callable[[Queued, str], Awaitable[None]]


class Notifications:
    """Filters pushes into a bounded queue; `jobs` workers run one pre-seed job each at a time."""

    def __init__(self, settings: NotificationSettings, *, upstream: str, upstream_url: str, preseeder: Preseeder,
                 metrics: NotificationMetrics, record: Recorder) -> None:
        self.settings = settings
        self.upstream = upstream
        self.hosts = {upstream.lower(), urlsplit(upstream_url).netloc.lower(), *(h.lower() for h in settings.hosts)}
        self.rules = Rules(settings.rules)
        self.preseeder = preseeder
        self.metrics = metrics
        self.record = record  # audits a job before it starts
        self.queue: asyncio.Queue[Queued] = asyncio.Queue(settings.queue_size)
        self._seen: OrderedDict[tuple[str, str, tuple[str, ...]], float] = OrderedDict()
        self._workers: list[asyncio.Task[None]] = []
        self._dropped_since_log = 0
        self._last_drop_log = -DROP_LOG_EVERY

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"push-preseed-{i}")
                         for i in range(self.settings.jobs)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def accept(self, parsed: Parsed, *, client_addr: str | None, user_agent: str | None) -> dict[str, int]:
        """Queue what the rules select, at once (never waits); what became of each event."""
        results = dict(parsed.skipped)
        for push in parsed.pushes:
            result = self._accept(push, client_addr, user_agent)
            results[result] = results.get(result, 0) + 1
        for result, count in results.items():
            self.metrics.events.labels(result).inc(count)
        self.metrics.queued.set(self.queue.qsize())
        return results

    def _accept(self, push: Push, client_addr: str | None, user_agent: str | None) -> str:
        if push.host not in self.hosts:
            log.info("ignored a push notification for %s/%s: not registry %s", push.host, push.repository,
                     self.upstream)
            return "foreign"
        rule = self.rules.select(push.repository, push.tag)
        if rule is None:
            log.debug("push of %s:%s: no rule selects it", push.repository, push.tag)
            return "no_rule"
        key = (push.repository, str(push.digest), tuple(rule.platforms))
        now = time.monotonic()
        self._forget(now)
        if key in self._seen:
            return "duplicate"
        item = Queued(ImageReference(self.upstream, push.repository, push.tag, push.digest), list(rule.platforms),
                      push, client_addr, user_agent)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self._dropped(item)
            return "dropped"
        self._seen[key] = now
        log.info("push of %s queued for pre-seeding", item.ref)
        return "queued"

    def _forget(self, now: float) -> None:
        """Drop what left the dedupe window; keep at most a few queues' worth (bounded memory)."""
        window = self.settings.dedupe_window
        limit = max(1000, 10 * self.settings.queue_size)
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if now - seen < window and len(self._seen) <= limit:
                break
            del self._seen[key]

    def _dropped(self, item: Queued) -> None:
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY:
            log.warning("push pre-seed queue full (%d waiting): dropped %d push(es), the last %s; raise "
                        "notifications.queue_size or notifications.jobs", self.queue.qsize(),
                        self._dropped_since_log, item.ref)
            self._dropped_since_log, self._last_drop_log = 0, now

    async def _work(self) -> None:
        while True:
            item = await self.queue.get()
            self.metrics.queued.set(self.queue.qsize())
            try:
                job = await self._seed(item)
                if job.state != "done":  # a later push of the same image may try again
                    self._seen.pop((item.push.repository, str(item.push.digest), tuple(item.platforms)), None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # (the audit store failed: nothing was seeded)
                log.error("push of %s not pre-seeded: %s", item.ref, exc)
                self._seen.pop((item.push.repository, str(item.push.digest), tuple(item.platforms)), None)
            finally:
                self.queue.task_done()

    async def _seed(self, item: Queued) -> Job:
        job_id = self.preseeder.new_id()
        await self.record(item, job_id)  # audited before anything is fetched, as an operator's job is
        job = self.preseeder.start([item.ref], item.platforms, owner=PRINCIPAL, job_id=job_id)
        await job.ended.wait()
        return job
