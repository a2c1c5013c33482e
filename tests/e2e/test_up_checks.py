"""`shoal up` checks what it can before it says it is up: a busy port, an unreachable registry or
a refused seeder login is one line naming the flag to change, and no banner. Ctrl-C says that it
stopped the three components, without a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import USERS
from tests.support.procs import ROOT, free_port
from tests.support.registry import Registry
from tests.support.tokenworld import USERS as TOKEN_USERS
from tests.support.tokenworld import TokenWorld

BANNER = "shoal is up for"


def up_command(tmp_path: Path, upstream: str, *extra: str) -> list[str]:
    """`shoal up` on free ports (unless `extra` names others: argparse takes the last)."""
    return [sys.executable, "-m", "shoal.cli", "up", "--upstream", upstream, "--data-dir", str(tmp_path / "data"),
            "--listen", f"127.0.0.1:{free_port()}", "--tracker-listen", f"127.0.0.1:{free_port()}",
            "--origin-listen", f"127.0.0.1:{free_port()}", "--agent-torrent-port", str(free_port()),
            "--origin-torrent-port", str(free_port()), *extra]


def run_up(tmp_path: Path, upstream: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(up_command(tmp_path, upstream, *extra), capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def password_file(tmp_path: Path, password: str) -> str:
    path = tmp_path / "seeder.password"
    path.write_text(password + "\n")
    return str(path)


@pytest.mark.parametrize("flag", ["--listen", "--tracker-listen", "--origin-listen", "--agent-torrent-port",
                                  "--origin-torrent-port"])
def test_a_busy_port_is_one_line_naming_its_flag(flag: str, registry: Registry, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        value = str(port) if flag.endswith("-port") else f"127.0.0.1:{port}"
        result = run_up(tmp_path, registry.url, flag, value)
    assert result.returncode != 0
    assert BANNER not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"shoal up: {flag}: cannot listen on 127.0.0.1:{port}: the port is in use")
    assert f"change {flag}" in lines[0]
    assert not (tmp_path / "data" / "agent.yaml").exists()  # nothing was started


def test_one_port_for_two_listeners_is_refused(registry: Registry, tmp_path: Path) -> None:
    port = free_port()
    result = run_up(tmp_path, registry.url, "--listen", f"127.0.0.1:{port}", "--origin-listen", f"127.0.0.1:{port}")
    assert result.returncode != 0 and BANNER not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"shoal up: --origin-listen and --listen both name port {port}: change one of them"]


def test_a_wrong_seeder_password_names_user_and_realm(registry: Registry, tmp_path: Path) -> None:
    result = run_up(tmp_path, registry.url, "--username", "seeder", "--password-file",
                    password_file(tmp_path, "not-" + USERS["seeder"]))
    assert result.returncode != 0 and BANNER not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the registry refused the login of user 'seeder' at realm 'basic-realm' (HTTP 401)" in lines[0]
    assert "--username" in lines[0] and "--password-file" in lines[0]
    assert "not-" + USERS["seeder"] not in result.stderr


def test_no_login_for_a_registry_that_wants_one_names_the_flags(registry: Registry, tmp_path: Path) -> None:
    """htpasswd refuses anonymous pulls: without --username the origin could fetch nothing, and the
    first `shoal seed` would fail with a bare 401. `--username -` (a registry without logins) is
    taken at its word."""
    result = run_up(tmp_path, registry.url)
    assert result.returncode == 1 and BANNER not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the registry asks for a login (realm 'basic-realm')" in lines[0]
    assert "--username" in lines[0] and "--password-file" in lines[0] and registry.url in lines[0]


def test_a_wrong_password_at_a_token_server_names_user_and_realm(world: TokenWorld, tmp_path: Path) -> None:
    result = run_up(tmp_path, world.registry.url, "--username", "seeder", "--password-file",
                    password_file(tmp_path, "not-" + TOKEN_USERS["seeder"]))
    assert result.returncode != 0 and BANNER not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the registry refused the login of user 'seeder' at realm 'http://" in lines[0]
    assert "--username" in lines[0] and "--password-file" in lines[0]


def test_an_unreachable_registry_is_plain_words(tmp_path: Path) -> None:
    port = free_port()
    result = run_up(tmp_path, f"http://127.0.0.1:{port}")
    assert result.returncode != 0 and BANNER not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"shoal up: connection refused at 127.0.0.1:{port}: is the registry running there, on that port? "
        f"(--upstream http://127.0.0.1:{port})"]


@pytest.mark.parametrize(("given", "missing"), [("--username", "--password-file"),
                                                ("--password-file", "--username")])
def test_a_login_needs_both_flags(given: str, missing: str, registry: Registry, tmp_path: Path) -> None:
    value = "seeder" if given == "--username" else password_file(tmp_path, USERS["seeder"])
    result = run_up(tmp_path, registry.url, given, value)
    assert result.returncode != 0 and BANNER not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shoal up: {given} needs {missing}"), result.stderr
    assert "--username" in lines[0] and "--password-file" in lines[0]


def test_up_then_ctrl_c_stops_the_three(registry: Registry, tmp_path: Path) -> None:
    proc = subprocess.Popen(up_command(tmp_path, registry.url, "--username", "seeder", "--password-file",
                                       password_file(tmp_path, USERS["seeder"])),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while BANNER not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert BANNER in out, out
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job
        rest, _ = proc.communicate(timeout=60)
    out += rest
    assert proc.returncode == 0, out
    assert "shoal up: stopped tracker, origin and agent (their data stays in " in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and " ERROR " not in out, out[-3000:]
