"""Two tracker replicas on one real Redis, with real agents and the origin seeder: losing the
replica the nodes announce to, and restarting Redis, cost no pull its swarm."""

from __future__ import annotations

import hashlib
import threading
import urllib.request
from pathlib import Path

import pytest

from shoal import protocol
from shoal.metainfo import Metainfo
from shoal.swarm import SwarmSettings
from tests.e2e.conftest import Images
from tests.support.images import Blob
from tests.support.procs import Component, free_port, wait_for
from tests.support.redis import RedisServer
from tests.support.registry import Registry, pulls_since
from tests.support.stack import Stack

MIB = 1 << 20


def first_tracker(node: str, trackers: list[str]) -> str:
    """The replica a node announces to first (shoal.swarm spreads nodes by name)."""
    meta = Metainfo(b"", None, 0, 0, b"", trackers[0], "", tuple(trackers))  # type: ignore[arg-type]
    return SwarmSettings("127.0.0.1", 1, "-x-", tracker_order=node).trackers(meta, None)[0]


class Pull(threading.Thread):
    """A client fetching a blob through an agent; the body is hashed against the digest."""

    def __init__(self, agent: Component, blob: Blob) -> None:
        super().__init__(daemon=True)
        self.agent, self.blob = agent, blob
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        url = f"http://{self.agent.config['listen']}/v2/private/app/blobs/{self.blob.digest}"
        try:
            with urllib.request.urlopen(url, timeout=90) as resp:
                self.digest = "sha256:" + hashlib.sha256(resp.read()).hexdigest()
        except BaseException as exc:  # reported by check()
            self.error = exc

    def check(self) -> None:
        self.join(120)
        assert not self.is_alive(), "the pull did not finish"
        assert self.error is None, self.error
        assert self.digest == self.blob.digest


def from_the_swarm(agent: Component) -> None:
    """The agent's download came from peers, with no fallback to the registry."""
    wait_for(lambda: agent.metric("shoal_agent_downloads_total", result="ok") == 1, what="the download recorded")
    assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1
    assert agent.metric("shoal_agent_fallbacks_total") == 0


@pytest.mark.slow  # long by nature: run with --slow (CI does)
def test_a_replica_lost_and_redis_restarted_mid_rollout(stack: Stack, registry: Registry, images: Images,
                                                        tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        blob = max(images.app().blobs.values(), key=lambda b: b.size)
        before = registry.settle()
        second = f"127.0.0.1:{free_port()}"
        replicas = [stack.start_tracker(redis=redis.settings("e2e:")),
                    stack.start_tracker(listen=second, name="tracker1", redis=redis.settings("e2e:"))]
        urls = [stack.cluster.tracker_url, f"http://{second}"]
        announces = [protocol.ANNOUNCE.url(u) for u in urls]
        # every node announces to replica 0 first: the one that will be lost
        names = [n for n in (f"node-{i}" for i in range(64)) if first_tracker(n, announces) == announces[0]][:5]
        # the seeder is slow enough (16 MiB/s) for the loss to fall in the middle of the pulls.
        # First copies off: the swarm's path is the one under test, and with Redis down (below)
        # the round `stack.admit` opened would hand the node the blob over HTTP before the
        # tracker's refusal came (a fallback, or none, by a race)
        stack.start_origin(tracker=None, trackers=urls, torrent={"upload_rate_limit": "16MiB"}, first_copy=False)
        agents = [stack.start_agent(node=name) for name in names[:4]]
        first = [Pull(a, blob) for a in agents[:2]]
        for p in first:
            p.start()
        # (one of the two may have the blob from the origin's relay instead)
        wait_for(lambda: max(a.metric("shoal_agent_swarm_received_payload_bytes_total") for a in agents[:2]) > 8 * MIB,
                 what="pieces flowing")
        assert replicas[0].metric("shoal_tracker_announces_total", result="ok") >= 2  # it was the one in use
        # each node announces to its first replica only (the replicas share the load; they do
        # not each take every announce): the other never heard from these two
        before_kill = replicas[1].log_path.read_text()
        assert not any(f" from {name} " in before_kill for name in names[:2]), before_kill[-2000:]
        heard = replicas[1].metric("shoal_tracker_announces_total", result="ok")
        replicas[0].stop(kill=True)
        # two more nodes join now: they reach the swarm through the other replica
        later = [Pull(a, blob) for a in agents[2:]]
        for p in later:
            p.start()
        for p in first + later:
            p.check()
        for a in agents:
            from_the_swarm(a)
        assert replicas[1].metric("shoal_tracker_announces_total", result="ok") >= heard + 2  # the late nodes
        # the registry served the blob once: to the origin
        assert registry.blob_gets(list(pulls_since(before, registry.settle())))[blob.digest] == 1

        # Redis restarts (append-only file): the swarm is there at the next announce
        redis.restart()
        fifth = stack.start_agent(node=names[4])
        pull = Pull(fifth, blob)
        pull.start()
        pull.check()
        from_the_swarm(fifth)
        assert registry.blob_gets(list(pulls_since(before, registry.settle())))[blob.digest] == 1

        # Redis down: every replica answers "tracker store unavailable", which names no peer; the
        # node falls back to the registry for that reason at once, not after first_piece_timeout.
        # (The blob is seeded first: cold, the node would have the origin's relay of its fetch.)
        other = sorted(images.app().blobs.values(), key=lambda b: b.size)[-2]
        stack.admit(other.digest)
        redis.stop()
        pull = Pull(fifth, other)
        pull.start()
        pull.check()
        wait_for(lambda: fifth.metric("shoal_agent_fallbacks_total", reason="tracker_unreachable") == 1,
                 what="a fallback for want of a tracker")
        assert fifth.metric("shoal_agent_fallbacks_total", reason="no_first_piece") == 0
    finally:
        stack.close()
        redis.stop()
