"""`shoal up`'s configurations: what each component gets from its flags, and what it does not."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from shoal.cli import parser, up
from shoal_agent import config as agent_config
from shoal_origin import config as origin_config


def args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    password = tmp_path / "pw"
    password.write_text("secret")
    return parser().parse_args(["up", "--upstream", "http://registry.test:5000", "--username", "shoal",
                                      "--password-file", str(password), *extra])


def test_the_agent_holds_the_registry_login_only_when_it_uses_it(tmp_path: Path) -> None:
    challenge = up.up_configs(args(tmp_path), tmp_path / "d")
    assert challenge["agent"]["upstreams"] == [{"name": "registry.test:5000", "url": "http://registry.test:5000"}]
    assert challenge["origin"]["upstreams"][0]["username"] == "shoal"  # the seeder's
    node = up.up_configs(args(tmp_path, "--unauthenticated", "node"), tmp_path / "d")
    assert node["agent"]["upstreams"][0]["username"] == "shoal"
    for configs in (challenge, node):  # and both load as their components read them
        agent_config.load(configs["agent"])
        origin_config.load(configs["origin"])


def test_registry_users_become_operators_with_their_roles(tmp_path: Path) -> None:
    configs = up.up_configs(args(tmp_path, "--operator", "alice=seed,audit", "--operator", "carol=admin"),
                            tmp_path / "d")
    operators = origin_config.load(configs["origin"]).operators
    assert operators.registry is not None and operators.registry.upstream == "registry.test:5000"
    assert {u: list(r) for u, r in operators.registry.roles.items()} == {"alice": ["seed", "audit"], "carol": ["admin"]}
    assert operators.tokens.file  # the local admin token works as well
    for bad in ("alice", "alice=", "=seed", "alice=root"):
        with pytest.raises(SystemExit, match="--operator must be USER=ROLES"):
            up.up_configs(args(tmp_path, "--operator", bad), tmp_path / "d")


def test_the_agent_keeps_containerds_hosts_directory_only_when_asked(tmp_path: Path) -> None:
    assert "containerd" not in up.up_configs(args(tmp_path), tmp_path / "d")["agent"]
    configs = up.up_configs(args(tmp_path, "--containerd-hosts-dir", "certs.d"), tmp_path / "d")
    loaded = agent_config.load(configs["agent"])
    assert loaded.containerd.config_path == str((Path.cwd() / "certs.d").resolve())


def test_several_registries(tmp_path: Path) -> None:
    """--upstream more than once: every registry in every component, each with only its own login."""
    pw_a, pw_b = tmp_path / "a", tmp_path / "b"
    pw_a.write_text("a")
    pw_b.write_text("b")
    two = ["up", "--upstream", "http://one.test:5000", "--upstream", "mirror=https://two.test"]
    own = up.up_configs(parser().parse_args([*two, "--username", "u", "--password-file", str(pw_a),
                                             "--username", "v", "--password-file", str(pw_b),
                                             "--unauthenticated", "node"]), tmp_path / "d")
    for component in ("agent", "origin"):
        got = [(u["name"], u["url"], u["username"], u["password"]["file"]) for u in own[component]["upstreams"]]
        assert got == [("one.test:5000", "http://one.test:5000", "u", str(pw_a)),
                       ("mirror", "https://two.test", "v", str(pw_b))]
    assert [u.name for u in agent_config.load(own["agent"]).upstreams] == ["one.test:5000", "mirror"]
    assert origin_config.load(own["origin"]).upstreams[1].username == "v"
    anonymous = up.up_configs(parser().parse_args(two), tmp_path / "d")
    assert all("username" not in u for u in anonymous["origin"]["upstreams"])
    # a private registry beside one that needs no login ("-")
    mixed = up.up_configs(parser().parse_args([*two, "--username", "u", "--password-file", str(pw_a),
                                               "--username", "-", "--password-file", "-"]), tmp_path / "d")
    assert [u.get("username") for u in mixed["origin"]["upstreams"]] == ["u", None]
    assert "password" not in mixed["origin"]["upstreams"][1]
    for extra, message in (
            # one login for two registries would send one's password to the other (attack15)
            (["--username", "u", "--password-file", str(pw_a)], "--username: give it once per --upstream"),
            (["--username", "u", "--username", "v", "--password-file", str(pw_a)],
             "--password-file: give it once per --upstream"),
            (["--name", "x"], "--name names one registry"),
            (["--upstream", "http://one.test:5000"], "named alike"),
            (["--upstream", "ftp://x"], "must be an http"),
            (["--upstream", "http://user:secret@three.test"], "no login in the URL"),
            (["--upstream", "http://[::1"], "must be an http"),
            (["--username", "", "--password-file", str(pw_a), "--username", "v", "--password-file", str(pw_b)],
             "--username: empty")):
        with pytest.raises(SystemExit, match=message):
            up.up_configs(parser().parse_args([*two, *extra]), tmp_path / "d")


def test_a_bad_upstream_with_a_login_in_it_is_not_echoed(tmp_path: Path) -> None:
    bad = parser().parse_args(["up", "--upstream", "ftp://shoal:s3cret-pw@registry.test", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        up.up_configs(bad, tmp_path / "d")
    assert "--upstream must be an http(s) URL" in str(exc.value)
    assert "s3cret-pw" not in str(exc.value)


# A password holding "/", "?" or "#" ends urlsplit's authority before the "@" (attack17): the URL
# passed the "no login in the URL" check ("https://user:1234/pw@host" is host "user", port 1234)
# and went on with the password in it, or (a port that is not a number) ended in a traceback.
@pytest.mark.parametrize("url", ["https://shoal:1234/s3cret-pw@registry.test", "https://shoal:x/s3cret-pw@registry.test",
                                 "https://shoal:x#s3cret-pw@registry.test:5000"])
def test_an_upstream_whose_password_holds_a_slash_is_refused_without_echoing_it(url: str, tmp_path: Path) -> None:
    bad = parser().parse_args(["up", "--upstream", url, "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        up.up_configs(bad, tmp_path / "d")
    assert "s3cret-pw" not in str(exc.value)
    assert "--upstream" in str(exc.value)


def test_the_banner_names_commands_a_shell_can_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "my checkout" / ".venv" / "bin"  # a space: the line is pasted into a shell
    venv_bin.mkdir(parents=True)
    for name in ("shoal", "shoal-origin"):
        (venv_bin / name).write_text("#!/bin/sh\n")
        (venv_bin / name).chmod(0o755)
    monkeypatch.setattr("sys.argv", [str(venv_bin / "shoal"), "up"])
    # bin/shoal runs .venv/bin/shoal, which is not on PATH: the banner gives the path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert up.program("shoal") == f"'{venv_bin / 'shoal'}'"
    assert shlex.split(up.program("shoal-origin")) == [str(venv_bin / "shoal-origin")]
    # an activated virtualenv (or a system install) finds its own: the bare name
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert up.program("shoal-origin") == "shoal-origin"
    # run as `python -m shoal.cli`, there is no script to point at
    monkeypatch.setattr("sys.argv", ["/x/shoal/cli/__main__.py", "up"])
    assert up.program("shoal") == "shoal"
