from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shoal import announcing, config, errors, protocol
from shoal.config import parse_duration, parse_size, read_yaml
from shoal.errors import ConfigError
from shoal.swarm import SwarmSettings
from shoal_agent import config as agent_config
from shoal_origin import config as origin_config
from shoal_tracker import config as tracker_config

UP = [{"name": "registry.example.com:5000", "url": "https://registry.example.com:5000"}]


def agent_doc(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/tmp/x", "upstreams": UP, **extra}


@pytest.mark.parametrize(("text", "value"), [
    ("512MiB", 512 << 20), ("2GB", 2_000_000_000), ("10GiB", 10 << 30), (1234, 1234), ("1.5KiB", 1536),
    ("7", 7), ("3k", 3000),
])
def test_sizes(text: Any, value: int) -> None:
    assert parse_size(text, "k") == value


@pytest.mark.parametrize(("text", "value"), [
    ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("7d", 604800.0), (2, 2.0),
])
def test_durations(text: Any, value: float) -> None:
    assert parse_duration(text, "k") == value


@pytest.mark.parametrize(("doc", "message"), [
    (agent_doc(cache={"max_bytes": "lots"}), "cache.max_bytes: expected a size"),
    (agent_doc(cache={"maxbytes": 1}), "cache.maxbytes: unknown key"),
    (agent_doc(bogus=1), "bogus: unknown key"),
    ({"upstreams": UP}, "data_dir: required key is missing"),
    (agent_doc(upstreams=[]), "upstreams: configure at least one upstream"),
    (agent_doc(upstreams=[{"name": "r", "url": "ftp://r"}]), "upstreams[0].url: expected an http"),
    (agent_doc(upstreams=[{"name": "r", "url": "http://u:p@r"}]), "upstreams[0].url: expected an http"),
    (agent_doc(upstreams=[{"name": "r", "url": "http://:p@r"}]), "upstreams[0].url: expected an http"),
    (agent_doc(upstreams=[{"name": "a/b", "url": "http://r"}]), "upstreams[0].name: expected a registry host"),
    (agent_doc(upstreams=[{"name": "r", "url": "http://r", "username": "u"}]), "upstreams[0].password: give file"),
    (agent_doc(upstreams=UP * 2), "upstreams[1].name: 'registry.example.com:5000' is configured twice"),
    (agent_doc(listen="nowhere"), "listen: expected host:port"),
    (agent_doc(swarm={"stall_timeout": "soon"}), "swarm.stall_timeout: expected a duration"),
    (agent_doc(origin="http://o:1"), "node_token: give file or env (required with origin)"),
    (agent_doc(torrent={"listen": "host:1"}), "torrent.listen: expected an IP address"),
    (agent_doc(torrent={"libtorrent": {"no_such_setting": 1}}), "torrent.libtorrent.no_such_setting: not a"),
    (agent_doc(torrent={"download_connections": 1}), "torrent.download_connections: expected 0 (no limit) or 2 to"),
    (agent_doc(torrent={"download_connections": -1}), "torrent.download_connections: expected 0 (no limit) or 2"),
    (agent_doc(torrent={"download_connections": "4"}), "torrent.download_connections: expected an integer"),
    (agent_doc(log={"level": "loud"}), "log.level: expected one of"),
    (agent_doc(cache={"max_bytes": True}), "cache.max_bytes: expected a size"),
    (agent_doc(containerd={"config_path": "certs.d"}), "containerd.config_path: must be an absolute path"),
    (agent_doc(containerd={"config_path": "/c", "mirror": "http://a:1/v2"}), "containerd.mirror: expected http"),
    (agent_doc(containerd={"mirror": "unix:///a"}), "containerd.mirror: expected an http"),
    (agent_doc(containerd={"dial_timeout": 0}), "containerd.dial_timeout: must be positive"),
    (agent_doc(containerd={"mirror": "http://a:5050#\n[host.x]"}), "containerd.mirror: expected http"),
    (agent_doc(containerd={"mirror": "http://a"}), "containerd.mirror: expected http"),
    (agent_doc(containerd={"mirror": "http://127.0.0.1:5051"}), "containerd.mirror: must name an address and port"),
    (agent_doc(containerd={"mirror": "http://localhost:5050"}), "containerd.mirror: must be an IP address"),
    (agent_doc(containerd={"mirror": "http://127.0.0.2:5050"}), "containerd.mirror: must name an address and port"),
    (agent_doc(containerd={"mirror": "http://[::1]:5050"}), "containerd.mirror: must name an address and port"),
    (agent_doc(listen="0.0.0.0:5050", containerd={"mirror": "http://[::1]:5050"}),
     "containerd.mirror: must name an address and port"),
    (agent_doc(containerd={"check_interval": "10ms"}), "containerd.check_interval: must be between"),
    (agent_doc(containerd={"config_path": "/c"}, upstreams=[{"name": "..", "url": "http://r"}]),
     "upstreams[0].name: '..' cannot name a directory"),
    (agent_doc(journal={"roll_bytes": "4KiB"}), "journal.roll_bytes: must be between 64KiB and max_segment_bytes"),
    (agent_doc(journal={"roll_bytes": "2MiB", "max_segment_bytes": "1MiB"}), "journal.roll_bytes: must be between"),
    # the journal would fill its budget before rolling, and refuse every request for good (attack20)
    (agent_doc(journal={"roll_bytes": "512KiB", "max_disk_bytes": "256KiB"}),
     "journal.roll_bytes: must be at most half of max_disk_bytes"),
])
def test_agent_errors_name_the_key(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(doc)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_agent_defaults() -> None:
    cfg = agent_config.load(agent_doc(cache={"max_bytes": "1GiB"}))
    assert cfg.cache.max_bytes == 1 << 30
    assert cfg.swarm.threshold == 1 << 20
    assert cfg.tracker is None and cfg.listen == "127.0.0.1:5050"
    assert cfg.journal.roll_size == 1 << 20 and agent_config.load(agent_doc(journal={"roll_bytes": "128KiB"})
                                                                   ).journal.roll_size == 128 << 10


@pytest.mark.parametrize(("journal", "roll"), [
    ({"max_segment_bytes": "512KiB"}, 512 << 10),  # loaded before roll_bytes was a key: still does
    ({"max_disk_bytes": "256KiB"}, 128 << 10),  # rolls before the budget is reached
    ({"roll_bytes": "128KiB", "max_disk_bytes": "256KiB"}, 128 << 10),
])
def test_the_journal_roll_fits_the_segment_and_the_disk_budget(journal: dict[str, str], roll: int) -> None:
    assert agent_config.load(agent_doc(journal=journal)).journal.roll_size == roll


def test_tracker_needs_a_token_source() -> None:
    with pytest.raises(ConfigError, match="^registration_token: give file or env"):
        tracker_config.load({})
    with pytest.raises(ConfigError, match="^origin_public_key: required"):
        tracker_config.load({"registration_token": {"env": "X"}})
    ok = {"registration_token": {"env": "X"}, "node_token": {"env": "Y"}, "origin_public_key": "/k.pem"}
    cfg = tracker_config.load({**ok, "interval": "10s"})
    assert cfg.interval == 10.0


def test_tracker_origin_spare() -> None:
    ok = {"registration_token": {"env": "X"}, "node_token": {"env": "Y"}, "origin_public_key": "/k.pem"}
    assert tracker_config.load(ok).origin_spare == 2
    assert tracker_config.load({**ok, "origin_spare": 0}).origin_spare == 0
    with pytest.raises(ConfigError, match="^origin_spare: must be between 0 .* and 64$"):
        tracker_config.load({**ok, "origin_spare": -1})


def test_tracker_peer_ttl_follows_the_interval() -> None:
    """A peer that announces on time is never dropped: the TTL is derived from the interval by
    default, and a TTL under one interval plus the announce timeout is refused."""
    ok = {"registration_token": {"env": "X"}, "node_token": {"env": "Y"}, "origin_public_key": "/k.pem"}
    assert tracker_config.load(ok).ttl == 3 * 30 + announcing.ANNOUNCE_TIMEOUT
    # an operator who raises the interval does not have to remember the TTL
    assert tracker_config.load({**ok, "interval": "5m"}).ttl == 3 * 300 + announcing.ANNOUNCE_TIMEOUT
    assert tracker_config.load({**ok, "interval": "2s"}).ttl == 16
    assert tracker_config.load({**ok, "interval": "30s", "peer_ttl": "40s"}).ttl == 40
    with pytest.raises(ConfigError, match=r"^peer_ttl: 95s would drop live peers .* at least interval \+ 10s"):
        tracker_config.load({**ok, "interval": "90s", "peer_ttl": "95s"})
    with pytest.raises(ConfigError, match="^peer_ttl: "):
        tracker_config.load({**ok, "peer_ttl": "1s"})
    with pytest.raises(ConfigError, match="^interval: must be a whole number of seconds"):
        tracker_config.load({**ok, "interval": "1500ms"})


@pytest.mark.parametrize("setting", sorted(announcing.RESERVED_SETTINGS))
def test_announce_timing_cannot_be_overridden(setting: str) -> None:
    """libtorrent's own announce floor (300 s) once overrode the tracker's interval; shoal
    sets it, and a configuration that tries to is refused naming the key."""
    for load, doc in ((agent_config.load, agent_doc(torrent={"libtorrent": {setting: 300}})),
                      (origin_config.load, {"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969",
                                            "registration_token": {"file": "/x"}, "signing_key": "/k.pem",
                                            "node_token": {"file": "/n"}, "torrent": {"libtorrent": {setting: 300}}})):
        with pytest.raises(ConfigError, match=rf"^torrent\.libtorrent\.{setting}: set by shoal"):
            load(doc)
    settings = SwarmSettings(listen_ip="127.0.0.1", listen_port=1, fingerprint="-XX0000-",
                             extra={setting: 300}).pack()
    assert settings[setting] == announcing.libtorrent_settings()[setting]


@pytest.mark.parametrize("setting", ["listen_interfaces"])
def test_the_tls_only_listener_cannot_be_overridden(setting: str) -> None:
    """A plain listening socket would let peers without a certificate in (or announce port 0)."""
    with pytest.raises(ConfigError, match=rf"^torrent\.libtorrent\.{setting}: set by shoal"):
        agent_config.load(agent_doc(torrent={"libtorrent": {setting: "0.0.0.0:6881"}}))
    settings = SwarmSettings(listen_ip="127.0.0.1", listen_port=1, fingerprint="-XX0000-",
                             extra={setting: "0.0.0.0:6881"}).pack()
    assert settings["listen_interfaces"] == "127.0.0.1:1s" and settings["outgoing_interfaces"] == "127.0.0.1"


@pytest.mark.parametrize("node", ["Node0", "node0 ", " node0", "node0\u200b", "n\u043ede0", "node\n0", "-node", "a_b",
                                  "\ud800", "x" * 252 + "."])
def test_a_node_name_is_one_spelling_of_a_dns_name(node: str) -> None:
    """Names that look alike would pass for another node in the audit; control characters forge
    log lines; a lone surrogate was a 500 at the origin."""
    with pytest.raises(ConfigError, match="^node must be a lowercase DNS name"):
        agent_config.load(agent_doc(node=node))
    for body in (protocol.GrantsRequest, protocol.AdmissionRequest, protocol.JournalBatch):
        with pytest.raises(errors.BadRequest) as exc:
            body.from_json({"node": node, "public_key": "k", "records": [], "ns": "r", "repository": "a"})
        assert exc.value.oci.status == 400
        assert str(exc.value) == "node must be a lowercase DNS name (a-z, 0-9, '-', '.'; at most 253 characters)"
    assert agent_config.load(agent_doc(node="node-0.zone-a")).node == "node-0.zone-a"


@pytest.mark.parametrize(("hostname", "node"), [("vm", "vm"), ("My_Host", "my-host"),
                                                ("web-1.Example.COM", "web-1.example.com"), ("-x-", "x"),
                                                ("__", "node"), ("é", "node")])
def test_the_default_node_name_is_the_host_name_made_valid(hostname: str, node: str) -> None:
    assert agent_config.default_node_name(hostname) == node


def test_origin_announce_default() -> None:
    with pytest.raises(ConfigError, match="^signing_key: required"):
        origin_config.load({"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969",
                            "registration_token": {"file": "/x"}})
    cfg = origin_config.load({"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969",
                              "registration_token": {"file": "/x"}, "signing_key": "/k.pem",
                              "node_token": {"file": "/n"}})
    assert cfg.announce == ["http://t:6969/announce"]
    base = {"data_dir": "/d", "upstreams": UP, "registration_token": {"file": "/x"}, "signing_key": "/k.pem",
            "node_token": {"file": "/n"}}
    replicas = origin_config.load({**base, "trackers": ["http://t1:6969", "http://t2:6969"]})
    assert replicas.announce == ["http://t1:6969/announce", "http://t2:6969/announce"]
    assert replicas.tracker_urls == ["http://t1:6969", "http://t2:6969"]
    for extra, message in (({}, "^tracker: give either"),
                           ({"tracker": "http://t", "trackers": ["http://u"]}, "^tracker: give either"),
                           ({"trackers": ["http://u"], "announce_urls": []}, None),
                           ({"trackers": ["http://u"], "announce_urls": ["http://a", "http://b"]}, "^announce_urls:"),
                           ({"trackers": ["http://u"], "announce_url": "http://a"}, "^announce_url:")):
        if message is None:
            origin_config.load({**base, **extra})
            continue
        with pytest.raises(ConfigError, match=message):
            origin_config.load({**base, **extra})


def test_secret_file_errors_name_the_key(tmp_path: Path) -> None:
    cfg = agent_config.load(agent_doc(upstreams=[{**UP[0], "username": "u",
                                                  "password": {"file": str(tmp_path / "missing")}}]))
    with pytest.raises(ConfigError) as exc:
        cfg.upstreams[0].credentials("upstreams[0]")
    assert str(exc.value).startswith("upstreams[0].password: cannot read secret file")


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        read_yaml(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(str(lst))
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(str(tmp_path / "nope.yaml"))


def test_max_connections_defaults_and_bounds() -> None:
    """Each component's cap on connections at once (shoal/web.py closes the oldest idle or slow
    one past it), sized for its clients, configurable, never below 1."""
    tracker = {"registration_token": {"env": "X"}, "node_token": {"env": "Y"}, "origin_public_key": "/k.pem"}
    origin = {"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969", "registration_token": {"file": "/x"},
              "signing_key": "/k.pem", "node_token": {"file": "/n"}}
    assert agent_config.load(agent_doc()).max_connections == 1024
    assert origin_config.load(origin).max_connections == 2048
    assert tracker_config.load(tracker).max_connections == 4096
    assert tracker_config.load({**tracker, "max_connections": 100}).max_connections == 100
    for load, doc in ((agent_config.load, agent_doc()), (origin_config.load, origin),
                      (tracker_config.load, tracker)):
        with pytest.raises(ConfigError, match="^max_connections: must be at least 1"):
            load({**doc, "max_connections": 0})


def test_components_raise_their_open_file_limit() -> None:
    import resource

    from shoal.entry import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ----- did you mean, duplicate keys, secrets (issue 17) ---------------------------------------


@pytest.mark.parametrize(("doc", "message"), [
    (agent_doc(cache={"max_byte": 1}), "cache.max_byte: unknown key; did you mean `cache.max_bytes`?"),
    (agent_doc(data_dri="/x"), "data_dri: unknown key; did you mean `data_dir`?"),
    (agent_doc(upstreams=[{**UP[0], "usernme": "u"}]), "upstreams[0].usernme: unknown key; did you mean "
                                                        "`upstreams[0].username`?"),
    (agent_doc(torrent={"libtorrent": {"connections_limt": 5}}),
     "torrent.libtorrent.connections_limt: not a libtorrent setting; "
     "did you mean `torrent.libtorrent.connections_limit`?"),
])
def test_unknown_key_suggests_the_closest(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(doc)
    assert str(exc.value) == message


def test_unknown_key_without_a_close_one_suggests_nothing() -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(agent_doc(zzzzzz=1))
    assert str(exc.value) == "zzzzzz: unknown key"


@pytest.mark.parametrize(("text", "message"), [
    ("data_dir: /a\nupstreams: []\ndata_dir: /b\n", "data_dir: given twice in {path} (lines 1 and 3); keep one"),
    ("cache:\n  max_bytes: 1GiB\n  max_bytes: 2GiB\n", "cache.max_bytes: given twice in {path} (lines 2 and 3)"),
    ("upstreams:\n  - name: a\n    url: http://a\n  - name: b\n    url: http://b\n    url: http://c\n",
     "upstreams[1].url: given twice in {path} (lines 5 and 6)"),
    ("torrent:\n  libtorrent:\n    a: 1\n    b: 2\n    a: 3\n",
     "torrent.libtorrent.a: given twice in {path} (lines 3 and 5)"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_yaml(str(path))
    assert str(exc.value).startswith(message.format(path=path))
    assert "\n" not in str(exc.value)


def test_yaml_merge_keys_still_override(tmp_path: Path) -> None:
    """`<<: *anchor` followed by a key of the anchor is an intended override, not a duplicate."""
    path = tmp_path / "c.yaml"
    path.write_text("base: &b\n  x: 1\n  y: 2\nother:\n  <<: *b\n  y: 3\n")
    assert read_yaml(str(path)) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}}


@pytest.mark.parametrize("doc", [
    agent_doc(upstreams=[{"name": "r", "url": "https://alice:hunter2secret@r"}]),
    agent_doc(upstreams=[{"name": "alice:hunter2secret@r", "url": "https://r"}]),
    agent_doc(origin="http://alice:hunter2secret@o:1"),
    agent_doc(upstreams=[{**UP[0], "token_realms": ["https://alice:hunter2secret@auth"]}]),
    agent_doc(listen="https://alice:hunter2secret@h"),
    agent_doc(cache={"max_bytes": "https://alice:hunter2secret@h"}),
    agent_doc(upstreams=[{**UP[0], "username": "u", "password": {"env": ["hunter2secret"]}}]),
    agent_doc(node_token={"file": {"hunter2secret": 1}}),
    agent_doc(**{"https://alice:hunter2secret@h": 1}),
])
def test_config_errors_never_echo_a_secret(doc: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(doc)
    assert "hunter2secret" not in str(exc.value)


# A password written unencoded with "@", "/", "?" or "#" in it (attack17): the part after its
# first "@" was shown ("alice:***@hunter2secret@r"), or, with "/", "?" or "#" (urlsplit then finds
# no login, only a bad port), the whole of it.
@pytest.mark.parametrize("url", ["https://alice:x@hunter2secret@r.example", "https://alice:x/hunter2secret@r.example",
                                 "https://alice:x?hunter2secret@r.example:5000", "https://alice:x#hunter2secret@r",
                                 "ftp://tok@hunter2secret@r.example"])
def test_a_url_whose_password_holds_url_punctuation_is_not_echoed(url: str) -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(agent_doc(upstreams=[{"name": "r", "url": url}]))
    assert "hunter2secret" not in str(exc.value)
    assert "***@r" in str(exc.value)  # (still names the host)


def test_redaction_leaves_digests_and_plain_urls_alone() -> None:
    from shoal.redaction import redact
    for text in ("docker://reg.example/name@sha256:abcdef0123", "reg.example:5000/name@sha256:ab12",
                 "https://reg.example/v2/name/manifests/latest"):
        assert redact(text) == text
    assert redact("https://user:pa/ss@[::1]:5000/v2/") == "https://user:***@[::1]:5000/v2/"


def test_a_url_in_an_error_keeps_the_user_and_the_host() -> None:
    with pytest.raises(ConfigError) as exc:
        agent_config.load(agent_doc(upstreams=[{"name": "r", "url": "ftp://alice:pw@r.example"}]))
    assert "ftp://alice:***@r.example" in str(exc.value)


@pytest.mark.parametrize(("load", "text", "key"), [
    # a secret-bearing key: its value is not shown, whatever it is
    (tracker_config.load, "registration_token: {env: [hunter2secret]}\n", "registration_token.env: expected a string"),
    (tracker_config.load, "redis: {password: {file: [hunter2secret]}}\n", "redis.password.file: expected a string"),
    (tracker_config.load, "redis: {address: 'https://alice:hunter2secret@h:1'}\n", "redis.address: "),
    (origin_config.load, "data_dir: /d\nupstreams: [{name: r, url: 'https://alice:hunter2secret@r'}]\n",
     "upstreams[0].url: expected an http"),
])
def test_component_configs_never_echo_a_secret(load: Any, text: str, key: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(read_yaml(str(path)))
    assert str(exc.value).startswith(key)
    assert "hunter2secret" not in str(exc.value)


@pytest.mark.parametrize(("key", "secret"), [
    ("upstreams[0].password.file", True), ("redis.password.env", True), ("node_token", True),
    ("signing_key", True), ("peer_token.env", True),
    ("upstreams[0].token_realms[0]", False), ("upstreams[0].url", False), ("cache.max_bytes", False),
])
def test_which_keys_hold_secrets(key: str, secret: bool) -> None:
    assert config.secret_key(key) is secret
    assert ("hunter2" in config.shown("hunter2", key)) is not secret
