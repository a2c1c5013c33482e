"""`shoal --help` and every subcommand's: each option says what it does and shows its default;
`--version` on `shoal` and on each component prints the installed version."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from shoal import cluster
from shoal.cli import parser
from tests.support.procs import ROOT


def subcommands() -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_every_option_has_help_and_shows_its_default() -> None:
    commands = subcommands()
    assert set(commands) == {"up", "seed", "audit", "keygen", "status"}
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"shoal {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help) > 5, f"{where} has no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {default})" in " ".join(text.split()), f"{where}: default {default!r} not shown"


def test_defaults_are_shown_for_up() -> None:
    text = " ".join(subcommands()["up"].format_help().split())
    for shown in ("--listen LISTEN mirror address for containerd/podman (default: 127.0.0.1:5050)",
                  "(default: 6881)", "(default: 6882)", "(default: challenge)", "(default: 20GiB)"):
        assert shown in text
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: False)" not in text


def test_shoal_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"shoal {importlib.metadata.version('shoal')}")
    # from a checkout: which commit ran
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert f"(commit {head}" in out


@pytest.mark.parametrize("component", ["agent", "origin", "tracker"])
def test_component_version(component: str) -> None:
    command = [sys.executable, "-m", cluster.MODULES[component], "--version"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"shoal-{component} {importlib.metadata.version('shoal')}")


@pytest.mark.parametrize(("argv", "hint"), [
    ([], "data_dir: required key is missing (give --config FILE or --data-dir)"),
    (["--config", "{config}"], "data_dir: required key is missing (set it in {config} or give --data-dir)"),
])
def test_a_component_missing_a_required_key_says_how_to_give_it(
        argv: list[str], hint: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The bare `shoal-agent` told a newcomer only `data_dir: required key is missing`."""
    from shoal_agent.__main__ import main as agent_main

    config = tmp_path / "agent.yaml"
    config.write_text("log:\n  level: info\n")
    assert agent_main([a.format(config=config) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"shoal-agent: config error: {hint.format(config=config)}"]
