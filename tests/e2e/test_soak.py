"""The soak in the suite (--slow): minutes of mixed load on a cluster with a short announce
interval, so that peer expiry, eviction, journal rolls and hang-ups all recur many times, judged
against the same targets as `python -m bench.soak` (tests/support/soakcheck.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import USERS
from tests.support import soak, soakcheck
from tests.support.redis import RedisServer
from tests.support.registry import Registry

MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_soak(registry: Registry, workdir: Path, store: str, tmp_path: Path) -> None:
    """The embedded default (one tracker, its swarms in memory) for 4 minutes; two tracker
    replicas on a real Redis for 2.5 (peer TTL 16 s: ten expiries over; keys, tokens and the
    announce script under the same load)."""
    redis = RedisServer(tmp_path / "redis").start() if store == "redis" else None
    plan = soak.Plan(seconds=240 if redis is None else 150, images=12, layers=24, min_layer=1 * MIB, max_layer=6 * MIB,
                     cache_budget=40 * MIB, clients=(2, 4), think=(0.0, 0.5), tracker_interval=2, sample_every=2.0,
                     # tokens and certificates renew every 30 s: eight times over on live torrents
                     swarm_token_ttl=60, together_every=30.0, seed=3,
                     # shipped segments roll at 128 KiB (about 250 requests; 1 MiB by default), so that
                     # rolls recur on a slow machine too: one CI run's 4 minutes wrote under a MiB
                     journal_roll=128 << 10)
    try:
        run = soak.start(plan, workdir, registry, pusher=("alice", USERS["alice"]), node_user=("node", USERS["node"]),
                         seeder_user=("seeder", USERS["seeder"]),
                         redis=redis.settings("soak:") if redis is not None else None)
        try:
            soak.drive(run)
            verdict = soakcheck.judge(run)
        finally:
            run.stack.close()
    finally:
        if redis is not None:
            redis.stop()
    assert run.requests and verdict.summary["distinct_bytes"] > 2 * plan.cache_budget  # eviction never stops
    assert verdict.summary["evictions"] > 0
    # the journal's roll ran too: two rolls take about 0.3 MiB of records; each agent wrote 0.7 MiB
    # or more in every run here
    assert all(verdict.summary[f"agent{n}.journal_rolls"] >= 2 for n in range(plan.agents)), verdict.summary
    assert verdict.met, "\n".join(f"{t.name}: {t.measured}" for t in verdict.failures()) + "\n" + \
        json.dumps(verdict.summary, indent=1, default=str)[:6000]
