"""containerd's hosts.toml as the agent keeps it (agent/hostsconf.py): what containerd reads in each
state, and that an operator's file survives byte for byte."""

from __future__ import annotations

import tomllib
from pathlib import Path

from shoal_agent.hostsconf import BACKUP, DEFAULT_DIR, MARKER, Plan, Registry, State, apply, merge

REGISTRY = Registry("registry.example.com:5000", "https://registry.example.com:5000")
AGENT = "http://127.0.0.1:5050"

OPERATORS = """# the operator's own settings
server = "https://registry.example.com:5000"
ca = "/etc/ssl/registry-ca.pem"

[host."https://other-mirror.example.com"]
  capabilities = ["pull"]
  [host."https://other-mirror.example.com".header]
    x-team = "infra"
"""


def plan(tmp_path: Path, *registries: Registry) -> Plan:
    return Plan(config_path=str(tmp_path), mirror=AGENT, dial_timeout=0.2, registries=registries or (REGISTRY,))


def hosts(tmp_path: Path, name: str = REGISTRY.name) -> Path:
    return tmp_path / name / "hosts.toml"


def test_mirror_puts_the_agent_first_and_the_registry_as_server(tmp_path: Path) -> None:
    assert apply(plan(tmp_path), REGISTRY, State.MIRROR)
    text = hosts(tmp_path).read_text()
    assert text.startswith(MARKER)
    doc = tomllib.loads(text)
    assert doc["server"] == REGISTRY.server
    assert list(doc["host"]) == [AGENT]
    assert doc["host"][AGENT] == {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    assert hosts(tmp_path).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in hosts(tmp_path).parent.iterdir()) == ["hosts.toml"]  # no temporary file left
    assert not apply(plan(tmp_path), REGISTRY, State.MIRROR)  # unchanged: not written again


def test_reduced_is_the_registry_alone_and_removed_leaves_nothing(tmp_path: Path) -> None:
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert apply(plan(tmp_path), REGISTRY, State.REDUCED)
    doc = tomllib.loads(hosts(tmp_path).read_text())
    assert doc == {"server": REGISTRY.server}
    assert apply(plan(tmp_path), REGISTRY, State.REMOVED)
    assert not hosts(tmp_path).parent.exists()


def test_an_operators_file_is_merged_kept_and_restored_byte_for_byte(tmp_path: Path) -> None:
    hosts(tmp_path).parent.mkdir()
    hosts(tmp_path).write_text(OPERATORS)
    (hosts(tmp_path).parent / "ca.crt").write_text("certificate")
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert (hosts(tmp_path).parent / BACKUP).read_text() == OPERATORS
    doc = tomllib.loads(hosts(tmp_path).read_text())
    # the operator's keys and hosts still apply; the agent is tried first
    assert doc["server"] == "https://registry.example.com:5000"
    assert doc["ca"] == "/etc/ssl/registry-ca.pem"
    assert list(doc["host"]) == [AGENT, "https://other-mirror.example.com"]
    assert doc["host"]["https://other-mirror.example.com"]["header"] == {"x-team": "infra"}
    apply(plan(tmp_path), REGISTRY, State.REDUCED)
    assert hosts(tmp_path).read_text() == OPERATORS
    assert not (hosts(tmp_path).parent / BACKUP).exists()
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    apply(plan(tmp_path), REGISTRY, State.REMOVED)
    assert hosts(tmp_path).read_text() == OPERATORS
    assert sorted(p.name for p in hosts(tmp_path).parent.iterdir()) == ["ca.crt", "hosts.toml"]


def test_a_file_the_operator_writes_while_the_agent_runs_becomes_the_original(tmp_path: Path) -> None:
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    hosts(tmp_path).write_text(OPERATORS)  # e.g. a configuration tool rewrote it
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert next(iter(tomllib.loads(hosts(tmp_path).read_text())["host"])) == AGENT
    assert (hosts(tmp_path).parent / BACKUP).read_text() == OPERATORS
    apply(plan(tmp_path), REGISTRY, State.REMOVED)
    assert hosts(tmp_path).read_text() == OPERATORS


def test_an_invalid_operators_file_is_replaced_while_mirroring_and_restored(tmp_path: Path) -> None:
    hosts(tmp_path).parent.mkdir()
    hosts(tmp_path).write_text("server = [unclosed\n")
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    doc = tomllib.loads(hosts(tmp_path).read_text())
    assert doc["server"] == REGISTRY.server
    assert list(doc["host"]) == [AGENT]
    apply(plan(tmp_path), REGISTRY, State.REMOVED)
    assert hosts(tmp_path).read_text() == "server = [unclosed\n"


def test_merge_finds_the_first_table_past_a_multiline_array() -> None:
    original = 'server = "https://r"\nca = [\n["a"],\n]\n\n[host."https://m"]\n  capabilities = ["pull"]\n'
    merged = merge(original, f'[host."{AGENT}"]\n  capabilities = ["pull"]\n')
    assert merged is not None
    doc = tomllib.loads(merged)
    assert doc["ca"] == [["a"]]
    assert list(doc["host"]) == [AGENT, "https://m"]
    assert merge("server = \n", "[host.x]\n") is None
    # a file that already names the agent is not merged (the agent's own file is written)
    assert merge(f'[host."{AGENT}"]\n', f'[host."{AGENT}"]\n') is None


def test_default_directory_has_no_server_and_goes_away_when_not_ready(tmp_path: Path) -> None:
    default = Registry(DEFAULT_DIR, None)
    apply(plan(tmp_path, default), default, State.MIRROR)
    doc = tomllib.loads(hosts(tmp_path, DEFAULT_DIR).read_text())
    assert "server" not in doc  # containerd uses each image's own registry after the agent
    assert list(doc["host"]) == [AGENT]
    apply(plan(tmp_path, default), default, State.REDUCED)
    assert not hosts(tmp_path, DEFAULT_DIR).exists()


def test_plan_round_trips_through_json(tmp_path: Path) -> None:
    p = plan(tmp_path, REGISTRY, Registry(DEFAULT_DIR, None))
    assert Plan.from_json(p.to_json()) == p


def test_the_watchdogs_job_follows_the_agents_configuration() -> None:
    from shoal_agent import config as agent_config
    from shoal_agent.configurator import job_for, local_url

    assert local_url("0.0.0.0:5050") == "http://127.0.0.1:5050"
    assert local_url("[::]:5050") == "http://[::1]:5050"
    assert local_url("127.0.0.3:80") == "http://127.0.0.3:80"
    doc = {"data_dir": "/tmp/x", "listen": "0.0.0.0:5050",
           "upstreams": [{"name": "registry.example.com:5000", "url": "https://registry.example.com:5000"}],
           "containerd": {"config_path": "/etc/containerd/certs.d", "default_host": True, "dial_timeout": "200ms"}}
    job = job_for(agent_config.load(doc))
    assert job.health == "http://127.0.0.1:5050/readyz"
    assert job.plan.mirror == "http://127.0.0.1:5050"
    assert job.plan.registries == (REGISTRY, Registry(DEFAULT_DIR, None))
    assert job.plan.dial_timeout == 0.2
    doc["containerd"] = {"config_path": "/c", "mirror": "http://node-a.local:5050"}
    assert job_for(agent_config.load(doc)).plan.mirror == "http://node-a.local:5050"
