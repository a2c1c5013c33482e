"""The agent keeps containerd's hosts.toml in step with its health (containerd.config_path): a real
containerd 1.6 pulls through the agent while it is ready, and straight from the registry when the
agent is not started, hung (SIGSTOP), killed or stopped, without waiting on it. containerd is never
restarted: it reads the file on every pull."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from shoal import protocol
from shoal.cluster import source_path
from shoal_agent.configurator import Configurator
from shoal_agent.hostsconf import BACKUP, MARKER, Plan, State, apply
from shoal_agent.hostsconf import Registry as Registry_
from shoal_agent.watchdog import Job, healthy
from tests.e2e.conftest import MIB, USERS, Images
from tests.support.clients import Containerd
from tests.support.images import Image
from tests.support.procs import ROOT, Component, free_port, wait_for
from tests.support.registry import Registry, pulls_since
from tests.support.stack import Stack

WAIT = 15.0  # the watchdog checks every 0.2 s here; two failures point containerd away


def small(images: Images, n: int) -> tuple[str, Image]:
    """Image n (its own blobs: containerd shares content between namespaces, so a pull of an
    image it has fetched before would not reach any registry)."""
    return f"private/hosts{n}:v1", images.get(f"private/hosts{n}", layers=[2 * MIB, 100_000], seed=310 + n)


def hosts_file(certs: Path, registry: Registry, name: str | None = None) -> Path:
    return certs / (name or registry.host) / "hosts.toml"


def read(path: Path) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None


def through(agent: Component, certs: Path, registry: Registry, name: str | None = None) -> bool:
    doc = read(hosts_file(certs, registry, name))
    return doc is not None and list(doc.get("host", {}))[:1] == [agent.url]


def registry_alone(certs: Path, registry: Registry) -> bool:
    return read(hosts_file(certs, registry)) == {"server": registry.url}


def managed_agent(stack: Stack, certs: Path, **containerd: Any) -> Component:
    return stack.start_agent(auth={"unauthenticated": "challenge"},
                             containerd={"config_path": str(certs), "check_interval": "200ms", **containerd})


def pull(containerd: Containerd, certs: Path, host: str, images: Images, n: int) -> Image:
    """Pull image n (every blob new to containerd), checked blob by blob."""
    name, image = small(images, n)
    containerd.ctr("images", "pull", "--hosts-dir", str(certs), "--snapshotter", "native",
                   "--user", f"alice:{USERS['alice']}", f"{host}/{name}")
    for digest in [image.digest, *image.blobs]:
        out = subprocess.run(["ctr", "-a", str(containerd.sock), "-n", "shoal", "content", "get", digest],
                             capture_output=True, timeout=60, check=True).stdout
        assert "sha256:" + hashlib.sha256(out).hexdigest() == digest
    return image


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def blobs_from_agent(agent: Component) -> float:
    return agent.metric("shoal_agent_requests_total", kind="blobs", method="GET", status="200")


def test_hosts_toml_follows_the_agent_through_start_hang_kill_and_stop(
        stack: Stack, registry: Registry, images: Images, containerd: Containerd, tmp_path: Path) -> None:
    for n in range(6):
        small(images, n)  # pushed before any pull is counted
    certs = tmp_path / "certs.d"
    certs.mkdir()
    # not started: no file, containerd goes to the registry
    before = registry.settle()
    image = pull(containerd, certs, registry.host, images, 0)
    assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(image.blobs, 1)

    agent = managed_agent(stack, certs)
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml through the agent")
    text = hosts_file(certs, registry).read_text()
    assert text.startswith(MARKER)
    assert tomllib.loads(text)["server"] == registry.url
    image = pull(containerd, certs, registry.host, images, 1)
    assert blobs_from_agent(agent) == len(image.blobs)
    assert agent.metric("shoal_agent_containerd_mirroring") == 1

    # hung: the watchdog points containerd at the registry; the agent never sees the pull
    agent.signal(signal.SIGSTOP)
    wait_for(lambda: registry_alone(certs, registry), timeout=WAIT, what="hosts.toml reduced for a hung agent")
    before = registry.settle()
    image = pull(containerd, certs, registry.host, images, 2)
    assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(image.blobs, 1)
    agent.signal(signal.SIGCONT)
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml back when the agent answers")
    served = blobs_from_agent(agent)
    image = pull(containerd, certs, registry.host, images, 3)
    assert blobs_from_agent(agent) == served + len(image.blobs)

    # killed: the watchdog sees its pipe close and reduces the file at once
    assert agent.proc is not None
    (watchdog,) = subprocess.run(["pgrep", "-P", str(agent.proc.pid)], capture_output=True, text=True).stdout.split()
    agent.proc.kill()
    agent.proc.wait()
    wait_for(lambda: registry_alone(certs, registry), timeout=WAIT, what="hosts.toml reduced for a killed agent")
    pull(containerd, certs, registry.host, images, 4)
    # the watchdog had nobody left to tell, and says nothing about it (no BrokenPipeError)
    wait_for(lambda: gone(int(watchdog)), timeout=WAIT, what="the watchdog gone")
    assert "Traceback" not in agent.log()

    # started again on the same address: through the agent again; a clean stop removes the file
    agent.start()
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml after the restart")
    agent.stop()
    assert not hosts_file(certs, registry).exists()
    assert not hosts_file(certs, registry).parent.exists()
    pull(containerd, certs, registry.host, images, 5)


def test_an_operators_hosts_toml_is_merged_and_restored(
        stack: Stack, registry: Registry, images: Images, containerd: Containerd, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    original = (f"# ours, with a mirror that is down\nserver = \"{registry.url}\"\n\n"
                '[host."http://127.0.0.1:9"]\n  capabilities = ["pull", "resolve"]\n')
    hosts_file(certs, registry).parent.mkdir(parents=True)
    hosts_file(certs, registry).write_text(original)
    agent = managed_agent(stack, certs)
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml through the agent")
    assert (hosts_file(certs, registry).parent / BACKUP).read_text() == original
    doc = read(hosts_file(certs, registry))
    assert doc is not None
    assert list(doc["host"]) == [agent.url, "http://127.0.0.1:9"]
    image = pull(containerd, certs, registry.host, images, 6)
    assert blobs_from_agent(agent) == len(image.blobs)
    agent.stop()
    assert hosts_file(certs, registry).read_text() == original
    assert not (hosts_file(certs, registry).parent / BACKUP).exists()


def test_default_sends_other_registries_on_to_their_own_host(
        stack: Stack, registry: Registry, images: Images, containerd: Containerd, tmp_path: Path) -> None:
    """With default_host, every registry tries the agent first; one it does not serve gets a 404
    from the agent and containerd pulls it from the registry itself."""
    small(images, 7)
    certs = tmp_path / "certs.d"
    agent = managed_agent(stack, certs, default_host=True)
    wait_for(lambda: through(agent, certs, registry, "_default"), timeout=WAIT, what="_default/hosts.toml")
    assert "server" not in (read(hosts_file(certs, registry, "_default")) or {})
    # the same registry under a name the agent does not serve: _default applies
    other = registry.host.replace("127.0.0.1", "localhost")
    before = registry.settle()
    image = pull(containerd, certs, other, images, 7)
    assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(image.blobs, 1)
    assert agent.metric("shoal_agent_requests_total", kind="manifests", status="404") >= 1
    assert blobs_from_agent(agent) == 0
    agent.stop()
    assert not hosts_file(certs, registry, "_default").exists()


# Another process on the mirror's port (any local user, any hostNetwork pod, once the agent does
# not hold it) would get containerd's pulls and, after a 401, the pullers' credentials
# (attack14, F1): containerd's files never name a port the agent does not hold.

def test_a_restarted_agent_takes_the_files_off_a_port_someone_else_holds(
        stack: Stack, registry: Registry, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    agent = managed_agent(stack, certs)
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml through the agent")
    assert agent.proc is not None
    # killed with its watchdog (an OOM kill of the whole cgroup, systemctl kill -s KILL, power loss)
    watchdog = subprocess.run(["pgrep", "-P", str(agent.proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(watchdog) == 1
    os.kill(int(watchdog[0]), signal.SIGKILL)
    agent.proc.kill()
    agent.proc.wait()
    assert through(agent, certs, registry)  # the file still names the port
    host, port = agent.config["listen"].rsplit(":", 1)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen()
        agent.start(wait=False)
        assert agent.proc is not None
        assert agent.proc.wait(60) != 0  # cannot bind
        assert registry_alone(certs, registry)  # but containerd no longer goes to that port


def test_a_clean_stop_takes_the_files_off_the_port_before_letting_it_go(
        stack: Stack, registry: Registry, tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    agent = managed_agent(stack, certs)
    wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml through the agent")
    host, port = agent.config["listen"].rsplit(":", 1)
    agent.signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:  # the first moment another process can hold the port
            try:
                squatter.bind((host, int(port)))
                break
            except OSError:
                assert time.monotonic() < deadline, "the agent never let its port go"
        assert not hosts_file(certs, registry).exists()
    assert agent.proc is not None
    assert agent.proc.wait(30) == 0


async def test_the_watchdog_trusts_only_its_own_agent_and_imports_nothing_from_its_directory(
        tmp_path: Path) -> None:
    """/readyz answered by another process (200, without the proof of the shared secret) is not
    the agent; and the watchdog, started from a directory holding a json.py, does not run it."""
    ip = "127.0.0.90"
    impostor = ThreadingHTTPServer((ip, free_port(ip)), Ready)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    marker = tmp_path / "ran"
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    certs = tmp_path / "certs.d"
    registry = Registry_("registry.example.com", "https://registry.example.com")
    url = f"http://{ip}:{impostor.server_address[1]}"
    job = Job(plan=Plan(str(certs), url, 1.0, (registry,)), health=protocol.READYZ.url(url), interval=0.2,
              failures=2, log_level="info", log_format="text", secret=secrets.token_bytes(32))
    assert not healthy(job.health, 1.0, job.secret)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        configurator = Configurator(job)
        await configurator.start()
    finally:
        os.chdir(cwd)
    try:
        hosts = certs / registry.name / "hosts.toml"
        deadline = time.monotonic() + 30
        while not hosts.exists():  # the watchdog's first step: the registry alone
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        asked = len(IMPOSTOR_ASKED)
        while len(IMPOSTOR_ASKED) < asked + 3:  # three more checks, all answered 200 by the impostor
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert read(hosts) == {"server": registry.server}
        assert not configurator.mirroring.is_set()
    finally:
        await configurator.stop()
        impostor.shutdown()
    assert not marker.exists()


IMPOSTOR_ASKED: list[float] = []


class Ready(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        IMPOSTOR_ASKED.append(time.monotonic())
        body = b'{"status": "ready"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_service_managers_prepare_and_release_the_directories(tmp_path: Path) -> None:
    """systemd's ExecStartPre=+ (`--prepare USER`: each upstream's directory, and only those,
    made and given to USER) and ExecStopPost= (`--release`: files that still name the agent go to
    the registry, after any end)."""
    certs = tmp_path / "certs.d"
    (certs / "b.example").mkdir(parents=True)  # the operator's, root's
    config = tmp_path / "agent.yaml"
    doc: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "listen": "127.0.0.1:5050",
                           "upstreams": [{"name": "a.example", "url": "https://a.example"},
                                         {"name": "b.example", "url": "https://b.example"}],
                           "containerd": {"config_path": str(certs)}}
    config.write_text(yaml.safe_dump(doc))
    command = [sys.executable, "-P", "-m", "shoal_agent.watchdog", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": source_path(ROOT)}
    done = subprocess.run([*command, "--prepare", "nobody"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    nobody = pwd.getpwnam("nobody").pw_uid
    assert sorted(p.name for p in certs.iterdir()) == ["a.example", "b.example"]
    assert all(p.stat().st_uid == nobody for p in certs.iterdir())
    assert certs.stat().st_uid == os.getuid()  # containerd's directory itself keeps its owner

    a, b = Registry_("a.example", "https://a.example"), Registry_("b.example", "https://b.example")
    plan = Plan(str(certs), "http://127.0.0.1:5050", 1.0, (a, b))
    apply(plan, a, State.MIRROR)  # as the agent left it when killed with its watchdog
    done = subprocess.run([*command, "--release"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert read(certs / "a.example" / "hosts.toml") == {"server": "https://a.example"}
    assert not (certs / "b.example" / "hosts.toml").exists()
    # one registry that cannot be released does not keep the others naming the agent
    apply(plan, b, State.MIRROR)
    (certs / "a.example" / "hosts.toml").unlink()
    (certs / "a.example" / "hosts.toml").symlink_to(tmp_path / "elsewhere.toml")
    done = subprocess.run([*command, "--release"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert read(certs / "b.example" / "hosts.toml") == {"server": "https://b.example"}
    (certs / "a.example" / "hosts.toml").unlink()

    (certs / "c.example").symlink_to(tmp_path)
    doc["upstreams"].append({"name": "c.example", "url": "https://c.example"})
    config.write_text(yaml.safe_dump(doc))
    done = subprocess.run([*command, "--prepare", "nobody"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "symbolic link" in done.stderr
    assert tmp_path.stat().st_uid == os.getuid()


async def test_a_stop_right_after_the_watchdog_died_still_takes_the_files_away(tmp_path: Path) -> None:
    """The watchdog killed, and the agent told to stop before it has started another: the agent
    removes the files itself, and starts no new watchdog."""
    certs = tmp_path / "certs.d"
    registry = Registry_("registry.example.com", "https://registry.example.com")
    url = f"http://127.0.0.91:{free_port('127.0.0.91')}"  # nobody answers: the files are reduced
    job = Job(plan=Plan(str(certs), url, 1.0, (registry,)), health=protocol.READYZ.url(url), interval=0.2,
              failures=2, log_level="info", log_format="text", secret=secrets.token_bytes(32))
    configurator = Configurator(job)
    await configurator.start()
    hosts = certs / registry.name / "hosts.toml"
    deadline = time.monotonic() + 30
    while not hosts.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    first = configurator._proc
    assert first is not None
    first.kill()
    await first.wait()
    await asyncio.wait_for(configurator.stop(), 30)
    assert not hosts.exists()
    assert configurator._proc is first  # no watchdog started after the stop


def test_containerd_pulls_through_an_agent_on_ipv6(registry: Registry, images: Images, containerd: Containerd,
                                                    tmp_path: Path) -> None:
    """Issue 15: the agent (and tracker and origin) on [::1]: the hosts.toml it writes names the
    mirror as http://[::1]:PORT, containerd pulls through it, and the watchdog checks it over
    IPv6 (a hung agent is stepped around). The registry stays on 127.0.0.1: containerd 1.6 takes
    no image reference with an IPv6 literal, and the upstream being IPv4 is the mixed case."""
    for n in (60, 61):
        small(images, n)
    certs = tmp_path / "certs.d"
    certs.mkdir()
    stack = Stack(tmp_path / "stack6", registry, node_user=("node", USERS["node"]),
                  seeder_user=("seeder", USERS["seeder"]), ip="::1")
    try:
        stack.start_tracker()
        stack.start_origin()
        agent = managed_agent(stack, certs)
        assert agent.url.startswith("http://[::1]:")
        wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml through the agent on ::1")
        # (not as a [host."http://[::1]:..."] header, which containerd 1.6 cannot parse)
        assert f'"{agent.url}" = {{ capabilities' in hosts_file(certs, registry).read_text()
        before = registry.settle()
        image = pull(containerd, certs, registry.host, images, 60)
        assert blobs_from_agent(agent) == len(image.blobs)
        assert agent.metric("shoal_agent_downloads_total", source="peers", result="ok") == 1  # the 2 MiB layer
        large = [d for d, b in image.blobs.items() if b.size >= MIB]
        gets = registry.blob_gets(list(pulls_since(before, registry.settle())))
        assert [gets.get(d, 0) for d in large] == [1]  # once, to the origin seeder
        events = stack.journal(agent, minimum=len(image.blobs))
        assert all(str(e["client_addr"]).startswith("[::1]:") for e in events), [e["client_addr"] for e in events]

        agent.signal(signal.SIGSTOP)
        try:
            wait_for(lambda: registry_alone(certs, registry), timeout=WAIT, what="hosts.toml reduced (hung agent)")
            before = registry.settle()
            image = pull(containerd, certs, registry.host, images, 61)
            assert registry.blob_gets(list(pulls_since(before, registry.settle()))) == dict.fromkeys(image.blobs, 1)
        finally:
            agent.signal(signal.SIGCONT)
        wait_for(lambda: through(agent, certs, registry), timeout=WAIT, what="hosts.toml back through the agent")
    finally:
        stack.close()
