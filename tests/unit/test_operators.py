"""Operators: the tokens file, the origin's `operators:` settings, the CLI's credential forms,
and operator events that no node can write."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from shoal import audit, operator_tokens
from shoal.cli import login
from shoal.errors import ConfigError
from shoal_origin import config as origin_config

UP = [{"name": "registry.test:5000", "url": "http://127.0.0.1:9"}]
ORIGIN = {"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969", "registration_token": {"file": "/x"},
          "signing_key": "/k.pem", "node_token": {"file": "/n"}}


def test_tokens_are_stored_hashed_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "operators.json"
    token = operator_tokens.add(path, "ci", ["seed"], ["registry.test:5000/team/*"])
    assert token.startswith("shoal_op_") and len(base64.urlsafe_b64decode(token[9:] + "=")) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert token not in path.read_text() and token[9:] not in path.read_text()
    [op] = operator_tokens.load(path)
    assert (op.name, op.roles, op.repositories) == ("ci", ("seed",), ("registry.test:5000/team/*",))
    assert op.sha256 == operator_tokens.token_hash(token)
    second = operator_tokens.add(path, "auditor", ["audit", "audit"])
    assert second != token and [o.roles for o in operator_tokens.load(path)] == [("seed",), ("audit",)]
    with pytest.raises(operator_tokens.TokenFileError, match="exists"):
        operator_tokens.add(path, "ci", ["admin"])
    assert operator_tokens.remove(path, "ci") and not operator_tokens.remove(path, "ci")
    assert [o.name for o in operator_tokens.load(path)] == ["auditor"]
    assert [p.name for p in path.parent.iterdir()] == ["operators.json"]  # no temporary file left


@pytest.mark.parametrize(("name", "roles", "globs", "message"), [
    ("Bad Name", ["seed"], [], "operator name"),
    ("ok", [], [], "give at least one of seed, audit, admin"),
    ("ok", ["root"], [], "unknown role 'root'"),
    ("ok", ["seed"], ["no-slash"], "registry/name globs"),
])
def test_add_refuses_bad_entries(tmp_path: Path, name: str, roles: list[str], globs: list[str],
                                 message: str) -> None:
    with pytest.raises(operator_tokens.TokenFileError, match=message):
        operator_tokens.add(tmp_path / "operators.json", name, roles, globs)
    assert not (tmp_path / "operators.json").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("[", "not valid JSON"),
    ("[]", "expected"),
    ('{"operators": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["seed"], "extra": 1}]}',
     r"operators\[0\].extra: unknown key"),
    ('{"operators": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["x"]}]}', "unknown role"),
    ('{"operators": [{"name": "a", "sha256": "' + "0" * 64 + '", "roles": ["seed"]}, '
     '{"name": "b", "sha256": "' + "0" * 64 + '", "roles": ["seed"]}]}', "share one token"),
])
def test_a_malformed_file_says_where(text: str, message: str) -> None:
    with pytest.raises(operator_tokens.TokenFileError, match=message):
        operator_tokens.parse(text)


def test_origin_reads_the_file_at_start_and_names_the_key(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from shoal_origin.operators import Operators

    settings = origin_config.load({**ORIGIN, "operators": {"tokens": {"file": str(tmp_path / "missing.json")}}})
    with pytest.raises(ConfigError, match=r"^operators.tokens.file: cannot use '.*missing.json': No such file"):
        Operators(settings.operators, cluster_secrets={"node token": "n" * 20}, registry=CollectorRegistry())


@pytest.mark.parametrize(("operators", "message"), [
    ({"registry": {"upstream": "elsewhere:5000"}}, "operators.registry.upstream: 'elsewhere:5000' is not one of"),
    ({"registry": {"upstream": "registry.test:5000", "roles": {"alice": ["root"]}}},
     r"operators.registry.roles.alice\[0\]: expected one of seed, audit, admin"),
    ({"registry": {"upstream": "registry.test:5000", "roles": {"alice": []}}},
     "operators.registry.roles.alice: give at least one"),
    ({"registry": {"upstream": "registry.test:5000", "roles": {"anonymous": ["audit"]}}},
     "anonymous callers cannot hold a role"),
    ({"cache_ttl": "2h"}, "operators.cache_ttl: at most 1h"),
    ({"tokens": {"path": "/x"}}, "operators.tokens.path: unknown key"),
])
def test_operator_settings_errors_name_the_key(operators: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        origin_config.load({**ORIGIN, "operators": operators})


def test_operator_settings_defaults() -> None:
    settings = origin_config.load(ORIGIN).operators
    assert settings.tokens.file is None and settings.registry is None and settings.cache_ttl == 60.0


def test_a_node_cannot_write_an_operator_event() -> None:
    start, end = audit.operator_records(principal="token:ci", method="POST", action="preseed", status=202,
                                        outcome="accepted", detail={"images": ["r:5000/a:v1"]}, client_addr=None,
                                        user_agent=None, authz_method="operator-token")
    assert start["node"] == audit.OPERATOR_NODE and start["kind"] == audit.OPERATOR_KIND
    event = audit.merge(start, end)
    assert (event["action"], event["outcome"], json.loads(event["detail"])) == (
        "preseed", "accepted", {"images": ["r:5000/a:v1"]})
    # what a node ships is checked by audit.validate: neither the kind nor the fields pass
    forged = {k: v for k, v in start.items() if k not in ("action", "detail")}
    with pytest.raises(audit.RecordError, match="the origin's own"):
        audit.validate(forged)
    forged["kind"] = "blob"
    audit.validate(forged)  # (a pull record as such is fine)
    for field in ("action", "detail"):
        with pytest.raises(audit.RecordError, match=f"unknown field '{field}'"):
            audit.validate({**forged, field: "preseed"})


def test_the_origin_name_is_reserved_for_operator_events() -> None:
    from shoal_origin.collector import RESERVED_NODES

    assert audit.OPERATOR_NODE in RESERVED_NODES


# ----- the CLI's credentials ------------------------------------------------------------------------

def args(**given: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    login.add_options(parser)
    ns = parser.parse_args([])
    for key, value in given.items():
        setattr(ns, key, value)
    return ns


@pytest.fixture
def no_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", login.TOKEN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # (podman's fallback, /run/containers/<uid>/auth.json, may hold this machine's own login)
    monkeypatch.setattr("shoal.cli.login.os.getuid", lambda: 4_000_000)
    return tmp_path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_cli_credential_forms(no_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = no_home / "op.token"
    token_file.write_text("shoal_op_abc\n")
    assert login.authorization(args(token_file=str(token_file))) == "Bearer shoal_op_abc"
    monkeypatch.setenv(login.TOKEN_ENV, str(token_file))
    assert login.authorization(args()) == "Bearer shoal_op_abc"
    monkeypatch.delenv(login.TOKEN_ENV)
    assert login.authorization(args(user="alice:pw:with:colons")) == "Basic " + b64("alice:pw:with:colons")
    registry_token = no_home / "registry.token"
    registry_token.write_text("eyJ.abc.def\n")
    assert login.authorization(args(registry_token_file=str(registry_token))) == "Bearer eyJ.abc.def"
    # docker's config.json, with an old-style key, found at its default place
    docker = no_home / ".docker"
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {"https://reg.test:5000/v1/": {"auth": b64("bob:pw")},
                                                              "other.test": {"auth": b64("eve:pw")}}}))
    assert login.authorization(args(), "reg.test:5000") == "Basic " + b64("bob:pw")
    assert login.authorization(args(registry="other.test")) == "Basic " + b64("eve:pw")
    # containers' auth.json comes first
    containers = no_home / ".config" / "containers"
    containers.mkdir(parents=True)
    (containers / "auth.json").write_text(json.dumps({"auths": {"reg.test:5000": {"auth": b64("carol:pw")}}}))
    assert login.authorization(args(), "reg.test:5000") == "Basic " + b64("carol:pw")


@pytest.mark.parametrize(("doc", "message"), [
    ({"auths": {"reg.test:5000": {"identitytoken": "secret-refresh-token"}}}, "identity token.*not support"),
    ({"auths": {}, "credHelpers": {"reg.test:5000": "ecr-login"}}, "credential helper.*not support"),
    ({"auths": {}, "credsStore": "desktop"}, "credential helper.*not support"),
    ({"auths": {"reg.test:5000": {"auth": b64("no-colon")}}}, "not base64"),
    ({"auths": {"elsewhere": {"auth": b64("a:b")}}}, "has no login for it: reg.test:5000"),
])
def test_cli_authfile_refusals_are_one_line_and_secret_free(no_home: Path, doc: dict[str, Any],
                                                            message: str) -> None:
    path = no_home / "auth.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit) as refused:
        login.authorization(args(authfile=str(path)), "reg.test:5000")
    text = str(refused.value.code)
    assert "\n" not in text and "secret-refresh-token" not in text
    import re

    assert re.search(message, text), text


def test_cli_refuses_the_node_token_and_mixed_options(no_home: Path) -> None:
    node_token = no_home / "node.token"
    node_token.write_text("the-cluster-node-secret-value")
    with pytest.raises(SystemExit, match="does not hold a shoal operator token") as refused:
        login.authorization(args(token_file=str(node_token)))
    assert "the-cluster-node-secret-value" not in str(refused.value.code)
    with pytest.raises(SystemExit, match="give one operator credential, not --token-file and --user"):
        login.authorization(args(token_file=str(node_token), user="a:b"))
    with pytest.raises(SystemExit, match="--password-stdin needs --user"):
        login.authorization(args(password_stdin=True))
    with pytest.raises(SystemExit, match="no operator credential"):
        login.authorization(args())


def test_podmans_own_default_is_searched_and_a_miss_says_where(no_home: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As root without XDG_RUNTIME_DIR, `podman login` writes /run/containers/0/auth.json."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    searched = login._default_authfiles()
    assert Path("/run/containers/4000000/auth.json") in searched
    with pytest.raises(SystemExit) as exc:
        login.authorization(args())
    assert all(str(p) in str(exc.value.code) for p in searched)
