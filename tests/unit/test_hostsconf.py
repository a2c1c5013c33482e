"""containerd's hosts.toml as the agent keeps it (agent/hostsconf.py): what containerd reads in each
state, and that an operator's file survives byte for byte."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from shoal_agent.hostsconf import BACKUP, DEFAULT_DIR, MARKER, Plan, Registry, State, apply, merge, release, render

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
    from shoal_agent.configurator import job_for
    from shoal_agent.hostsconf import local_url

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
    doc["containerd"] = {"config_path": "/c", "mirror": "http://127.0.0.5:5050"}
    assert job_for(agent_config.load(doc)).plan.mirror == "http://127.0.0.5:5050"


# Whoever can write in a registry directory (the agent's user, or a group given write access)
# must not make the agent write, copy or expose files elsewhere (attack14, F4/F5).

def test_a_symlinked_hosts_toml_is_left_alone(tmp_path: Path) -> None:
    managed = tmp_path / "managed.toml"
    managed.write_text('server = "https://registry.example.com:5000"\n')
    hosts(tmp_path).parent.mkdir()
    hosts(tmp_path).symlink_to(managed)
    for state in State:
        with pytest.raises(OSError, match="symbolic link"):
            apply(plan(tmp_path), REGISTRY, state)
    assert hosts(tmp_path).is_symlink()
    assert os.readlink(hosts(tmp_path)) == str(managed)
    assert managed.read_text() == 'server = "https://registry.example.com:5000"\n'
    assert not (hosts(tmp_path).parent / BACKUP).exists()


def test_a_symlinked_backup_or_directory_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "node.token"
    secret.write_text("s3cr3t")
    secret.chmod(0o600)
    hosts(tmp_path).parent.mkdir()
    (hosts(tmp_path).parent / BACKUP).symlink_to(secret)
    with pytest.raises(OSError, match="symbolic link"):
        apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert secret.read_text() == "s3cr3t"
    assert secret.stat().st_mode & 0o777 == 0o600
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other = Registry("other.example.com", "https://other.example.com")
    (tmp_path / other.name).symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        apply(plan(tmp_path, other), other, State.MIRROR)
    assert list(elsewhere.iterdir()) == []


def test_a_planted_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "key.pem"
    victim.write_text("PRIVATE KEY")
    victim.chmod(0o600)
    hosts(tmp_path).parent.mkdir()
    for name in (f".hosts.toml.{os.getpid()}.tmp", ".hosts.toml.tmp"):
        (hosts(tmp_path).parent / name).symlink_to(victim)
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert victim.read_text() == "PRIVATE KEY"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert not hosts(tmp_path).is_symlink()


def test_any_url_renders_valid_toml_and_no_value_lands_in_a_comment(tmp_path: Path) -> None:
    odd = Registry("registry.example.com:5000", "https://registry.example.com:5000/\U0001F600\"\\\x7f")
    for state in (State.MIRROR, State.REDUCED):
        text = render(plan(tmp_path, odd), odd, state, None)
        assert text is not None
        assert tomllib.loads(text)["server"] == odd.server
        assert all(AGENT not in line and "\U0001F600" not in line for line in text.splitlines()
                   if line.startswith("#"))


def test_release_reduces_only_files_that_still_name_the_agent(tmp_path: Path) -> None:
    apply(plan(tmp_path), REGISTRY, State.MIRROR)
    assert release(plan(tmp_path), REGISTRY)  # killed with its watchdog: the file still names it
    assert tomllib.loads(hosts(tmp_path).read_text()) == {"server": REGISTRY.server}
    assert not release(plan(tmp_path), REGISTRY)
    apply(plan(tmp_path), REGISTRY, State.REMOVED)  # a clean stop: nothing comes back
    assert not release(plan(tmp_path), REGISTRY)
    assert not hosts(tmp_path).exists()
    hosts(tmp_path).parent.mkdir()
    hosts(tmp_path).write_text(OPERATORS)
    assert not release(plan(tmp_path), REGISTRY)  # the operator's own file
    assert hosts(tmp_path).read_text() == OPERATORS
