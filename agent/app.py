"""The agent's aiohttp application: wiring, error translation, request log, ops routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal import errors, httpclient, peercerts, protocol, signing
from shoal.config import read_token
from shoal.metrics import StoreCollector, SwarmCollector, component_registry
from shoal.registry import RegistryClient
from shoal.store import BlobStore
from shoal.swarm import AGENT_FINGERPRINT, Swarm, SwarmSettings
from shoal.web import BEFORE_STOP_KEY, SERVICE_READY_KEY, WATCHDOG_SECRET_KEY, add_ops_routes, add_routes
from shoal_agent.api import MirrorApi
from shoal_agent.authz import Authorizer, Decisions, fingerprint_key
from shoal_agent.config import AgentConfig
from shoal_agent.configurator import Configurator, bring_files, job_for
from shoal_agent.fetcher import Fetcher
from shoal_agent.hostsconf import State
from shoal_agent.journal import DEFAULT_MAX_DISK_BYTES, Journal
from shoal_agent.manifests import ManifestKeeper
from shoal_agent.membership import SwarmAccess
from shoal_agent.metrics import AgentMetrics
from shoal_agent.page import StatusPage
from shoal_agent.recording import journal_middleware
from shoal_agent.responses import abort, error_response
from shoal_agent.shipper import Shipper
from shoal_agent.state import state_of
from shoal_agent.upstreams import Upstream, Upstreams

log = logging.getLogger(__name__)

API_KEY = web.AppKey("api", MirrorApi)
SWARM_KEY = web.AppKey("swarm", Swarm)
USER_AGENT = "shoal-agent/0.1"
NODE_KEY_FILE = "node.key"  # this node's Ed25519 key, made on first start (0600)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _middleware(metrics: AgentMetrics) -> Middleware:
    @web.middleware
    async def oci_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        state = state_of(request)
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, ConnectionError) and (state.response_started or _closed(request)):
                # cut by the agent (responses.abort) or by the client hanging up
                outcome = "aborted" if state.aborted else "client_gone"
                metrics.requests.labels(state.audit.kind, request.method, outcome).inc()
                raise
            if state.response_started:
                # Never write an error response into a started body (see responses.abort).
                abort(request, exc)
                raise ConnectionResetError("response aborted") from exc
            resp = _error_for(request, exc)
        kind = state.audit.kind
        if request.path.startswith("/v2"):
            metrics.requests.labels(kind, request.method, str(resp.status)).inc()
        log.debug("%s %s -> %d (%s, %.1f ms)", request.method, request.rel_url.path, resp.status,
                  state.audit.source or "-", (time.monotonic() - started) * 1000)
        return resp

    return oci_errors


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _client_gone() -> Middleware:
    @web.middleware
    async def quiet_hangups(request: web.Request, handler: Handler) -> web.StreamResponse:
        """A client hanging up mid-response is routine (containerd cancels, pods are deleted):
        the journal records the response `aborted`; here it ends without aiohttp's ERROR and
        traceback ("Error handling request"), which alerts on error logs would page on."""
        try:
            return await handler(request)
        except ConnectionError as exc:
            transport = request.transport
            if transport is not None:
                transport.abort()  # nothing more goes out on this connection
            if not state_of(request).aborted:  # the agent's own cuts were logged as warnings already
                log.info("client went away during %s %s (%s)", request.method, request.rel_url.path,
                         type(exc).__name__)
            # aiohttp cannot send this on the closed connection and finishes quietly
            return web.Response(status=499)

    return quiet_hangups


def _error_for(request: web.Request, exc: Exception) -> web.StreamResponse:
    if not isinstance(exc, (errors.ShoalError, web.HTTPException)):
        log.exception("internal error serving %s %s", request.method, request.rel_url.path)
    return error_response(exc)  # aiohttp's own 404/405 (paths outside /v2/) included


def build(config: AgentConfig) -> web.Application:
    creds = {u.name: u.credentials(f"upstreams[{i}]") for i, u in enumerate(config.upstreams)}
    registry = component_registry("agent")
    metrics = AgentMetrics(registry)
    data = Path(config.data_dir)
    access = None
    if config.tracker is not None:
        log.warning("tracker: no longer used by agents (announces go to the tracker the origin names in each "
                    "torrent); remove it from the configuration")
    if config.origin_entries and config.origin_public_key is not None:
        access = SwarmAccess(origins=tuple(config.origin_entries), node=config.node,
                             node_token=read_token(config.node_token, "node_token"),
                             origin_key=signing.load_public_key(config.origin_public_key, "origin_public_key"),
                             replication=config.origin_replication)
    shipped = access is not None and config.journal.ship
    # this node's identity in the cluster (its swarm certificate, its journal signatures)
    node_key = peercerts.NodeKey.load_or_create(data / NODE_KEY_FILE, "data_dir") if access is not None else None
    journal = Journal(data / "journal", max_segment_bytes=config.journal.max_segment_bytes,
                      max_disk_bytes=config.journal.max_disk_bytes or (DEFAULT_MAX_DISK_BYTES if shipped else None))
    # The mirror API reads no request body (push verbs get 405): a declared body past 64 KiB is
    # refused before any handler runs (shoal/web.py).
    app = web.Application(client_max_size=64 * 1024,
                          middlewares=[_client_gone(), journal_middleware(journal, config.node),
                                       _middleware(metrics)])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            http = httpclient.session(limit=256, limit_per_host=64)
            stack.push_async_callback(http.close)
            store = BlobStore(data / "cache", max_bytes=config.cache.max_bytes)
            await store.open()
            stack.push_async_callback(store.close)
            decisions = Decisions(data / "decisions")
            await decisions.open(config.auth.stale_decision_max_age)
            stack.push_async_callback(decisions.close)
            keeper = ManifestKeeper(data / "manifests", max_age=config.auth.stale_decision_max_age)
            await keeper.open()
            stack.push_async_callback(keeper.close)
            await journal.open()
            stack.push_async_callback(journal.close)
            if configurator is not None:
                # stopped first (last callback; and before the listening socket closes,
                # BEFORE_STOP_KEY), before the rest closes
                await configurator.start()
                registry.register(MirroringCollector(configurator))
            swarm = None
            if access is not None:
                swarm = Swarm(SwarmSettings.from_config(config.torrent, AGENT_FINGERPRINT, zone=config.zone,
                                                       tracker_order=config.node), node_key)
                await swarm.start()
                stack.push_async_callback(swarm.stop)
                app[SWARM_KEY] = swarm
                registry.register(SwarmCollector("shoal_agent", swarm))
            fetcher = Fetcher(store=store, swarm=swarm, http=http, access=access, policy=config.swarm,
                              metrics=metrics)
            await fetcher.start()
            stack.push_async_callback(fetcher.stop)
            if shipped:
                assert access is not None
                assert node_key is not None
                # several origins: the first live one in the rendezvous order of this node's name
                membership = fetcher.membership
                assert membership is not None
                shipper = Shipper(journal, [(name, membership.origins[name]) for name in membership.ranked_for_node()],
                                  node=config.node, key=node_key.private_key, before=membership.enroll_at,
                                  not_enrolled=membership.forget_enrollment, roll_bytes=config.journal.roll_size)
                task = asyncio.create_task(shipper.run())
                stack.push_async_callback(_cancel, task)
                registry.register(JournalCollector(journal, shipper))
            else:
                registry.register(JournalCollector(journal, None))
                log.warning("the pull journal is kept on this node only (no origin to ship it to)")
            registry.register(StoreCollector("shoal_agent", store))
            if config.cache.scrub_interval > 0:
                stack.push_async_callback(_cancel, asyncio.create_task(_scrub(store, config.cache.scrub_interval)))
            upstreams = Upstreams([
                Upstream(u.name, RegistryClient(http, u.url, credentials=creds[u.name], user_agent=USER_AGENT,
                                                read_timeout=config.registry_read_timeout,
                                                token_realms=u.token_realms, redirect_hosts=u.redirect_hosts))
                for u in config.upstreams
            ])
            registry.register(RegistryRetries(upstreams))
            authorizer = Authorizer(config.auth, decisions,
                                    fingerprint_key(access.node_token if access is not None else None, data))
            app[API_KEY] = MirrorApi(upstreams=upstreams, store=store, fetcher=fetcher,
                                     authorizer=authorizer, keeper=keeper, auth=config.auth,
                                     metrics=metrics, max_blob_size=config.max_blob_size)
            if configurator is not None:
                stack.push_async_callback(configurator.stop)
            log.info("agent %s ready: %d upstream(s), swarm %s, auth %s/%s", config.node, len(config.upstreams),
                     "on" if swarm is not None else "off", config.auth.unauthenticated, config.auth.mode)
            yield

    async def ready() -> str | None:
        return None if API_KEY in app else "starting"

    async def root(request: web.Request) -> web.StreamResponse:
        return await request.app[API_KEY].root(request)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        return await request.app[API_KEY].dispatch(request)

    async def status(request: web.Request) -> web.StreamResponse:
        api = request.app[API_KEY]
        return web.json_response({
            "node": config.node,
            "cache_bytes": api.store.used_bytes,
            "cache_budget_bytes": api.store.max_bytes,
            "cached_blobs": len(api.store.digests()),
            "downloads_in_flight": api.fetcher.in_flight(),
            "seeding": len(api.fetcher.swarm.jobs()) if api.fetcher.swarm is not None else 0,
            "journal_records": journal.records_written,
        })

    configurator = None
    if config.containerd.config_path is not None:
        configurator = Configurator(job_for(config))
        # Before the mirror's port is bound: files a killed agent left still name that port, which
        # another process could hold now (and so get containerd's pulls and credentials).
        bring_files(configurator.job.plan, State.REDUCED)
        app[WATCHDOG_SECRET_KEY] = configurator.job.secret
        # containerd's files leave the agent's address while it still holds it (a clean stop)
        app[BEFORE_STOP_KEY] = [configurator.stop]
        # systemd's READY=1 (Type=notify, so kubelet's start) waits for containerd's files
        app[SERVICE_READY_KEY] = configurator.settled
    app.cleanup_ctx.append(lifecycle)
    add_routes(app, [
        # who may pull what is the registry's decision, asked for every request (authz.py)
        (protocol.MIRROR_BASE, root, "public"),
        (protocol.MIRROR_ROOT, root, "public"),
        (protocol.MIRROR, dispatch, "public"),
        (protocol.STATUS, status, "public"),
    ], {})
    async def fresh_stats() -> None:
        swarm = app.get(SWARM_KEY)
        if swarm is not None:
            await swarm.fresh_stats()

    add_ops_routes(app, registry, ready, refresh=fresh_stats)
    # the node's status page at / (agent/page.py): counts only, public as /metrics is
    StatusPage(config.node, registry, refresh=fresh_stats,
               in_flight=lambda: app[API_KEY].fetcher.in_flight() if API_KEY in app else 0).add_routes(app)
    return app


async def _scrub(store: BlobStore, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        bad = await store.scrub()
        log.info("scrubbed the cache: %d blobs, %d corrupt (evicted)", len(store.digests()), bad)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class MirroringCollector(Collector):
    def __init__(self, configurator: Configurator) -> None:
        self.configurator = configurator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("shoal_agent_containerd_mirroring",
                              "1 while containerd's hosts.toml files point at this agent (containerd.config_path)")
        g.add_metric([], 1.0 if self.configurator.mirroring.is_set() else 0.0)
        yield g


class RegistryRetries(Collector):
    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily("shoal_agent_registry_retries", "Registry requests retried after 429/5xx")
        c.add_metric([], float(sum(u.client.retries for u in self.upstreams.all())))
        yield c


class JournalCollector(Collector):
    def __init__(self, journal: Journal, shipper: Shipper | None) -> None:
        self.journal = journal
        self.shipper = shipper

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = CounterMetricFamily("shoal_agent_journal_records", "Pull journal records written (fsync'd)")
        c.add_metric([], float(self.journal.records_written))
        yield c
        # (collected in a thread: /metrics renders off the loop, so listing the directory is fine)
        g = GaugeMetricFamily("shoal_agent_journal_disk_bytes", "Bytes of journal segments on disk")
        g.add_metric([], float(self.journal.disk_bytes()))
        yield g
        if self.shipper is not None:
            g = GaugeMetricFamily("shoal_agent_journal_unshipped_bytes",
                                  "Journal bytes the collector has not acknowledged yet")
            g.add_metric([], float(self.shipper.unshipped_bytes()))
            yield g
            c = CounterMetricFamily("shoal_agent_journal_shipped_records", "Journal records the collector acknowledged")
            c.add_metric([], float(self.shipper.shipped_records))
            yield c
            c = CounterMetricFamily("shoal_agent_journal_ship_failures", "Failed attempts to ship a journal batch")
            c.add_metric([], float(self.shipper.failures))
            yield c
            c = CounterMetricFamily("shoal_agent_journal_collector_failovers",
                                    "Several origins: batches one collector did not take, offered to the next")
            c.add_metric([], float(self.shipper.failovers))
            yield c
            c = CounterMetricFamily("shoal_agent_journal_rejected_records",
                                    "Journal records the collector refused (a bug: records are made to fit)")
            c.add_metric([], float(self.shipper.rejected_records))
            yield c
