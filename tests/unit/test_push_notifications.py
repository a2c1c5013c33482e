"""Pre-seed on push (origin/notifications.py): reading the registry's notifications, the rules
that select what is seeded, deduplication, the bounded queue, and the configuration."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from shoal import errors
from shoal.errors import ConfigError
from shoal.oci import Digest
from shoal_origin import config as origin_config
from shoal_origin import notifications as n
from shoal_origin.config import NotificationSettings, PushRule
from shoal_origin.preseed import Job, Preseeder
from tests.unit.test_up import args as up_args

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
HOST = "registry.test:5000"
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def event(action: str = "push", media_type: str = MANIFEST, repository: str = "team/app", tag: str | None = "v1",
          digest: str = DIGEST, host: str = HOST) -> dict[str, Any]:
    target: dict[str, Any] = {"mediaType": media_type, "size": 500, "digest": digest, "length": 500,
                              "repository": repository, "url": f"http://{host}/v2/{repository}/manifests/{digest}"}
    if tag is not None:
        target["tag"] = tag
    return {"id": "e1", "timestamp": "2026-11-30T18:00:00Z", "action": action, "target": target,
            "request": {"id": "r1", "addr": "127.0.0.1:4242", "host": host, "method": "PUT", "useragent": "skopeo"},
            "actor": {"name": "alice"}, "source": {"addr": "reg:5000", "instanceID": "i"}}


def envelope(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def test_only_a_tagged_manifest_push_triggers() -> None:
    parsed = n.parse(envelope(
        event(media_type="application/octet-stream", tag=None),  # a layer
        event(tag=None),  # an index's child, pushed by digest
        event(action="pull"),
        event(media_type=INDEX, tag="v2"),
        {"action": "push", "target": "nonsense"},
        event(repository="Team/App"),  # not a repository name
        event(digest="md5:abc"),
        event(host="evil\x1b[2J.example.com"),  # would forge log lines
        event(host="[::1]:5000", tag="v3"),
    ))
    assert parsed.pushes == [n.Push("team/app", Digest.parse(DIGEST), "v2", HOST, "alice"),
                             n.Push("team/app", Digest.parse(DIGEST), "v3", "[::1]:5000", "alice")]
    assert parsed.skipped == {"not_manifest": 1, "untagged": 1, "not_push": 1, "invalid": 4}


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"events": "x"}', b'{"something": 1}', b"\xff\xfe",
                                  json.dumps({"events": [event()] * (n.MAX_EVENTS + 1)}).encode()])
def test_a_malformed_body_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        n.parse(body)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["events", "action", "target", "mediaType", "tag", "digest", "url",
                                         "repository", "type", "event_data", "resources", "resource_url",
                                         "repo_full_name", "actor", "name"]) | st.text(max_size=5),
                        inner, max_size=5), max_leaves=20)


@given(st.one_of(JSON.map(lambda doc: json.dumps(doc).encode()), st.binary(max_size=200)))
def test_any_body_is_pushes_skips_or_a_bad_request(body: bytes) -> None:
    try:
        parsed = n.parse(body)
    except errors.BadRequest:
        return
    assert all(isinstance(p, n.Push) for p in parsed.pushes)
    assert set(parsed.skipped) <= set(n.RESULTS)


def test_harbor_webhook() -> None:
    doc = {"type": "PUSH_ARTIFACT", "occur_at": 1, "operator": "bob",
           "event_data": {"resources": [{"digest": DIGEST, "tag": "v3", "resource_url": f"{HOST}/team/app:v3"},
                                        {"digest": OTHER, "tag": "", "resource_url": f"{HOST}/team/app"}],
                          "repository": {"name": "app", "namespace": "team", "repo_full_name": "team/app",
                                         "repo_type": "private"}}}
    parsed = n.parse(json.dumps(doc).encode())
    assert parsed.pushes == [n.Push("team/app", Digest.parse(DIGEST), "v3", HOST, "bob")]
    assert parsed.skipped == {"untagged": 1}
    assert n.parse(json.dumps({**doc, "type": "PULL_ARTIFACT"}).encode()).skipped == {"not_push": 1}


def test_rules_first_match_decides() -> None:
    rules = n.Rules([PushRule(["team/*"], ["v*"], ["linux/amd64"]), PushRule(["team/app", "base/*"])])
    assert rules.select("team/app", "v1.2") == rules.rules[0]
    assert rules.select("team/app", "latest") == rules.rules[1]  # the second: any tag
    assert rules.select("team/sub/app", "v1") == rules.rules[0]  # `*` crosses "/" (fnmatch)
    assert rules.select("base/debian", "12") == rules.rules[1]
    assert rules.select("other/app", "v1") is None
    assert rules.select("Team/app", "v1") is None  # case matters, as in names
    assert n.Rules([]).select("team/app", "v1") is None  # no rule: nothing


def notifications(settings: NotificationSettings) -> n.Notifications:
    # accept() never touches the pre-seeder (the workers, not started here, do)
    return n.Notifications(settings, upstream=HOST, upstream_url="http://10.0.0.5:5000",
                           preseeder=cast(Preseeder, None), metrics=n.NotificationMetrics(CollectorRegistry()),
                           record=cast(n.Recorder, None))


def count(notify: n.Notifications, result: str) -> float:
    return float(notify.metrics.events.labels(result)._value.get())


SETTINGS = NotificationSettings(rules=[PushRule(["team/*"], ["v*"], ["linux/arm64"])], queue_size=2,
                                hosts=["push.example.com"])


async def test_accept_filters_deduplicates_and_bounds_the_queue() -> None:
    notify = notifications(SETTINGS)
    assert all(count(notify, r) == 0 for r in n.RESULTS)  # every result exported from the start
    pushes = n.parse(envelope(event(), event(), event(tag="latest"), event(host="elsewhere.example.com"),
                              event(host="10.0.0.5:5000", digest=OTHER)))
    assert notify.accept(pushes, client_addr="127.0.0.1", user_agent="reg") == {
        "queued": 2, "duplicate": 1, "no_rule": 1, "foreign": 1}
    item = notify.queue.get_nowait()
    assert str(item.ref) == f"{HOST}/team/app:v1@{DIGEST}" and item.platforms == ["linux/arm64"]
    assert item.ref.reference == DIGEST  # seeded as pushed, whatever the tag names later
    notify.queue.put_nowait(item)
    third = n.parse(envelope(event(host="push.example.com", digest="sha256:" + "ef" * 32)))
    assert notify.accept(third, client_addr=None, user_agent=None) == {"dropped": 1}
    assert count(notify, "dropped") == 1 and count(notify, "queued") == 2
    assert notify.queue.qsize() == 2  # bounded
    # a dropped push was not remembered: once there is room it is taken
    notify.queue.get_nowait()
    assert notify.accept(third, client_addr=None, user_agent=None) == {"queued": 1}


async def test_the_dedupe_window_ends() -> None:
    notify = notifications(NotificationSettings(rules=[PushRule(["*"])], dedupe_window=0.0))
    first = notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None)
    assert first == {"queued": 1}
    notify.queue.get_nowait()
    await asyncio.sleep(0)
    assert notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None) == {"queued": 1}


def origin(**extra: Any) -> dict[str, Any]:
    return {"data_dir": "/tmp/x", "upstreams": [{"name": HOST, "url": f"http://{HOST}"}],
            "tracker": "http://t:6969", "registration_token": {"env": "R"}, "signing_key": "/k",
            "node_token": {"env": "N"}, **extra}


@pytest.mark.parametrize(("section", "message"), [
    ({"rules": []}, "notifications.token: give file or env"),
    ({"token": {"env": "T"}, "rules": [{"repositories": []}]}, "notifications.rules[0].repositories"),
    ({"token": {"env": "T"}, "rules": [{"repositories": ["a/*"], "tags": [""]}]}, "notifications.rules[0].tags"),
    ({"token": {"env": "T"}, "rules": [{"repositories": ["a/*"], "platforms": ["amd64"]}]},
     "notifications.rules[0].platforms"),
    ({"token": {"env": "T"}, "upstream": "nope"}, "notifications.upstream: 'nope' is not one of"),
    ({"token": {"env": "T"}, "queue_size": 0}, "notifications.queue_size"),
    ({"token": {"env": "T"}, "rule": []}, "notifications.rule: unknown key"),
])
def test_bad_notification_settings_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        origin_config.load(origin(notifications=section))


def test_several_upstreams_need_the_notifying_one_named() -> None:
    two = [{"name": HOST, "url": f"http://{HOST}"}, {"name": "b.test", "url": "http://b.test"}]
    with pytest.raises(ConfigError, match="notifications.upstream: name the upstream"):
        origin_config.load(origin(upstreams=two, notifications={"token": {"env": "T"}}))
    cfg = origin_config.load(origin(upstreams=two, notifications={"token": {"env": "T"}, "upstream": "b.test"}))
    assert cfg.notifications is not None and cfg.notifications.rules == []


def test_shoal_up_seed_on_push(tmp_path: Path) -> None:
    from shoal.cli import up

    configs = up.up_configs(up_args(tmp_path, "--seed-on-push", "team/*:v*", "--seed-on-push", "base/*"),
                            tmp_path / "d")
    section = configs["origin"]["notifications"]
    assert section["rules"] == [{"repositories": ["team/*"], "tags": ["v*"]},
                                {"repositories": ["base/*"], "tags": ["*"]}]
    assert Path(section["token"]["file"]).read_text() != ""
    cfg = origin_config.load(configs["origin"])
    assert cfg.notifications is not None and cfg.notifications.upstream == "registry.test:5000"
    assert "notifications" not in up.up_configs(up_args(tmp_path), tmp_path / "e")["origin"]
    with pytest.raises(SystemExit, match="--seed-on-push"):
        up.up_configs(up_args(tmp_path, "--seed-on-push", "team/*:"), tmp_path / "f")


class FakePreseeder:
    """Preseeder's surface the workers use; every job ends at once in `state`."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.started: list[tuple[str, list[str], str | None]] = []

    @staticmethod
    def new_id() -> str:
        return f"job{id(object())}"

    def start(self, refs: list[Any], platforms: list[str], *, owner: str | None = None,
              job_id: str | None = None) -> Job:
        job = Job(id=job_id or "x", images=[str(r) for r in refs], platforms=platforms, owner=owner, state=self.state)
        self.started.append((str(refs[0]), platforms, owner))
        job.ended.set()
        return job


async def run_one(state: str, *, audit_fails: bool = False) -> tuple[FakePreseeder, list[str], n.Notifications]:
    fake = FakePreseeder(state)
    recorded: list[str] = []

    async def record(item: n.Queued, job_id: str) -> None:
        if audit_fails:
            raise OSError("audit store unwritable")
        recorded.append(f"{item.ref} {job_id}")

    notify = n.Notifications(NotificationSettings(rules=[PushRule(["team/*"], platforms=["linux/amd64"])]),
                             upstream=HOST, upstream_url=f"http://{HOST}", preseeder=cast(Preseeder, fake),
                             metrics=n.NotificationMetrics(CollectorRegistry()), record=record)
    notify.start()
    try:
        assert notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None) == {"queued": 1}
        await asyncio.wait_for(notify.queue.join(), 5)
    finally:
        await notify.stop()
    return fake, recorded, notify


async def test_a_worker_audits_then_starts_the_job_as_the_registry() -> None:
    fake, recorded, notify = await run_one("done")
    assert fake.started == [(f"{HOST}/team/app:v1@{DIGEST}", ["linux/amd64"], n.PRINCIPAL)]
    assert len(recorded) == 1 and recorded[0].startswith(f"{HOST}/team/app:v1@{DIGEST} ")
    assert notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None) == {"duplicate": 1}


async def test_a_failed_job_or_audit_lets_the_next_push_try_again() -> None:
    _, _, notify = await run_one("failed")
    assert notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None) == {"queued": 1}
    fake, recorded, notify = await run_one("done", audit_fails=True)
    assert fake.started == [] and recorded == []  # not audited: not done
    assert notify.accept(n.parse(envelope(event())), client_addr=None, user_agent=None) == {"queued": 1}


def test_a_body_nested_past_pythons_stack_is_a_bad_request_not_a_500() -> None:
    # (json.loads raises RecursionError, which is no ValueError: the route answered 500 and
    # logged a traceback per request; attack17)
    for body in (b"[" * 100_000, b'{"events": [' + b"[" * 100_000 + b"]}"):
        with pytest.raises(errors.BadRequest):
            n.parse(body)
