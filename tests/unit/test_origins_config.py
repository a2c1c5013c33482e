"""Configuration of several origins: the agents' `origins` list, each origin's `name` in it."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.config import OriginEntry
from shoal.errors import ConfigError
from shoal_agent import config as agent_config
from shoal_origin import config as origin_config

UP = [{"name": "registry.example.com:5000", "url": "https://registry.example.com:5000"}]
ORIGINS = [{"name": "o1", "url": "http://10.0.0.1:6970"}, {"name": "o2", "url": "http://10.0.0.2:6970"},
           {"name": "o3", "url": "http://10.0.0.3:6970"}]
SWARM = {"node_token": {"file": "/n"}, "origin_public_key": "/k.pem"}


def agent(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/tmp/x", "upstreams": UP, **extra}


def origin(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/d", "upstreams": UP, "tracker": "http://t:6969", "registration_token": {"file": "/x"},
            "signing_key": "/k.pem", "node_token": {"file": "/n"}, **extra}


def test_one_origin_is_a_list_of_one() -> None:
    cfg = agent_config.load(agent(origin="http://o:6970", **SWARM))
    assert cfg.origin_entries == [OriginEntry("origin", "http://o:6970")]
    assert cfg.origin_replication == 2
    many = agent_config.load(agent(origins=ORIGINS, origin_replication=3, **SWARM))
    assert [o.name for o in many.origin_entries] == ["o1", "o2", "o3"]
    assert many.origin_replication == 3
    assert agent_config.load(agent()).origin_entries == []


@pytest.mark.parametrize(("doc", "message"), [
    (agent(origin="http://o:1", origins=ORIGINS, **SWARM), "origins: give either origin"),
    (agent(origins=[*ORIGINS, {"name": "o1", "url": "http://x:1"}], **SWARM), "origins[3].name: 'o1' is configured"),
    (agent(origins=[*ORIGINS, {"name": "o4", "url": "http://10.0.0.1:6970"}], **SWARM), "origins[3].url: "),
    (agent(origins=[{"name": "a b", "url": "http://x:1"}], **SWARM), "origins[0].name: expected letters"),
    (agent(origins=[{"name": "a", "url": "ftp://x"}], **SWARM), "origins[0].url: expected an http"),
    (agent(origins=[{"name": "a"}], **SWARM), "origins[0].url: required key is missing"),
    (agent(origins=ORIGINS, origin_replication=0, **SWARM), "origin_replication: must be at least 1"),
    (agent(origins=ORIGINS, origin_replication=5, **SWARM), "origin_replication: 5 owners per blob, but origins"),
    (agent(origins=ORIGINS), "node_token: give file or env"),
    (origin(origins=ORIGINS, peer_token={"file": "/p"}), "name: required with origins"),
    (origin(origins=ORIGINS, name="o9", peer_token={"file": "/p"}), "name: 'o9' is not one of origins"),
    (origin(origins=ORIGINS, name="o1"), "peer_token: give file or env"),
    (origin(origins=ORIGINS, name="o1", peer_token={"file": "/p"}, origin_replication=0),
     "origin_replication: must be at least 1"),
])
def test_bad_origins_name_the_key(doc: dict[str, Any], message: str) -> None:
    load = origin_config.load if "tracker" in doc else agent_config.load
    with pytest.raises(ConfigError) as exc:
        load(doc)
    assert str(exc.value).startswith(message), str(exc.value)


def test_an_origin_among_several() -> None:
    cfg = origin_config.load(origin(origins=ORIGINS, name="o2", peer_token={"env": "P"}))
    assert cfg.name == "o2" and len(cfg.origins) == 3 and cfg.origin_replication == 2
