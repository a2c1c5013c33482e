"""The origin's aiohttp application: admissions, enrollment, the collector, pre-seed jobs, status, ops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector as PromCollector

from shoal import audit, errors, httpclient, netaddr, peercerts, protocol, signing
from shoal.config import read_token
from shoal.errors import ConfigError
from shoal.metrics import StoreCollector, SwarmCollector, component_registry
from shoal.oci import Digest, ImageReference, validate_name
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal.swarm import SEEDER_FINGERPRINT, Swarm, SwarmSettings
from shoal.web import add_ops_routes, add_routes, error_middleware, operator_of
from shoal_origin import notifications as push_notifications
from shoal_origin.admission import Admissions
from shoal_origin.collector import Collector, store_for
from shoal_origin.config import OriginConfig
from shoal_origin.firstcopy import SEND_TIMEOUT, FirstCopies, Lease
from shoal_origin.operators import Operators
from shoal_origin.page import StatusPage
from shoal_origin.preseed import Job, Preseeder
from shoal_origin.registration import TrackerRegistration
from shoal_origin.relay import Relays
from shoal_origin.replicas import Replicas
from shoal_origin.seeder import Seeder, SeederMetrics, Upstream

log = logging.getLogger(__name__)

SEEDER_KEY = web.AppKey("seeder", Seeder)
SWARM_KEY = web.AppKey("swarm", Swarm)
COLLECTOR_KEY = web.AppKey("collector", Collector)
PRESEEDER_KEY = web.AppKey("preseeder", Preseeder)
ADMISSIONS_KEY = web.AppKey("admissions", Admissions)
OPERATORS_KEY = web.AppKey("operators", Operators)
REPLICAS_KEY = web.AppKey("replicas", Replicas)
RELAYS_KEY = web.AppKey("relays", Relays)
FIRST_COPIES_KEY = web.AppKey("first_copies", FirstCopies)
NOTIFICATIONS_KEY = web.AppKey("notifications", push_notifications.Notifications)
USER_AGENT = "shoal-origin/0.1"


async def _json(request: web.Request) -> Any:
    return _parse_json(await request.read())


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # (nested past Python's stack)
        raise errors.BadRequest(errors.INVALID_REQUEST, "body must be a JSON object") from None


# A node's signed request is taken this long after (or before: clocks drift) the time it says
# it was made; an older copy seen on the wire is worth nothing.
REQUEST_SKEW = 300.0


def _check_signed(request: web.Request, raw: bytes, kind: str, key: Ed25519PublicKey, node: str, at: int) -> None:
    try:
        signing.verify_request(key, kind, raw, request.headers.get(protocol.NODE_SIGNATURE_HEADER))
    except signing.SignatureError as exc:
        log.warning("refused a %s request from node %s: %s", kind, node, exc)
        raise errors.Denied(f"{exc} with the key of node {node!r}") from None
    if abs(time.time() - at) > REQUEST_SKEW:
        raise errors.Denied(f"the {kind} request is dated {at}, more than {REQUEST_SKEW:.0f}s from the origin's "
                            "clock (is the node's clock right?)")


async def admission(request: web.Request) -> web.Response:
    """POST ADMISSION {"node", "ns", "repository"} with the puller's credential: once the registry
    lets that credential pull the blob, the blob is seeded and the node gets its metainfo and a
    grant for its swarm (origin/admission.py)."""
    digest = Digest.parse(request.match_info["digest"])
    raw = await request.read()
    body = protocol.AdmissionRequest.from_json(_parse_json(raw))
    validate_name(body.repository)
    admissions = request.app[ADMISSIONS_KEY]
    public_key = await request.app[COLLECTOR_KEY].node_key(body.node)
    if public_key is None:
        raise errors.Denied(f"node {body.node!r} has not enrolled (it asks for its grants first)",
                            detail=protocol.NOT_ENROLLED)
    _check_signed(request, raw, "admission", public_key, body.node, body.at)
    principal = await admissions.check(body.node, body.ns, body.repository, digest,
                                       request.headers.get(protocol.PULLER_AUTHORIZATION_HEADER))
    seeder = request.app[SEEDER_KEY]
    if body.seeded_only and not seeder.is_seeded(digest):
        return web.Response(status=204)
    if body.relay and not seeder.is_seeded(digest):
        # A head start while the origin fetches (origin/relay.py): answered now, the node asks
        # again (without `relay`) for the metainfo, which comes once the blob is seeded.
        ticket = request.app[RELAYS_KEY].issue(body.node, body.ns, digest)
        if ticket is not None:
            seeder.seed_soon(body.ns, body.repository, digest)
            return web.json_response(protocol.RelayTicket(ticket).to_json(), status=202)
    published = await seeder.ensure_seeded(body.ns, body.repository, digest)
    replicas = request.app.get(REPLICAS_KEY)
    if replicas is not None:  # the blob's other owners seed it too (origin/replicas.py)
        replicas.spread(body.ns, body.repository, digest)
    grant = await asyncio.to_thread(admissions.grant, body.node, public_key, digest)
    log.debug("admitted node %s to %s (%s/%s) for %s", body.node, digest, body.ns, body.repository, principal)
    copies = request.app.get(FIRST_COPIES_KEY)
    first_copy = copies.issue(body.node, published.meta, seeder.store.path(digest)) if copies is not None else None
    return web.json_response(protocol.Admission(published.meta.raw, published.signature,
                                                seeder.source_signature(digest, body.ns), grant,
                                                admissions.grant_ttl, first_copy).to_json())


# The first copy's sends wait for each other (origin/firstcopy.py): a send should end when its
# piece has left, not when the kernel took it. With the default buffers a node's whole piece went
# into its socket at once, and every node's piece was then on the link at the same time, each
# at a share of it. Linux doubles this.
FIRST_COPY_SEND_BUFFER = 64 << 10


async def first_copy(request: web.Request) -> web.StreamResponse:
    """GET FIRST_COPY with a ticket from this node's admission: the next piece of the blob no node
    has had from the origin, its index in a header; 204 once every piece has left the origin."""
    digest = Digest.parse(request.match_info["digest"])
    ticket = request.headers.get(protocol.FIRST_COPY_TICKET_HEADER, "")
    copies = request.app.get(FIRST_COPIES_KEY)
    if copies is None:
        raise errors.Denied("this origin hands out no first copies")

    def alive() -> bool:  # (aiohttp goes on with a handler whose client hung up)
        return request.transport is not None and not request.transport.is_closing()

    have = protocol.first_copy_have(request.headers.get(protocol.FIRST_COPY_HAVE_HEADER))
    try:
        async with copies.piece(ticket, digest, alive, have=have) as lease:
            return await _send_piece(request, digest, lease)
    except ConnectionError:
        return web.Response(status=204)  # (to no one: the node hung up while it waited)


async def _send_piece(request: web.Request, digest: Digest, lease: Lease | None) -> web.StreamResponse:
    if lease is None:
        return web.Response(status=204)
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    before = None
    if sock is not None:
        with contextlib.suppress(OSError):
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FIRST_COPY_SEND_BUFFER)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           protocol.FIRST_COPY_PIECE_HEADER: str(lease.index)})
    response.content_length = len(lease.data)
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await response.prepare(request)
            await response.write(lease.data)
            await response.write_eof()
    except (ConnectionError, TimeoutError):
        log.debug("a node did not take piece %d of %s's first copy", lease.index, digest)
        if request.transport is not None:
            request.transport.abort()  # (and what was buffered for it)
        return response
    finally:
        if sock is not None and before is not None:
            # the connection stays open for the node's next request, which may be a relay or an
            # admission: the buffer it had (Linux reports it doubled)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, before // 2)
    lease.delivered()
    return response


async def relay(request: web.Request) -> web.StreamResponse:
    """GET RELAY with a ticket from this node's admission: the blob's bytes as the origin fetches
    them, until it is seeded (origin/relay.py). 204 when there is nothing to relay (the blob was
    seeded, or its fetch failed, first): the node's admission tells it what next."""
    digest = Digest.parse(request.match_info["digest"])
    relays = request.app[RELAYS_KEY]
    ticket = request.headers.get(protocol.RELAY_TICKET_HEADER, "")
    ns = relays.redeem(ticket, digest)
    if ns is None:
        raise errors.Denied("no live relay ticket for this blob")
    try:
        return await _relay(request, relays, ns, digest, ticket)
    finally:
        relays.release(ticket)


async def _relay(request: web.Request, relays: Relays, ns: str, digest: Digest, ticket: str) -> web.StreamResponse:
    progress = await relays.progress(ns, digest)
    if progress is None:
        return web.Response(status=204)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    try:
        await response.prepare(request)
        sent = await relays.stream(progress, response.write, ticket)
        await response.write_eof()
    except (ConnectionError, TimeoutError):
        # the node hung up (it had the metainfo, or gave up) or stopped reading: nothing lost.
        # (ConnectionError, not only ConnectionResetError: a reset while a write waits for room
        # comes out of aiohttp as a plain ConnectionError("Connection lost").)
        log.debug("relay of %s to a node ended early", digest)
        if request.transport is not None:
            # Dropped, and what was buffered for it with it: left open, aiohttp's end of the
            # response waits for the node to read for as long as it keeps the connection.
            request.transport.abort()
        return response
    log.debug("relayed %d of %d bytes of %s", sent, progress.size, digest)
    return response


async def replica(request: web.Request) -> web.Response:
    """POST REPLICA (another origin, the peer token): seed the blob too, fetched with this
    origin's own service credentials; answered once it is seeded."""
    digest = Digest.parse(request.match_info["digest"])
    body = protocol.ReplicaRequest.from_json(await _json(request))
    validate_name(body.repository)
    published = await request.app[REPLICAS_KEY].serve(body.ns, body.repository, digest)
    return web.json_response(protocol.Replica(str(digest), published.meta.info_hash.hex()).to_json())


async def grants(request: web.Request) -> web.Response:
    """POST GRANTS {"node", "public_key", "renew"}: enroll the node (its name bound to its key the
    first time) and renew the grants its receipts show it was admitted to."""
    raw = await request.read()
    body = protocol.GrantsRequest.from_json(_parse_json(raw))
    public_key = peercerts.parse_public_key(body.public_key)
    _check_signed(request, raw, "grants", public_key, body.node, body.at)  # it holds the key it shows
    await request.app[COLLECTOR_KEY].enroll(body.node, peercerts.canonical_public_pem(public_key))
    renewed = await asyncio.to_thread(request.app[ADMISSIONS_KEY].renew, body.node, public_key, body.renew)
    return web.json_response(renewed.to_json())


async def submit_preseed(request: web.Request) -> web.Response:
    """POST /v1/preseed {"images": [...], "platforms": [...]} -> 202 with the job. Every image is
    checked against what the operator may seed before anything is fetched; the submission (or
    its refusal) is an audit event stored before the answer."""
    op = operator_of(request)
    operators = request.app[OPERATORS_KEY]
    body = protocol.PreseedRequest.from_json(await _json(request))
    preseeder = request.app[PRESEEDER_KEY]
    detail: dict[str, Any] = {"images": body.images[:100], "platforms": body.platforms[:20]}
    try:
        refs = preseeder.check(body.images)
        await operators.check_seed(op, refs)
    except errors.ShoalError as exc:
        if not isinstance(exc, errors.UpstreamError):
            await operators.record(request, principal=op.principal, authz_method=operators.method_of(op),
                                   action="preseed", status=exc.oci.status, outcome="refused", detail=detail,
                                   error=str(exc))
        raise
    job_id = preseeder.new_id()
    await operators.record(request, principal=op.principal, authz_method=operators.method_of(op), action="preseed",
                           status=202, outcome="accepted", detail={**detail, "job": job_id})
    job = preseeder.start(refs, body.platforms, owner=op.principal, job_id=job_id)
    return web.json_response(job.summary().to_json(), status=202)


async def receive_notification(request: web.Request) -> web.Response:
    """POST NOTIFICATIONS (the registry, with the notification token): the pushes its rules
    select are queued for pre-seeding; answered at once, with what became of each event
    (origin/notifications.py)."""
    notifications = request.app.get(NOTIFICATIONS_KEY)
    if notifications is None:
        raise errors.Unavailable("the origin is starting")
    parsed = push_notifications.parse(await request.read())
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    results = notifications.accept(parsed, client_addr=netaddr.peer_address(peer),
                                   user_agent=request.headers.get("User-Agent"))
    return web.json_response({"events": results})


async def receive_journal(request: web.Request) -> web.Response:
    """POST /v1/journal {"node": name, "records": [...]}, signed by the node's own key: store,
    deduplicated, then acknowledge. The records are the node's that signed, whatever they say."""
    raw = await request.read()
    batch = protocol.JournalBatch.from_json(_parse_json(raw))
    collector = request.app[COLLECTOR_KEY]
    key = await collector.node_key(batch.node)
    if key is None:
        log.warning("refused a journal batch from node %s: not enrolled (or released)", batch.node)
        raise errors.Denied(f"node {batch.node!r} has not enrolled (it asks for a swarm token first)",
                            detail=protocol.NOT_ENROLLED)
    try:
        signing.verify_batch(key, raw, request.headers.get(protocol.NODE_SIGNATURE_HEADER))
    except signing.SignatureError as exc:
        log.warning("refused a journal batch from node %s: %s", batch.node, exc)
        raise errors.Denied(f"{exc} with the key of node {batch.node!r}") from None
    stored = await collector.store(batch.node, batch.records)
    return web.json_response(protocol.JournalAck(stored.accepted, stored.duplicates, stored.rejected).to_json())


async def query_audit(request: web.Request) -> web.StreamResponse:
    """GET AUDIT (protocol.AuditQuery). The query itself is an audit event, with its filters."""
    query = protocol.AuditQuery.from_query(request.rel_url.query)
    asked = query.to_query()
    if query.image:  # registry/name[:tag][@digest]; a tag or digest narrows to pulls that named it
        ref = ImageReference.parse(query.image)
        narrowed: dict[str, Any] = {"ns": ref.registry, "repository": ref.name}
        if ref.digest is not None:
            narrowed["digest"] = str(ref.digest)
        elif ":" in query.image.partition("@")[0].rsplit("/", 1)[-1] and ref.tag:
            narrowed["reference"] = ref.tag
        query = replace(query, image=None, **narrowed)
    op = operator_of(request)
    operators = request.app[OPERATORS_KEY]
    await operators.record(request, principal=op.principal, authz_method=operators.method_of(op), action="audit",
                           status=200, outcome="complete", detail=asked)
    events = await request.app[COLLECTOR_KEY].query(query)
    if query.format == "jsonl":
        return web.Response(text=audit.to_jsonl(events), content_type="application/x-ndjson")
    if query.format == "csv":
        return web.Response(text=audit.to_csv(events), content_type="text/csv")
    return web.json_response(protocol.AuditPage(events).to_json())


async def get_preseed(request: web.Request) -> web.Response:
    """A job's progress: a seed operator sees its own jobs only (another's answers as a job that
    does not exist), an admin every job. Polled twice a second by `shoal seed`: not audited."""
    op = operator_of(request)
    job = request.app[PRESEEDER_KEY].jobs.get(request.match_info["job"])
    if job is None or ("admin" not in op.roles and job.owner != op.principal):
        raise errors.NotFound(errors.NOT_FOUND, "no such pre-seed job")
    return web.json_response(job.summary().to_json())


async def status(request: web.Request) -> web.Response:
    """Counts only: this route is public, and which blobs are seeded tells what the cluster pulls."""
    seeder = request.app[SEEDER_KEY]
    return web.json_response({
        "seeding": len(seeder.seeded()),
        "registered": len(seeder.registration.registered),
        "cache_bytes": seeder.store.used_bytes,
        "cache_budget_bytes": seeder.store.max_bytes,
    })


async def seeded(request: web.Request) -> web.Response:
    """GET SEEDED (admin): which blobs the origin seeds tells what the cluster pulls."""
    op = operator_of(request)
    operators = request.app[OPERATORS_KEY]
    await operators.record(request, principal=op.principal, authz_method=operators.method_of(op), action="seeded",
                           status=200, outcome="complete", detail={})
    blobs = [protocol.SeededBlob(str(p.meta.digest), p.meta.size, p.meta.info_hash.hex())
             for p in request.app[SEEDER_KEY].seeded()]
    return web.json_response(protocol.Seeded(blobs).to_json())


def build(config: OriginConfig) -> web.Application:
    # Read every secret now so a bad file fails at start with the key named.
    token = read_token(config.registration_token, "registration_token")
    node_token = read_token(config.node_token, "node_token")
    assert config.signing_key is not None  # validate() requires it
    key = signing.load_private_key(config.signing_key, "signing_key")
    creds = {u.name: u.credentials(f"upstreams[{i}]") for i, u in enumerate(config.upstreams)}
    audit_store = store_for(config)  # (reads the PostgreSQL password now)
    pg = config.audit.postgresql
    log.info("audit trail, enrollments and bans in %s", "SQLite in the data directory" if pg is None else
             f"PostgreSQL {pg.dbname} at {pg.host}:{pg.port} as {pg.user}")
    if config.origins:
        log.info("origin %s of %s, %d owners per blob", config.name, ", ".join(o.name for o in config.origins),
                 config.origin_replication)
    peer_token = read_token(config.peer_token, "peer_token") if config.origins else None
    if peer_token is not None and peer_token in (token, node_token):
        raise ConfigError("peer_token: must differ from node_token and registration_token (nodes and the "
                          "tracker hold those)")
    notify_token = None
    if config.notifications is not None:
        notify_token = read_token(config.notifications.token, "notifications.token")
        if notify_token in (token, node_token, peer_token):
            raise ConfigError("notifications.token: must differ from node_token, registration_token and "
                              "peer_token (the registry would hold a cluster secret)")

    registry = component_registry("origin")
    metrics = SeederMetrics(registry)
    notify_metrics = push_notifications.NotificationMetrics(registry) if notify_token is not None else None
    operators = Operators(config.operators, cluster_secrets={"node token": node_token, "registration token": token,
                                                           **({"peer token": peer_token} if peer_token else {}),
                                                           **({"notification token": notify_token}
                                                              if notify_token else {})},
                          registry=registry)
    app = web.Application(client_max_size=protocol.JOURNAL_MAX_BODY, middlewares=[error_middleware()])
    app[OPERATORS_KEY] = operators

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        http = httpclient.session(limit=200, limit_per_host=64)
        store = BlobStore(Path(config.data_dir), max_bytes=config.cache.max_bytes)
        swarm = Swarm(SwarmSettings.from_config(config.torrent, SEEDER_FINGERPRINT, tracker_order=config.listen))
        upstreams = {
            u.name: Upstream(u.name, RegistryClient(http, u.url, credentials=creds[u.name], user_agent=USER_AGENT,
                                                    token_realms=u.token_realms, redirect_hosts=u.redirect_hosts))
            for u in config.upstreams
        }
        registration = TrackerRegistration(http, config.tracker_urls, token)
        seeder = Seeder(store=store, swarm=swarm, registration=registration, upstreams=upstreams,
                        announce=config.announce, max_blob_size=config.max_blob_size, metrics=metrics,
                        key=key, token_ttl=config.swarm_token_ttl)
        app[ADMISSIONS_KEY] = Admissions(key=key, upstreams=upstreams, ttl=config.admission_ttl,
                                         grant_ttl=config.swarm_token_ttl)
        collector = Collector(audit_store, max_nodes=config.max_nodes)

        async def preseed_finished(job: Job) -> None:
            await operators.record_job(job)

        replicas = None
        if config.origins:
            # (validate() and build() checked both)
            assert config.name is not None
            assert peer_token is not None
            replicas = Replicas(http=http, name=config.name, origins=config.origins,
                                replication=config.origin_replication, peer_token=peer_token, seeder=seeder,
                                registry=registry)
            seeder.unregister_on_evict = len(config.origins) == 1
        preseeder = Preseeder(seeder, concurrency=config.preseed_concurrency, finished=preseed_finished,
                              replicas=replicas)
        notifications = None
        if config.notifications is not None:
            assert notify_metrics is not None
            notify_upstream = config.notifications.upstream or config.upstreams[0].name  # (validate() checked)
            notifications = push_notifications.Notifications(
                config.notifications, upstream=notify_upstream,
                upstream_url=next(u.url for u in config.upstreams if u.name == notify_upstream),
                preseeder=preseeder, metrics=notify_metrics, record=_push_recorder(operators))
        operator_registry = config.operators.registry
        operators.attach(upstreams[operator_registry.upstream].client if operator_registry else None,
                         collector.record_operator)
        # Whatever interrupts start-up or shutdown (a failure, a second signal), everything that
        # was opened is closed, in reverse order.
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(http.close)
            await collector.open()
            stack.push_async_callback(collector.close)
            await store.open()
            stack.push_async_callback(store.close)
            await swarm.start()
            stack.push_async_callback(swarm.stop)
            app[SWARM_KEY] = swarm
            await seeder.start()
            stack.push_async_callback(seeder.stop)
            stack.push_async_callback(preseeder.stop)
            if notifications is not None:
                notifications.start()
                stack.push_async_callback(notifications.stop)
                app[NOTIFICATIONS_KEY] = notifications
            if replicas is not None:
                stack.push_async_callback(replicas.stop)
                app[REPLICAS_KEY] = replicas
            registry.register(SwarmCollector("shoal_origin", swarm))
            registry.register(StoreCollector("shoal_origin", store))
            app[SEEDER_KEY] = seeder
            copies = FirstCopies(registry, rate=swarm.upload_limit) if config.first_copy else None
            app[RELAYS_KEY] = Relays(seeder.fetching.get, seeder.is_seeding, registry,
                                     on_sent=copies.relayed if copies is not None else None)
            if copies is not None:
                app[FIRST_COPIES_KEY] = copies
            app[PRESEEDER_KEY] = preseeder
            app[COLLECTOR_KEY] = collector
            registry.register(CollectorMetrics(collector))
            registry.register(AdmissionMetrics(app[ADMISSIONS_KEY]))
            yield

    async def ready() -> str | None:
        seeder = app.get(SEEDER_KEY)
        if seeder is None:
            return "starting"
        # PostgreSQL down: nodes can neither enroll, be admitted nor ship their journal here
        return await app[COLLECTOR_KEY].check()

    app.cleanup_ctx.append(lifecycle)
    add_routes(app, [
        (protocol.ADMISSION, admission, "node"),
        (protocol.RELAY, relay, "node"),
        (protocol.FIRST_COPY, first_copy, "node"),
        (protocol.GRANTS, grants, "node"),
        (protocol.JOURNAL, receive_journal, "node"),
        (protocol.AUDIT, query_audit, "audit"),
        (protocol.PRESEED, submit_preseed, "seed"),
        (protocol.PRESEED_JOB, get_preseed, "seed"),
        (protocol.STATUS, status, "public"),
        (protocol.SEEDED, seeded, "admin"),
    ], {"node": f"Bearer {node_token}"}, operators=operators)
    if peer_token is not None:  # several origins: only they reach this route
        add_routes(app, [(protocol.REPLICA, replica, "origin")], {"origin": f"Bearer {peer_token}"})
    if notify_token is not None:  # pre-seed on push: only the registry (its token) reaches this route
        assert notify_metrics is not None
        unauthorized = notify_metrics.events.labels("unauthorized")
        add_routes(app, [(protocol.NOTIFICATIONS, receive_notification, "registry")],
                   {"registry": f"Bearer {notify_token}"}, refused={protocol.NOTIFICATIONS: unauthorized.inc})
    async def fresh_stats() -> None:
        swarm = app.get(SWARM_KEY)
        if swarm is not None:
            await swarm.fresh_stats()

    add_ops_routes(app, registry, ready, refresh=fresh_stats)
    # the status page at / (origin/page.py): wired to the seeder, jobs and collector once they run
    page = StatusPage(operators, registry, refresh=fresh_stats)

    async def page_sources(app: web.Application) -> AsyncIterator[None]:
        seeder, collector = app[SEEDER_KEY], app[COLLECTOR_KEY]
        page.attach(app[PRESEEDER_KEY],
                    lambda: (seeder.store.used_bytes, seeder.store.max_bytes, len(seeder.store.digests())))
        collector.on_stored = page.tally.add
        yield
        collector.on_stored = None

    app.cleanup_ctx.append(page_sources)  # (after lifecycle, before the page's sampling)
    page.add_routes(app, query_audit)
    return app


def _push_recorder(operators: Operators) -> push_notifications.Recorder:
    async def record(item: push_notifications.Queued, job_id: str) -> None:
        await operators.record_automatic(
            principal=push_notifications.PRINCIPAL, action="preseed", authz_method="notification-token",
            client_addr=item.client_addr, user_agent=item.user_agent,
            detail={"images": [str(item.ref)], "platforms": item.platforms, "job": job_id,
                    "pushed_by": item.push.actor})
    return record


class CollectorMetrics(PromCollector):
    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text, value in (
            ("stored", "Journal records stored", self.collector.stored),
            ("duplicates", "Journal records received again and dropped", self.collector.duplicates),
            ("rejected", "Journal records refused as malformed", self.collector.rejected),
        ):
            c = CounterMetricFamily(f"shoal_origin_journal_{name}_records", text)
            c.add_metric([], float(value))
            yield c
        c = CounterMetricFamily("shoal_origin_enrollment_refusals",
                                "Swarm tokens refused for a node name bound to another key, a banned key, or "
                                "past max_nodes")
        c.add_metric([], float(self.collector.enrollment_refusals))
        yield c
        c = CounterMetricFamily("shoal_origin_audit_store_unavailable",
                                "Collector calls (journal, enrollment, admission, audit) answered 503: the audit "
                                "store (PostgreSQL) was unreachable")
        c.add_metric([], float(self.collector.unavailable))
        yield c


class AdmissionMetrics(PromCollector):
    def __init__(self, admissions: Admissions) -> None:
        self.admissions = admissions

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily("shoal_origin_admission_checks",
                                "Admissions to a blob's swarm by how the registry's answer was had: asked "
                                "(allowed, denied) or from the last answer for the same credential (cached)",
                                labels=["result"])
        for result, value in self.admissions.checks.items():
            c.add_metric([result], float(value))
        yield c
