"""IPv6 and dual stack in configuration and addresses (issue 15): every listen takes `[::1]:PORT`
and `[::]:PORT`, every URL an IPv6 literal; an IPv6 address without brackets is a one-line error
naming the key; [::] is dual stack (HTTP and BitTorrent); addresses are written bracketed and
unmapped; per-address limits count an IPv6 host by its /64."""

from __future__ import annotations

import argparse
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shoal import netaddr, web
from shoal.cli import parser, up
from shoal.config import split_hostport
from shoal.errors import ConfigError, ShoalError
from shoal.swarm import SwarmSettings
from shoal_agent import config as agent_config
from shoal_agent import hostsconf
from shoal_origin import config as origin_config
from shoal_tracker import config as tracker_config

UP6 = [{"name": "[fd00::5]:5000", "url": "http://[fd00::5]:5000"}]


def agent_doc(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/tmp/x", "upstreams": UP6, **extra}


def origin_doc(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/d", "upstreams": UP6, "tracker": "http://[::1]:6969", "registration_token": {"file": "/x"},
            "signing_key": "/k.pem", "node_token": {"file": "/n"}, **extra}


def tracker_doc(**extra: Any) -> dict[str, Any]:
    return {"registration_token": {"file": "/x"}, "origin_public_key": "/k.pem", "node_token": {"file": "/n"},
            **extra}


@pytest.mark.parametrize("listen", ["[::1]:5050", "[::]:5050", "[fd00::2]:5050", "[10.0.3.7]:5050"])
def test_every_listener_takes_ipv6(listen: str) -> None:
    agent = agent_config.load(agent_doc(listen=listen, torrent={"listen": listen.replace("5050", "6881")},
                                        origin="http://[::1]:6970", node_token={"file": "/n"},
                                        origin_public_key="/k.pem"))
    assert agent.listen == listen and agent.origin == "http://[::1]:6970"
    assert agent.upstreams[0].url == "http://[fd00::5]:5000"
    origin = origin_config.load(origin_doc(listen=listen, torrent={"listen": listen.replace("5050", "6882")}))
    assert origin.listen == listen
    # the announce URL written into every torrent keeps the brackets
    assert origin.announce == ["http://[::1]:6969/announce"]
    assert origin_config.load(origin_doc(announce_url="http://[fd00::9]:6969/announce")).announce == \
        ["http://[fd00::9]:6969/announce"]
    assert tracker_config.load(tracker_doc(listen=listen)).listen == listen
    assert split_hostport(listen) == (listen.rpartition(":")[0].strip("[]"), 5050)


@pytest.mark.parametrize(("doc", "message"), [
    (agent_doc(listen="::1:5050"), "listen: an IPv6 address goes in brackets, as [::1]:5050"),
    (agent_doc(listen="fd00::1:5050"), "listen: an IPv6 address goes in brackets"),
    (agent_doc(listen="[::1:5050"), "listen: expected host:port"),
    (agent_doc(listen="[::1]5050"), "listen: expected host:port"),
    (agent_doc(listen="[not-an-ip]:5050"), "listen: expected host:port"),
    (agent_doc(listen="[::1]:65536"), "listen: expected host:port"),
    (agent_doc(torrent={"listen": "::1:6881"}), "torrent.listen: an IPv6 address goes in brackets"),
    (agent_doc(torrent={"listen": "[::1]"}), "torrent.listen: expected host:port"),
    (agent_doc(origin="http://[::1:6970"), "origin: expected an http:// or https:// URL"),
    (agent_doc(origin="http://[::g]:6970"), "origin: expected an http:// or https:// URL"),
    (agent_doc(upstreams=[{"name": "r", "url": "http://[::1]:99999"}]), "upstreams[0].url: expected an http"),
    (agent_doc(containerd={"mirror": "http://[::1]:99999"}), "containerd.mirror: expected an http"),
    (agent_doc(listen="[::1]:5050", containerd={"mirror": "http://127.0.0.1:5050"}),
     "containerd.mirror: must name an address and port listen holds ([::1]:5050)"),
    (agent_doc(listen="0.0.0.0:5050", containerd={"mirror": "http://[::1]:5050"}),
     "containerd.mirror: must name an address and port"),
    (agent_doc(listen="[::]:5050", containerd={"mirror": "http://[::1]:5051"}),
     "containerd.mirror: must name an address and port"),
])
def test_ipv6_errors_are_one_line_naming_the_key(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(doc)
    assert str(exc.value).startswith(message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("load", [tracker_config.load, lambda d: origin_config.load(origin_doc(**d))])
def test_tracker_and_origin_refuse_an_unbracketed_ipv6_listen(load: Any) -> None:
    with pytest.raises(ConfigError, match=r"^listen: an IPv6 address goes in brackets"):
        load(tracker_doc(listen="::1:6969") if load is tracker_config.load else {"listen": "::1:6970"})


@pytest.mark.parametrize("mirror", ["http://[::1]:5050", "http://127.0.0.1:5050"])
def test_a_dual_stack_agent_is_reached_on_either_loopback(mirror: str) -> None:
    """listen [::] is one dual-stack socket: it holds ::1 and 127.0.0.1 (shoal/web.py)."""
    cfg = agent_config.load(agent_doc(listen="[::]:5050", containerd={"config_path": "/etc/c", "mirror": mirror}))
    assert hostsconf.plan_for(cfg).mirror == mirror


def test_hosts_toml_names_an_ipv6_mirror_in_brackets() -> None:
    cfg = agent_config.load(agent_doc(listen="[::1]:5050", containerd={"config_path": "/etc/c"}))
    plan = hostsconf.plan_for(cfg)
    assert plan.mirror == "http://[::1]:5050"
    assert hostsconf.local_url("[::]:5050") == "http://[::1]:5050"
    text = hostsconf.render(plan, plan.registries[0], hostsconf.State.MIRROR, None)
    assert text is not None
    assert 'server = "http://[fd00::5]:5000"' in text
    # never a [host."http://[::1]:5050"] header: containerd 1.6 cannot parse it and drops the file
    assert '[host."' not in text and '"http://[::1]:5050" = { capabilities' in text
    assert tomllib.loads(text)["host"] == {"http://[::1]:5050": {"capabilities": ["pull", "resolve"],
                                                                 "dial_timeout": "1000ms"}}
    # merged with the operator's own file: the agent first, the operator's hosts after
    original = 'server = "https://mirror.example"\n\n[host."https://cache.example"]\n  capabilities = ["pull"]\n'
    merged = hostsconf.render(plan, plan.registries[0], hostsconf.State.MIRROR, original)
    assert merged is not None
    assert list(tomllib.loads(merged)["host"]) == ["http://[::1]:5050", "https://cache.example"]
    assert tomllib.loads(merged)["server"] == "https://mirror.example"


def test_libtorrent_listens_on_the_address_given_and_on_both_families_for_unspecified() -> None:
    def pack(listen_ip: str) -> dict[str, Any]:
        return SwarmSettings(listen_ip=listen_ip, listen_port=6881, fingerprint="-XX0000-").pack()

    assert pack("::1")["listen_interfaces"] == "[::1]:6881s" and pack("::1")["outgoing_interfaces"] == "::1"
    # libtorrent alone would take [::] as "every IPv6 address": shoal's [::] is dual stack
    assert pack("::")["listen_interfaces"] == "0.0.0.0:6881s,[::]:6881s"
    assert pack("0.0.0.0")["listen_interfaces"] == "0.0.0.0:6881s"
    assert pack("::")["outgoing_interfaces"] == pack("0.0.0.0")["outgoing_interfaces"] == ""
    assert pack("127.0.0.2")["listen_interfaces"] == "127.0.0.2:6881s"


def test_http_listeners_bind_ipv6_and_unspecified_is_dual_stack() -> None:
    sock = web._bind("::", 0)
    try:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        sock.close()
    sock = web._bind("::1", 0)
    try:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
        port = sock.getsockname()[1]
        sock.listen()  # (SO_REUSEADDR lets a second socket bind a port nobody listens on)
        with pytest.raises(ShoalError, match=rf"^listen: cannot bind \[::1\]:{port}: "):
            web._bind("::1", port).close()
    finally:
        sock.close()


def test_addresses_are_written_bracketed_and_unmapped() -> None:
    assert netaddr.peer_address(("::1", 40000, 0, 0)) == "[::1]:40000"
    assert netaddr.peer_address(("::ffff:127.0.0.2", 40000, 0, 0)) == "127.0.0.2:40000"
    assert netaddr.peer_address(("127.0.0.2", 40000)) == "127.0.0.2:40000"
    assert netaddr.peer_address(("fe80::1%eth0", 1, 0, 2)) == "[fe80::1]:1"
    assert netaddr.peer_address(None) is None and netaddr.peer_address("/run/x.sock") is None
    assert netaddr.unmapped("not-an-ip") == "not-an-ip"


def test_an_ipv6_host_has_one_budget_for_its_64() -> None:
    assert netaddr.limit_key("2001:db8:1:2::7") == netaddr.limit_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert netaddr.limit_key("2001:db8:1:3::7") != netaddr.limit_key("2001:db8:1:2::7")
    assert netaddr.limit_key("::ffff:192.0.2.7") == netaddr.limit_key("192.0.2.7") == "192.0.2.7"
    assert netaddr.limit_key("192.0.2.8") != "192.0.2.7"
    assert netaddr.limit_key(None) == ""


def _up(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return parser().parse_args(["up", "--upstream", "http://[::1]:5000", "--data-dir", str(tmp_path), *extra])


@pytest.mark.parametrize("torrent_ip", ["::1", "[::1]"])
def test_shoal_up_on_ipv6(tmp_path: Path, torrent_ip: str) -> None:
    configs = up.up_configs(_up(tmp_path, "--listen", "[::1]:5050", "--tracker-listen", "[::1]:6969",
                                "--origin-listen", "[::1]:6970", "--torrent-ip", torrent_ip), tmp_path / "d")
    agent = agent_config.load(configs["agent"])
    origin = origin_config.load(configs["origin"])
    assert agent.torrent.listen.startswith("[::1]:") and origin.torrent.listen.startswith("[::1]:")
    assert agent.origin == "http://[::1]:6970" and origin.announce == ["http://[::1]:6969/announce"]
    assert agent.upstreams[0].name == "[::1]:5000" and agent.upstreams[0].url == "http://[::1]:5000"
    tracker_config.load(configs["tracker"])
