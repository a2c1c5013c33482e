"""Every metric the chart's alert rules and Grafana dashboard use exists in the real components'
/metrics, scraped after a pull (so labelled series exist), the agent's through the chart's own
metrics sidecar (helm/shoal/files/metrics_proxy.py), which forwards /metrics and nothing else."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from shoal import protocol
from tests.deploy.chart import CHART, FULL, metric_names, template
from tests.e2e.conftest import Images
from tests.support.procs import Component, free_port, http_get, parse_metrics, proc_stats, wait_http
from tests.support.stack import Stack

MIB = 1 << 20
PROXY_IP = "127.0.0.9"  # another "host address" than the agent's 127.0.0.2


@contextlib.contextmanager
def sidecar(agent_url: str, ip: str = PROXY_IP) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The sidecar as the chart runs it: python3 FILE [HOST_IP]:PORT AGENT_URL."""
    port = free_port(ip)
    where = f"[{ip}]:{port}"
    proc = subprocess.Popen([sys.executable, str(CHART / "files" / "metrics_proxy.py"), where, agent_url])
    try:
        yield f"http://{where if ':' in ip else f'{ip}:{port}'}", proc
    finally:
        proc.terminate()
        proc.wait(10)


def _pull(agent: Component, repo: str, digests: list[str]) -> None:
    for digest in digests:
        status, body = http_get(f"{agent.url}/v2/{repo}/blobs/{digest}", timeout=60)
        assert status == 200, (digest, status)
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


def test_every_metric_in_rules_and_dashboard_exists(stack: Stack, images: Images, tmp_path: Path) -> None:
    used = metric_names(template(FULL, tmp_path))
    assert len(used) >= 15, sorted(used)
    image = images.get("private/helm-metrics", layers=[3 * MIB, 200_000], seed=141)
    digests = list(image.blobs)
    stack.start(agents=1)
    agent = stack.agents[0]
    with sidecar(agent.url) as (url, proc):
        wait_http(protocol.METRICS.url(url), proc=proc)
        _check(stack, agent, url, proc, used, digests)


def _check(stack: Stack, agent: Component, url: str, proc: subprocess.Popen[bytes], used: set[str],
           digests: list[str]) -> None:
    _pull(agent, "private/helm-metrics", digests)  # the 3 MiB layer through the swarm
    _pull(agent, "private/helm-metrics", digests)  # then from the cache
    status, body = http_get(protocol.METRICS.url(url))
    assert status == 200
    agent_samples = parse_metrics(body.decode())
    assert sum(s.value for s in agent_samples
               if s.name == "shoal_agent_served_bytes_total" and s.labels["source"] == "peers") >= 3 * MIB
    assert sum(s.value for s in agent_samples
               if s.name == "shoal_agent_served_bytes_total" and s.labels["source"] == "cache") >= 3 * MIB
    assert stack.origin is not None and stack.tracker is not None
    exported = {s.name for s in [*agent_samples, *stack.origin.metrics(), *stack.tracker.metrics()]}
    assert used - exported == set()
    # the sidecar serves nothing but /metrics: the mirror API stays on the loopback
    assert http_get(f"{url}/v2/private/helm-metrics/blobs/{digests[0]}")[0] == 404
    assert http_get(protocol.HEALTHZ.url(url))[0] == 404
    print(f"\nmetrics sidecar RSS {proc_stats(proc.pid)[0] / MIB:.1f} MiB; {len(used)} metric names checked")


def test_metrics_sidecar_answers_502_without_the_agent() -> None:
    with sidecar(f"http://127.0.0.10:{free_port('127.0.0.10')}") as (url, proc):
        wait_http(protocol.METRICS.url(url), ok=(502,), proc=proc)
        assert http_get(protocol.METRICS.url(url))[0] == 502


def test_metrics_sidecar_on_an_ipv6_node_address() -> None:
    """An IPv6 node: the chart passes [fd00::7]:9150; here [::1] (and the same 502 without an agent)."""
    with sidecar(f"http://[::1]:{free_port('::1')}", ip="::1") as (url, proc):
        assert url.startswith("http://[::1]:")
        wait_http(protocol.METRICS.url(url), ok=(502,), proc=proc)
        assert http_get(protocol.METRICS.url(url))[0] == 502
        assert http_get(protocol.HEALTHZ.url(url))[0] == 404
