"""Operating shoal: configuration errors are one line naming the key, every component serves
/healthz, /readyz and /metrics, and `shoal up` runs a single node that containerd can pull through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shoal import cluster, protocol
from shoal_agent.metrics import FALLBACK_REASONS
from tests.e2e.conftest import USERS, Images
from tests.support.clients import Containerd, skopeo_copy, verify_dir
from tests.support.images import build_image, push
from tests.support.procs import ROOT, Component, free_port, http_get, series, wait_http
from tests.support.registry import Registry
from tests.support.stack import Stack


def run_module(component: str, config: dict[str, object] | str, workdir: Path) -> subprocess.CompletedProcess[str]:
    path = workdir / f"{component}-bad.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return subprocess.run(cluster.command(component, path), capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


UP = [{"name": "127.0.0.1:5000", "url": "http://127.0.0.1:5000"}]
# files that exist (their content stands in for secrets), so the error under test is the one reported
SOME_FILE = str(ROOT / "README.md")
TRACKER_KEYS = {"registration_token": {"file": SOME_FILE}, "node_token": {"file": SOME_FILE},
                "origin_public_key": SOME_FILE}


@pytest.mark.parametrize(("module", "config", "message"), [
    ("agent", {"data_dir": "/tmp/x", "upstreams": UP, "cache": {"max_bytes": "plenty"}},
     "shoal-agent: config error: cache.max_bytes: expected a size"),
    ("agent", {"data_dir": "/tmp/x", "upstreams": UP, "swarm": {"treshold": 1}},
     "shoal-agent: config error: swarm.treshold: unknown key"),
    ("agent", {"upstreams": UP}, "shoal-agent: config error: data_dir: required key is missing"),
    ("agent", {"data_dir": "/tmp/x", "upstreams": [{**UP[0], "username": "u", "password": {"file": "/nonexistent"}}]},
     "shoal-agent: config error: upstreams[0].password: cannot read secret file '/nonexistent'"),
    ("agent", "listen: [unclosed", "shoal-agent: config error: --config:"),
    ("tracker", {**TRACKER_KEYS, "registration_token": {"env": "SHOAL_NO_SUCH_VARIABLE"}},
     "shoal-tracker: config error: registration_token: environment variable 'SHOAL_NO_SUCH_VARIABLE' is not set"),
    ("tracker", {**TRACKER_KEYS, "interval": "often"},
     "shoal-tracker: config error: interval: expected a duration"),
    ("tracker", {**TRACKER_KEYS, "origin_public_key": "/nonexistent.pem"},
     "shoal-tracker: config error: origin_public_key: cannot read '/nonexistent.pem'"),
    ("tracker", TRACKER_KEYS, f"shoal-tracker: config error: origin_public_key: '{SOME_FILE}' is not a PEM public key"),
    ("tracker", {"registration_token": {"file": "/x"}}, "shoal-tracker: config error: origin_public_key: required"),
    ("origin", {"data_dir": "/tmp/x", "upstreams": UP, "tracker": "tracker:6969", "registration_token": {"file": "/x"}},
     "shoal-origin: config error: tracker: expected an http:// or https:// URL"),
    ("origin", {"data_dir": "/tmp/x", "upstreams": UP, "tracker": "http://t:1", "registration_token": {"file": "/x"},
                "node_token": {"file": "/x"}}, "shoal-origin: config error: signing_key: required"),
    ("agent", {"data_dir": "/tmp/x", "upstreams": UP, "tracker": "http://t:1", "origin": "http://o:1"},
     "shoal-agent: config error: node_token: give file or env"),
])
def test_config_errors_are_one_line(module: str, config: dict[str, object] | str, message: str, tmp_path: Path) -> None:
    result = run_module(module, config, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]


def test_port_in_use_is_one_line(stack: Stack, tmp_path: Path) -> None:
    tracker = stack.start_tracker()
    result = run_module("tracker", {**tracker.config, "data_dir": str(tmp_path / "t2")}, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"shoal-tracker: listen: cannot bind {tracker.config['listen']}: Address already in use"]


def test_health_readiness_and_metrics(stack: Stack, images: Images, workdir: Path) -> None:
    image = images.app()
    stack.start(agents=1)
    agent = stack.agents[0]
    # before any event, the series alerts use exist at 0 ("no data" would hide a problem)
    fresh = agent.metrics()
    for reason in FALLBACK_REASONS:
        assert [s.value for s in series(fresh, "shoal_agent_fallbacks_total", reason=reason)] == [0]
    for source in ("peers", "registry"):
        for result in ("ok", "failed"):
            assert [s.value for s in series(fresh, "shoal_agent_downloads_total", result=result, source=source)] == [0]
        assert [s.value for s in series(fresh, "shoal_agent_integrity_failures_total", source=source)] == [0]
    assert stack.tracker is not None
    assert [s.value for s in series(stack.tracker.metrics(), "shoal_tracker_torrents_without_seeders")] == [0]
    # the layers seeded first, so that they come through the swarm (cold, the first node asking
    # would have the origin's relay of its fetch instead: origin/relay.py)
    for blob in image.blobs.values():
        if blob.size >= 1 << 20:
            stack.admit(blob.digest)
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "a")
    verify_dir(workdir / "a", image)
    skopeo_copy(f"{agent.config['listen']}/private/app:v1", workdir / "b")
    verify_dir(workdir / "b", image)
    for component in (stack.tracker, stack.origin, agent):
        assert component is not None
        for path in (protocol.HEALTHZ.path(), protocol.READYZ.path()):
            status, _ = http_get(component.url + path)
            assert status == 200, (component.name, path)
    m = agent.metrics()
    assert agent.metric("shoal_agent_cache_hits_total") == len(image.blobs)
    assert agent.metric("shoal_agent_cache_misses_total") == len(image.blobs)
    assert agent.metric("shoal_agent_served_bytes_total", source="cache") == image.total_blob_bytes
    assert agent.metric("shoal_agent_served_bytes_total", source="peers") > 0
    assert agent.metric("shoal_agent_served_bytes_total", source="registry") > 0
    assert agent.metric("shoal_agent_download_seconds_count", source="peers") >= 1
    assert agent.metric("shoal_agent_swarm_peers_connected") >= 0
    # a lone node takes every piece of a blob's first copy from the origin (origin/firstcopy.py)
    large = sum(b.size for b in image.blobs.values() if b.size >= 1 << 20)
    assert agent.metric("shoal_agent_first_copy_bytes_total") == large
    assert stack.origin is not None and stack.origin.metric("shoal_origin_first_copy_bytes_total") == large
    assert series(m, "shoal_agent_swarm_received_payload_bytes_total")  # (0 or more: exported)
    assert series(m, "shoal_agent_swarm_received_redundant_bytes_total")
    assert agent.metric("shoal_agent_cache_bytes") == image.total_blob_bytes
    assert series(m, "shoal_agent_requests_total")
    assert stack.origin is not None and stack.tracker is not None
    assert stack.origin.metric("shoal_origin_registry_bytes_total") > 0
    assert series(stack.origin.metrics(), "shoal_origin_swarm_sent_payload_bytes_total")
    assert stack.tracker.metric("shoal_tracker_announces_total", result="ok") > 0
    assert stack.tracker.metric("shoal_tracker_torrents") >= 1


def test_shoal_up_single_node(registry: Registry, images: Images, containerd: Containerd, tmp_path: Path) -> None:
    """One command, one node, two registries (--upstream twice, a login for each)."""
    image = images.app()
    password = tmp_path / "node.password"
    password.write_text(USERS["node"])
    second = Registry(tmp_path / "registry2", users=USERS)
    second.start()
    small = build_image(tmp_path / "small", tag="v1", layer_sizes=[3 << 20, 40_000], seed=41)
    push(small, registry=second.host, repo="private/small", user="alice", password=USERS["alice"])
    listen = f"127.0.0.2:{free_port('127.0.0.2')}"
    tracker_listen, origin_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "up", "--upstream", registry.url, "--upstream", second.url,
         "--username", "node", "--password-file", str(password), "--username", "node", "--password-file",
         str(password), "--data-dir", str(tmp_path / "data"), "--listen", listen,
         "--tracker-listen", tracker_listen, "--origin-listen", origin_listen,
         "--agent-torrent-port", str(free_port()), "--origin-torrent-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)  # as a terminal's job
    try:
        wait_http(protocol.READYZ.url(f"http://{listen}"), timeout=60)
        agent = Component("agent", tmp_path, {"listen": listen})
        hosts = containerd.hosts_dir(registry.host, registry.url, agent)
        # pass-through: the agent relays the registry's challenge and forwards ctr's credentials
        containerd.pull(f"{registry.host}/private/app:v1", hosts, user=f"alice:{USERS['alice']}")
        containerd.verify_content(list(image.blobs))
        assert agent.metric("shoal_agent_requests_total", kind="blobs", status="200") == len(image.blobs)
        hosts = containerd.hosts_dir(second.host, second.url, agent)
        containerd.pull(f"{second.host}/private/small:v1", hosts, user=f"alice:{USERS['alice']}")
        containerd.verify_content(list(small.blobs))
        assert agent.metric("shoal_agent_requests_total", kind="blobs", status="200") == \
            len(image.blobs) + len(small.blobs)
        status = subprocess.run([sys.executable, "-m", "shoal.cli", "status", "--agent", f"http://{listen}",
                                 "--origin", f"http://{origin_listen}", "--tracker", f"http://{tracker_listen}"],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert status.returncode == 0, status.stdout
        assert "cached_blobs=" in status.stdout and "seeding=" in status.stdout
        # the local admin operator token shoal up made opens the audit (the banner's command)
        audit = subprocess.run([sys.executable, "-m", "shoal.cli", "audit", "--origin", f"http://{origin_listen}",
                                "--token-file", str(tmp_path / "data" / "keys" / "operator.token"),
                                "--format", "jsonl"], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert audit.returncode == 0, audit.stderr
        assert [(e["principal"], e["action"]) for e in map(json.loads, audit.stdout.splitlines())
                if e["kind"] == "operator"] == [("token:local-admin", "audit")]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job
        out, _ = proc.communicate(timeout=60)
        second.close()
    assert proc.returncode == 0, out
    assert "shoal is up for" in out and f'[host."http://{listen}"]' in out
    assert f"{second.url} (clients call it {second.host})" in out and f'server = "{second.url}"' in out
    operator_token = tmp_path / "data" / "keys" / "operator.token"
    assert f"shoal audit --origin http://{origin_listen} --token-file {operator_token}" in out
    # a clean stop: no component logs an ERROR (a second signal once cut the origin's cleanup short)
    assert " ERROR " not in out and "Traceback" not in out, out[-3000:]
    for hostport in (listen, tracker_listen, origin_listen):  # `shoal up` returns after its children
        with pytest.raises(OSError, match="refused"):
            http_get(protocol.HEALTHZ.url(f"http://{hostport}"), timeout=1)


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "upstreams": UP}))
    base = [*cluster.command("agent", path), "--check-config"]
    ok = subprocess.run([*base, "--cache-max-bytes", "5GiB", "--listen", "127.0.0.9:5000"], capture_output=True,
                        text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0
    assert ok.stdout.strip() == "shoal-agent: configuration is valid"
    bad = subprocess.run([*base, "--cache-max-bytes", "huge"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("shoal-agent: config error: cache.max_bytes: expected a size")
