"""systemd/: scripts/install-systemd into a temporary root, the units checked by systemd's own
`systemd-analyze verify` and `security`, the example configurations loaded by the components'
loaders, sd_notify from a real component process (READY=1, WATCHDOG=1, STOPPING=1), and a whole
cluster pulling through the swarm under the units' seccomp/MDWE restrictions
(tests/support/sandbox.py). PID 1 here is not systemd: no unit is started by systemd itself."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
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
    # the venv's scripts run as /opt/shoal/... once the temporary root is the root, with the
    # system's Python (not one under /root or /home, which ProtectHome=yes hides)
    assert (sysroot / "opt/shoal/bin/shoal-agent").read_text().splitlines()[0] == "#!/opt/shoal/bin/python"
    assert os.path.realpath(sysroot / "opt/shoal/bin/python").startswith("/usr/")
    # containerd's hosts directory stays root's, with no ACL (attack14 F2): the agent gets its
    # upstreams' directories from ExecStartPre= only
    certs = sysroot / "etc/containerd/certs.d"
    assert certs.stat().st_uid == 0
    assert certs.stat().st_mode & 0o022 == 0
    for attr in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError, match="No data available"):
            os.getxattr(certs, attr)


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


def notified_agent(tmp_path: Path, notify_socket: NotifySocket, certs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An agent keeping containerd's files under `certs`, telling `notify_socket` its state; its
    log in tmp_path/agent.log. Returns the process and its mirror URL."""
    listen = f"127.0.0.1:{free_port()}"
    doc = {"listen": listen, "data_dir": str(tmp_path / "state"),
           "upstreams": [{"name": "registry.test:5000", "url": "http://127.0.0.1:9"}],
           "containerd": {"config_path": str(certs)}}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": cluster.source_path(ROOT), "NOTIFY_SOCKET": notify_socket.env}
    with open(tmp_path / "agent.log", "wb") as out:
        proc = subprocess.Popen(cluster.command("agent", tmp_path / "agent.yaml"), env=env, stdout=out, stderr=out)
    return proc, f"http://{listen}"


def test_agent_tells_systemd_it_is_ready_only_with_containerds_files(tmp_path: Path,
                                                                    notify_socket: NotifySocket) -> None:
    """With containerd.config_path, READY=1 (so kubelet's start, ordered after the agent) waits
    until the agent's watchdog process has pointed containerd at the agent."""
    certs = tmp_path / "certs.d"
    certs.mkdir()
    proc, mirror = notified_agent(tmp_path, notify_socket, certs)
    hosts = certs / "registry.test:5000" / "hosts.toml"
    try:
        notify_socket.until("READY=1", timeout=30)
        assert hosts.exists() and mirror in hosts.read_text()  # at once, no wait
        proc.send_signal(signal.SIGTERM)
        notify_socket.until("STOPPING=1", timeout=10)
        assert proc.wait(30) == 0
        assert not hosts.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_agent_that_cannot_write_containerds_files_still_starts(tmp_path: Path,
                                                                   notify_socket: NotifySocket) -> None:
    """READY=1 waits for containerd's files only until the watchdog has tried: a config_path the
    agent cannot write (here a file, not a directory) is logged, and the node is not held up."""
    certs = tmp_path / "certs.d"
    certs.write_text("not a directory")
    proc, _mirror = notified_agent(tmp_path, notify_socket, certs)
    try:
        notify_socket.until("READY=1", timeout=30)
        assert "cannot write containerd's hosts.toml" in (tmp_path / "agent.log").read_text()
        assert certs.read_text() == "not a directory"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


# The units under a real systemd: a Debian 12 root booted by systemd in a podman container

class Booted:
    """systemd as PID 1 of a privileged podman container whose root is `rootfs`, with no network
    but loopback."""

    def __init__(self, rootfs: Path) -> None:
        self.name = f"shoal-systemd-test-{os.getpid()}"
        self.rootfs = rootfs

    def start(self) -> None:
        # podman (as root) raises the container's limits to the kernel's maximum, which a host
        # without CAP_SYS_RESOURCE refuses: ask for what this process has (as tests/e2e/test_image.py)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], int(Path("/proc/sys/kernel/pid_max").read_text()))
        subprocess.run(["podman", "run", "-d", "--name", self.name, "--privileged", "--network", "none",
                        "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}",
                        "--systemd=always", "--rootfs", str(self.rootfs), "/sbin/init"],
                       check=True, capture_output=True, timeout=120)

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", "exec", self.name, "bash", "-c", script], capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert done.returncode == 0, (script, done.stdout[-2000:], done.stderr[-2000:])
        return done

    def value(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}").stdout.strip()

    def close(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "0", self.name], capture_output=True, timeout=120)


# test only: what the agent's user may touch under the unit's sandbox (a new registry directory
# in containerd's hosts directory, nothing of /etc/shoal or /opt/shoal)
PROBE = """[Service]
ExecStartPost=/bin/sh -c 'if mkdir /etc/containerd/certs.d/new.example 2>/dev/null; then echo made; \\
  else echo refused; fi > /var/lib/shoal-agent/probe-new && id -un > /var/lib/shoal-agent/probe-user && \\
  if touch /etc/shoal/x 2>/dev/null || touch /opt/shoal/x 2>/dev/null || ls /etc/shoal/secrets >/dev/null 2>&1; \\
  then echo escaped; else echo confined; fi > /var/lib/shoal-agent/probe-sandbox'
"""
OPERATORS_HOSTS = 'server = "http://127.0.0.1:5000"\n'  # the operator's own hosts.toml for the upstream
HOSTS = "/etc/containerd/certs.d/127.0.0.1:5000"  # made by the operator (root's); ExecStartPre= gives it the agent


def prepare_root(rootfs: Path) -> None:
    """A cluster's host as README's "Deploying with systemd" makes it: installed, keys, configs."""
    done = subprocess.run([str(ROOT / "scripts" / "install-systemd"), "--root", str(rootfs)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run(["chroot", str(rootfs), "/opt/shoal/bin/shoal", "keygen", "/etc/shoal/secrets"], check=True,
                   capture_output=True, timeout=60)
    secrets = rootfs / "etc/shoal/secrets"
    (secrets / "registry.password").write_text("seederpw")
    (secrets / "registry.password").chmod(0o600)
    origin_state = rootfs / "var/lib/shoal-origin"
    shutil.copy(secrets / "operators.json", origin_state / "operators.json")
    uid = owner(rootfs, "shoal-origin")
    os.chown(origin_state / "operators.json", uid, uid)
    # the example configurations, on loopback
    edits = {"10.0.0.5:6969": "127.0.0.1:6969", "10.0.0.5:6970": "127.0.0.1:6970", "10.0.0.5:6881": "127.0.0.1:6882",
             "10.0.1.17:6881": "127.0.0.1:6881", "https://registry.example.com": "http://127.0.0.1:5000",
             "registry.example.com": "127.0.0.1:5000"}
    for c in COMPONENTS:
        path = rootfs / f"etc/shoal/{c}.yaml"
        text = path.read_text()
        for old, new in edits.items():
            text = text.replace(old, new)
        path.write_text(text)
    (rootfs / HOSTS[1:]).mkdir()
    (rootfs / HOSTS[1:] / "hosts.toml").write_text(OPERATORS_HOSTS)
    (rootfs / "etc/systemd/system/shoal-agent.service.d").mkdir()
    (rootfs / "etc/systemd/system/shoal-agent.service.d/probe.conf").write_text(PROBE)


@pytest.mark.slow
def test_units_run_under_systemd(tmp_path: Path) -> None:
    """Started in order, each is active only once ready; the agent writes containerd's directory
    and nothing else; a SIGSTOPped agent is killed by the watchdog and restarted; the
    exposure systemd reports is the offline one. About 90 s (a Debian root from mmdebstrap)."""
    for tool in ("mmdebstrap", "podman", "chroot"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run scripts/install-debian-packages")
    if os.geteuid() != 0:
        pytest.skip("booting systemd in a container needs root")
    rootfs = tmp_path / "rootfs"
    subprocess.run(["mmdebstrap", "--variant=minbase", "--include=systemd,systemd-sysv,python3,python3-venv,dbus",
                    "bookworm", str(rootfs)], check=True, capture_output=True, timeout=900)
    prepare_root(rootfs)
    box = Booted(rootfs)
    try:
        box.start()
        box.sh("for i in $(seq 600); do s=$(systemctl is-system-running); "
               "[ \"$s\" = running ] || [ \"$s\" = degraded ] && exit 0; sleep 0.1; done; exit 1")
        # Inside a container systemd leaves / private; on a host it makes it shared at boot, which
        # LoadCredential= needs (the credentials are mounted from a child namespace).
        box.sh("mount --make-rshared /")

        box.sh("systemctl start shoal-tracker.service shoal-origin.service")
        box.sh("systemctl start shoal-agent.service")
        # Type=notify: "started" means ready, so /readyz answers 200 at once
        for port in (6969, 6970, 5050):
            url = protocol.READYZ.url(f"http://127.0.0.1:{port}")
            got = box.sh(f"python3 -c 'import urllib.request as u; print(u.urlopen(\"{url}\", timeout=5).status)'")
            assert got.stdout.strip() == "200", port
        assert box.sh("cat /var/lib/shoal-agent/probe-user").stdout.strip() == "shoal-agent"
        assert box.sh("cat /var/lib/shoal-agent/probe-sandbox").stdout.strip() == "confined"
        # no directory of its own making in containerd's (only its upstreams', from ExecStartPre=)
        assert box.sh("cat /var/lib/shoal-agent/probe-new").stdout.strip() == "refused"
        # the agent's watchdog process keeps containerd's file (agent/hostsconf.py) from inside the
        # sandbox, and the agent was "started" only once it was written (no wait here)
        box.sh(f"grep -q 127.0.0.1:5050 {HOSTS}/hosts.toml")
        assert box.sh(f"cat {HOSTS}/hosts.toml.shoal-orig").stdout == OPERATORS_HOSTS
        for unit in UNITS:
            found = re.search(r"Overall exposure level for \S+: ([0-9.]+) OK",
                              box.sh(f"systemd-analyze security --no-pager {unit}").stdout)
            assert found and float(found[1]) <= EXPOSURE_MAX[unit], unit

        # hung: containerd is pointed at the registry within seconds (the agent's watchdog
        # process); systemd's watchdog (10 s) kills the agent and starts it again
        pid = box.value("shoal-agent", "MainPID")
        box.sh(f"kill -STOP {pid}")
        hung = time.monotonic()
        box.sh(f"for i in $(seq 100); do [ \"$(cat {HOSTS}/hosts.toml)\" = '{OPERATORS_HOSTS.strip()}' ] && exit 0; "
               "sleep 0.1; done; exit 1")
        print(f"hosts.toml back to the operator's {time.monotonic() - hung:.1f} s after the hang")
        box.sh("for i in $(seq 300); do [ \"$(systemctl show -p NRestarts --value shoal-agent)\" != 0 ] && "
               "systemctl is-active -q shoal-agent && exit 0; sleep 0.1; done; exit 1", timeout=60)
        assert box.value("shoal-agent", "MainPID") != pid
        print(f"the agent ready again {time.monotonic() - hung:.1f} s after the hang")
        assert "Watchdog timeout" in box.sh("journalctl -u shoal-agent --no-pager").stdout
        box.sh(f"for i in $(seq 100); do grep -q 127.0.0.1:5050 {HOSTS}/hosts.toml && exit 0; sleep 0.1; done; "
               "exit 1")

        for unit in ("shoal-agent", "shoal-origin", "shoal-tracker"):
            box.sh(f"systemctl stop {unit}")
            assert box.value(unit, "Result") == "success" and box.value(unit, "ExecMainStatus") == "0", unit
        # stopped: the operator's file is back, byte for byte, and no backup is left
        assert box.sh(f"cat {HOSTS}/hosts.toml").stdout == OPERATORS_HOSTS
        assert box.sh(f"ls {HOSTS}").stdout.split() == ["hosts.toml"]
        logs = box.sh("journalctl -u shoal-agent -u shoal-origin -u shoal-tracker --no-pager").stdout
        assert "Traceback" not in logs and "not permitted" not in logs

        # a configuration error (exit status 2) is reported, not restarted in a loop
        box.sh("sed -i 's/^cache:/kache:/' /etc/shoal/agent.yaml")
        assert box.sh("systemctl start shoal-agent", check=False).returncode != 0
        assert box.value("shoal-agent", "ActiveState") == "failed"  # not "activating" (auto-restart)
        assert "config error: kache" in box.sh("journalctl -u shoal-agent --no-pager").stdout
    finally:
        box.close()
        subprocess.run(["rm", "-rf", "--one-file-system", str(rootfs)], check=False, timeout=300)
