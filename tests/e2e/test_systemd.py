"""systemd/: scripts/install-systemd into a temporary root, the units checked by systemd's own
`systemd-analyze verify` and `security`, the example configurations loaded by the components'
loaders, sd_notify from a real component process (READY=1, WATCHDOG=1, STOPPING=1), and a whole
cluster pulling through the swarm under the units' seccomp/MDWE restrictions
(tests/support/sandbox.py). PID 1 here is not systemd: no unit is started by systemd itself."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import cluster, protocol
from shoal.cluster import make_keys
from shoal_agent import config as agent_config
from shoal_origin import config as origin_config
from shoal_tracker import config as tracker_config
from tests.e2e.conftest import Images
from tests.support.clients import skopeo_copy, verify_dir
from tests.support.procs import ROOT, free_port, http_get, wait_for
from tests.support.stack import Stack

SYSTEMD = ROOT / "systemd"
COMPONENTS = ("agent", "tracker", "origin")
UNITS = [f"shoal-{c}.service" for c in COMPONENTS]
LOADERS = {"agent": agent_config.load, "tracker": tracker_config.load, "origin": origin_config.load}
# `systemd-analyze security --offline=true` (systemd 252), measured: 1.1 "OK" for each of the
# three (what is left: network access, the host's root, the clock read). A unit that loses a
# hardening setting goes above.
EXPOSURE_MAX = {"shoal-agent.service": 1.1, "shoal-tracker.service": 1.1, "shoal-origin.service": 1.1}
ACL_GROUP, ACL_RWX = 0x08, 7


def unit_settings(name: str) -> dict[str, list[str]]:
    """key -> values of systemd/<name> (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def sysroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root the install script installed into (about 15 s: a virtualenv with shoal)."""
    if os.geteuid() != 0:
        pytest.skip("scripts/install-systemd runs as root (it adds users to the root's /etc/passwd)")
    root = tmp_path_factory.mktemp("sysroot")
    done = subprocess.run([str(ROOT / "scripts" / "install-systemd"), "--root", str(root)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "systemctl enable --now shoal-tracker.service shoal-origin.service" in done.stdout
    # systemd-analyze --root needs systemd's own units there too (sysinit.target, ...)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return root


def strings(value: Any) -> Iterator[str]:
    """Every string in a YAML document."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def owner(root: Path, user: str) -> int:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise AssertionError(f"no user {user} in {root}/etc/passwd")


def acl_groups(path: Path, attr: str) -> dict[int, int]:
    """gid -> permission bits of the named-group entries of a POSIX ACL xattr."""
    raw = os.getxattr(path, attr)
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    return {gid: perm for tag, perm, gid in entries if tag == ACL_GROUP}


def test_install_lays_out_files_with_their_modes(sysroot: Path) -> None:
    def mode(p: str) -> int:
        return (sysroot / p).stat().st_mode & 0o7777

    for unit in UNITS:
        assert (sysroot / "etc/systemd/system" / unit).read_bytes() == (SYSTEMD / unit).read_bytes()
        assert mode(f"etc/systemd/system/{unit}") == 0o644
    for c in COMPONENTS:
        assert (sysroot / f"etc/shoal/{c}.yaml").read_bytes() == (SYSTEMD / f"{c}.yaml").read_bytes()
        assert mode(f"etc/shoal/{c}.yaml") == 0o644
        state = sysroot / f"var/lib/shoal-{c}"
        assert mode(f"var/lib/shoal-{c}") == 0o700
        assert state.stat().st_uid == owner(sysroot, f"shoal-{c}") != 0
    assert mode("etc/shoal") == 0o755
    assert mode("etc/shoal/secrets") == 0o700 and (sysroot / "etc/shoal/secrets").stat().st_uid == 0
    # the venv's scripts run as /opt/shoal/... once the temporary root is the root
    assert (sysroot / "opt/shoal/bin/shoal-agent").read_text().splitlines()[0] == "#!/opt/shoal/bin/python"
    # containerd's hosts directory: group shoal-agent may write it, and directories made in it later
    certs = sysroot / "etc/containerd/certs.d"
    gid = owner(sysroot, "shoal-agent")  # sysusers gives the group the user's number
    assert acl_groups(certs, "system.posix_acl_access").get(gid) == ACL_RWX
    assert acl_groups(certs, "system.posix_acl_default").get(gid) == ACL_RWX
    assert certs.stat().st_uid == 0


def test_install_again_keeps_the_operators_files_and_touches_no_service(sysroot: Path) -> None:
    edited = sysroot / "etc/shoal/agent.yaml"
    edited.write_text(edited.read_text().replace("50GiB", "70GiB"))
    done = subprocess.run([str(ROOT / "scripts" / "install-systemd"), "--root", str(sysroot)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "70GiB" in edited.read_text()
    assert "kept /etc/shoal/agent.yaml" in done.stdout
    # no systemctl call starts, stops or restarts anything (containerd least of all)
    script = (ROOT / "scripts" / "install-systemd").read_text().split("cat <<EOF")[0]  # not what it prints
    calls = [line.strip() for line in script.splitlines()
             if re.match(r"\s*(?:\S+\s+)?systemctl\b", line) and not line.lstrip().startswith("#")]
    assert calls == ["systemctl daemon-reload"], calls


def test_units_pass_systemd_analyze_verify(sysroot: Path) -> None:
    done = subprocess.run(["systemd-analyze", "verify", f"--root={sysroot}",
                           *[f"/etc/systemd/system/{u}" for u in UNITS]], capture_output=True, text=True)
    # an unknown or misspelt setting is only a warning: the output must be empty too
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_a_unit_whose_command_is_missing_fails_verify(sysroot: Path) -> None:
    """verify really looks into the root (the check above could not fail otherwise)."""
    script = sysroot / "opt/shoal/bin/shoal-tracker"
    script.rename(script.with_suffix(".away"))
    try:
        done = subprocess.run(["systemd-analyze", "verify", f"--root={sysroot}",
                               "/etc/systemd/system/shoal-tracker.service"], capture_output=True, text=True)
    finally:
        script.with_suffix(".away").rename(script)
    assert done.returncode != 0 and "shoal-tracker is not executable" in done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(sysroot: Path, unit: str) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={sysroot}", "--no-pager",
                           f"/etc/systemd/system/{unit}"], capture_output=True, text=True)
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+) (\w+)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr
    print(f"{unit}: exposure {found[1]} {found[2]}")
    assert float(found[1]) <= EXPOSURE_MAX[unit] and found[2] == "OK"


@pytest.mark.parametrize("component", COMPONENTS)
def test_example_config_loads_and_names_what_the_unit_provides(sysroot: Path, component: str) -> None:
    doc = yaml.safe_load((SYSTEMD / f"{component}.yaml").read_text())
    LOADERS[component](doc)  # raises ConfigError on an unknown key or a wrong type
    unit = f"shoal-{component}.service"
    settings = unit_settings(unit)
    # the data directory is the unit's StateDirectory=
    assert doc["data_dir"] == f"/var/lib/{settings['StateDirectory'][0]}"
    # every credential path in the configuration is one the unit loads, and the other way round
    prefix = f"/run/credentials/{unit}/"
    wanted = {s.removeprefix(prefix) for s in strings(doc) if s.startswith("/run/credentials/")}
    assert all("/" not in name for name in wanted), wanted  # this unit's own, not another's
    loaded = {v.split(":", 1)[0] for v in settings["LoadCredential"]}
    assert wanted == loaded, (wanted, loaded)
    assert all(":/etc/shoal/secrets/" in v for v in settings["LoadCredential"])
    assert settings["ExecStart"] == [f"/opt/shoal/bin/shoal-{component} --config /etc/shoal/{component}.yaml"]
    # and the installed program agrees
    done = subprocess.run([str(sysroot / "opt/shoal/bin/python"), "-m", f"shoal_{component}", "--check-config",
                           "--config", str(sysroot / f"etc/shoal/{component}.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "configuration is valid" in done.stdout, done.stderr


# sd_notify from a real component process

class NotifySocket:
    """systemd's side of $NOTIFY_SOCKET: a unix datagram socket, a path or an abstract name."""

    def __init__(self, tmp: Path, *, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"shoal-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.sock.bind(str(tmp / "notify.sock"))
            self.env = str(tmp / "notify.sock")

    def next(self, timeout: float) -> str | None:
        """The next message, or None if none came within `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def until(self, message: str, timeout: float) -> list[str]:
        """Messages up to and including `message`, which must come within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(left)
            if got is None:
                break
            seen.append(got)
            if got == message:
                return seen
        raise AssertionError(f"no {message} within {timeout}s (got {seen})")

    def close(self) -> None:
        self.sock.close()


def example_tracker(tmp: Path) -> dict[str, Any]:
    """systemd/tracker.yaml as the unit would run it, on loopback, its credentials from `tmp`."""
    keys = make_keys(tmp / "keys")
    text = (SYSTEMD / "tracker.yaml").read_text()
    for name, key in (("registration.token", "registration_token"), ("node.token", "node_token"),
                      ("origin-public.pem", "origin_public_key")):
        text = text.replace(f"/run/credentials/shoal-tracker.service/{name}", str(keys[key]))
    doc: dict[str, Any] = yaml.safe_load(text)
    doc.update(listen=f"127.0.0.1:{free_port()}", data_dir=str(tmp / "state"))
    return doc


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path, abstract=request.param == "abstract")
    yield s
    s.close()


def test_tracker_notifies_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    doc = example_tracker(tmp_path)
    (tmp_path / "tracker.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": cluster.source_path(ROOT), "NOTIFY_SOCKET": notify_socket.env,
           "WATCHDOG_USEC": "400000"}  # WatchdogSec=0.4s: a ping every 0.2 s
    proc = subprocess.Popen(cluster.command("tracker", tmp_path / "tracker.yaml"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    readyz = protocol.READYZ.url(f"http://{doc['listen']}")
    try:
        first = notify_socket.until("READY=1", timeout=30)
        # READY=1 means serving and ready: /readyz answers 200 at once (no retry)
        assert http_get(readyz, timeout=2)[0] == 200
        assert all(m == "WATCHDOG=1" for m in first[:-1]), first
        pings = [notify_socket.until("WATCHDOG=1", timeout=2) for _ in range(5)]
        assert all(p == ["WATCHDOG=1"] for p in pings), pings

        # a stopped (hung) process sends nothing: systemd's watchdog would fire
        proc.send_signal(signal.SIGSTOP)
        while notify_socket.next(0.05) is not None:  # what was sent before the stop took effect
            pass
        assert notify_socket.next(1.2) is None  # three ping intervals
        proc.send_signal(signal.SIGCONT)
        notify_socket.until("WATCHDOG=1", timeout=2)

        proc.send_signal(signal.SIGTERM)
        notify_socket.until("STOPPING=1", timeout=10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode(errors="replace")
    assert "Traceback" not in stderr and "cannot notify" not in stderr, stderr


def test_watchdog_for_another_process_is_not_pinged(tmp_path: Path, notify_socket: NotifySocket) -> None:
    """$WATCHDOG_PID names the process systemd watches: a child that inherited the variables
    (the agent's configurator is one) must not ping for it."""
    doc = example_tracker(tmp_path)
    (tmp_path / "tracker.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": cluster.source_path(ROOT), "NOTIFY_SOCKET": notify_socket.env,
           "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    proc = subprocess.Popen(cluster.command("tracker", tmp_path / "tracker.yaml"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert notify_socket.until("READY=1", timeout=30) == ["READY=1"]
        assert notify_socket.next(0.6) is None  # six would-be ping intervals
    finally:
        proc.terminate()
        proc.wait(30)


# The whole cluster under the units' kernel restrictions

COMMAND = cluster.command  # the plain one (the test below wraps it)


def sandboxed(component: str, config: Path) -> list[str]:
    families = "AF_INET,AF_INET6,AF_UNIX" + (",AF_NETLINK" if component != "tracker" else "")
    settings = unit_settings(f"shoal-{component}.service")
    # the restrictions this emulates are the unit's
    assert settings["RestrictAddressFamilies"] == [families.replace(",", " ")]
    assert settings["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert settings["MemoryDenyWriteExecute"] == ["yes"] and settings["NoNewPrivileges"] == ["yes"]
    return ["/usr/bin/python3", str(ROOT / "tests/support/sandbox.py"), "--families", families, "--",
            *COMMAND(component, config)]


def test_cluster_pulls_through_the_swarm_under_the_units_restrictions(
        monkeypatch: pytest.MonkeyPatch, stack: Stack, images: Images, workdir: Path) -> None:
    if subprocess.run(["/usr/bin/python3", "-c", "import seccomp"], capture_output=True).returncode != 0:
        raise RuntimeError("python3-seccomp is not installed: run scripts/install-debian-packages")
    monkeypatch.setattr(cluster, "command", sandboxed)
    image = images.app()
    stack.start(agents=2)
    for c in stack.components:  # really sandboxed: seccomp mode 2 (filter)
        assert c.proc is not None
        assert "Seccomp:\t2" in Path(f"/proc/{c.proc.pid}/status").read_text()
    first, second = stack.agents
    skopeo_copy(f"{first.config['listen']}/private/app:v1", workdir / "a")
    verify_dir(workdir / "a", image)
    skopeo_copy(f"{second.config['listen']}/private/app:v1", workdir / "b")
    verify_dir(workdir / "b", image)
    # libtorrent (sockets, threads, netlink, mmap'd storage) moved the big layers between peers
    wait_for(lambda: second.metric("shoal_agent_downloads_total", source="peers", result="ok") >= 1,
             timeout=10, what="a download from peers")
    for c in stack.components:
        assert "Operation not permitted" not in c.log(), c.name
