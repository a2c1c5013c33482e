"""helm/shoal, rendered by the real helm: lint, Kubernetes schemas of two versions for every object
(default and every optional feature on), the components' configurations through their real
loaders, the generated keys through shoal's real key loaders, `lookup` keeping them (helm's own
client against tests/deploy/fakeapi.py), the values schema, and the alert rules through promtool."""

from __future__ import annotations

import base64
import copy
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shoal import protocol, signing
from shoal.config import LogSettings, SecretSource, read_token, set_dotted
from shoal.errors import ConfigError
from shoal_agent import config as agent_config
from shoal_origin import config as origin_config
from shoal_tracker import config as tracker_config
from tests.deploy.chart import (
    CHART,
    FULL,
    NAMESPACE,
    Doc,
    config,
    find,
    helm,
    name,
    rule_groups,
    run_helm,
    template,
    template_raw,
)
from tests.deploy.fakeapi import FakeAPI

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest whose schemas
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
VALUE_SETS = {"default": None, "full": FULL}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    tmp = tmp_path_factory.mktemp("helm")
    return {label: template(values, tmp) for label, values in VALUE_SETS.items()}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_passes(values: Doc | None, tmp_path: Path) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        args += ["--values", str(tmp_path / "values.yaml")]
    out = run_helm(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_every_feature_renders(rendered: dict[str, list[Doc]]) -> None:
    kinds = sorted(d["kind"] for d in rendered["full"])
    assert kinds == sorted(["ConfigMap"] * 5 + ["Secret", "DaemonSet", "Deployment", "StatefulSet", "Service",
                                                  "Service", "Service", "NetworkPolicy", "NetworkPolicy",
                                                  "ServiceMonitor", "ServiceMonitor", "ServiceMonitor",
                                                  "PrometheusRule"])
    # with existingSecret no keys Secret is rendered: only the one for passwords given in values
    assert [d["metadata"]["name"] for d in rendered["full"] if d["kind"] == "Secret"] == [name("upstreams")]
    default_kinds = {d["kind"] for d in rendered["default"]}
    assert not default_kinds & (CRD_KINDS | {"NetworkPolicy"})


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("label", VALUE_SETS.keys())
def test_every_object_validates_against_kubernetes_schemas(rendered: dict[str, list[Doc]], label: str,
                                                           version: str) -> None:
    checked = 0
    for doc in rendered[label]:
        if doc["kind"] in CRD_KINDS:
            continue  # not in Kubernetes' schemas: test_monitoring_objects_have_the_crd_structure
        # strict: an unknown field (a typo, a field of a newer version) fails too
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 10


def test_monitoring_objects_have_the_crd_structure(rendered: dict[str, list[Doc]]) -> None:
    """The prometheus-operator CRDs' schemas are not available offline here (no package on PyPI
    or Debian ships them): the fields the operator requires and the ones the chart sets, by hand.
    (Checked once by hand against prometheus-operator 0.93.0's CRD schemas, with unknown fields
    refused: all four objects valid.)"""
    docs = rendered["full"]
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert sm["metadata"]["labels"]["release"] == "prom"
        (endpoint,) = sm["spec"]["endpoints"]
        assert set(endpoint) <= {"port", "path", "interval", "relabelings"}
        # the named port exists on the Service the ServiceMonitor selects
        selected = [s for s in docs if s["kind"] == "Service"
                    and sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(selected) == 1, sm["metadata"]["name"]
        assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    rule = find(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert isinstance(r["expr"], str) and r["alert"]
            assert all(isinstance(v, str) for v in {**r.get("labels", {}), **r.get("annotations", {})}.values())


def _mounted_files(docs: list[Doc], workload: str, container: str) -> dict[str, str]:
    """Every file a container sees from a ConfigMap, Secret or projected volume: path -> source."""
    pod = find(docs, workload)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (spec,) = [c for c in pod["containers"] if c["name"] == container]
    files = {}
    for mount in spec["volumeMounts"]:
        volume = volumes.get(mount["name"], {})  # none: the StatefulSet's volumeClaimTemplate
        sources: list[tuple[str, dict[str, Any]]] = []
        if "secret" in volume:
            sources.append((f"secret {volume['secret']['secretName']}", volume["secret"]))
        if "configMap" in volume:
            sources.append((f"configmap {volume['configMap']['name']}", volume["configMap"]))
        for source in volume.get("projected", {}).get("sources", []):
            sources.append((f"secret {source['secret']['name']}", source["secret"]))
        for label, source in sources:
            for item in source.get("items", []):
                files[f"{mount['mountPath']}/{item['path']}"] = f"{label} key {item['key']}"
    return files


def _secret_files(doc: Any) -> list[str]:
    """The file paths in a configuration: keys named *_key and every {file: ...}."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, str) and key in ("file", "signing_key", "origin_public_key"):
                found.append(value)
            else:
                found += _secret_files(value)
    elif isinstance(doc, list):
        for value in doc:
            found += _secret_files(value)
    return found


LOADERS: dict[str, Callable[[Doc], agent_config.AgentConfig | tracker_config.TrackerConfig
                             | origin_config.OriginConfig]] = {
    "agent": agent_config.load, "tracker": tracker_config.load, "origin": origin_config.load}
WORKLOADS = {"agent": "DaemonSet", "tracker": "Deployment", "origin": "StatefulSet"}


@pytest.mark.parametrize("label", VALUE_SETS.keys())
@pytest.mark.parametrize("part", LOADERS.keys())
def test_configurations_load_with_the_components_loaders(rendered: dict[str, list[Doc]], label: str,
                                                         part: str) -> None:
    docs = rendered[label]
    doc = config(docs, part)
    workload = find(docs, WORKLOADS[part])
    args = workload["spec"]["template"]["spec"]["containers"][0]
    command = [*args.get("command", []), *args.get("args", [])]
    # the pod's flags, with what the downward API would put in their place: an IPv4 node's
    # address and an IPv6 one's (issue 15) both give a valid torrent.listen
    for address in ("fd00:10::7", "10.0.3.7"):
        for flag, key in (("--node", "node"), ("--torrent-listen", "torrent.listen"), ("--zone", "zone")):
            if flag in command:
                value = command[command.index(flag) + 1]
                for var, instead in (("$(NODE_NAME)", "worker-7.example"), ("$(HOST_IP)", address),
                                     ("$(POD_IP)", address), ("$(SHOAL_ZONE)", "eu-west-1a")):
                    value = value.replace(var, instead)
                set_dotted(doc, key, value)
        loaded = LOADERS[part](doc)
        if "--torrent-listen" in command:
            assert not isinstance(loaded, tracker_config.TrackerConfig)
            assert loaded.torrent.listen == f"[{address}]:6881", loaded.torrent.listen
    if isinstance(loaded, agent_config.AgentConfig):
        assert loaded.containerd.config_path == "/etc/containerd/certs.d"
    assert loaded.log == LogSettings(level="info", format="json")
    # every secret file the configuration names is mounted in the container, from a Secret
    mounted = _mounted_files(docs, WORKLOADS[part], part)
    for path in _secret_files(doc):
        assert path in mounted, (path, sorted(mounted))
        assert mounted[path].startswith("secret "), (path, mounted[path])


def test_configurations_follow_the_values(rendered: dict[str, list[Doc]]) -> None:
    full = rendered["full"]
    agent = config(full, "agent")
    origin = config(full, "origin")
    assert agent["listen"] == "127.0.0.1:5050"
    assert agent["origin"] == f"http://{name('origin')}.{NAMESPACE}.svc.cluster.local:6970"
    assert origin["tracker"] == f"http://{name('tracker')}.{NAMESPACE}.svc.cluster.local:6969"
    # tracker replicas behind the one Service, sharing their swarms in the operator's Redis
    tracker = config(full, "tracker")
    assert tracker["redis"] == {"address": "redis.redis.svc.cluster.local:6379", "db": 0, "prefix": "shoal:",
                                "password": {"file": "/etc/shoal/redis/password"}}
    assert "data_dir" not in tracker
    deployment = find(full, "Deployment")
    assert deployment["spec"]["replicas"] == 3 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert find(rendered["default"], "Deployment")["spec"]["replicas"] == 1
    assert "redis" not in config(rendered["default"], "tracker")
    # each agent states its node's zone, from the label Kubernetes copies onto its pod
    agent_container = find(full, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent_container["args"][-2:] == ["--zone", "$(SHOAL_ZONE)"]
    zone_env = next(e for e in agent_container["env"] if e["name"] == "SHOAL_ZONE")
    assert zone_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['topology.kubernetes.io/zone']"
    assert agent["containerd"] == {"config_path": "/etc/containerd/certs.d", "mirror": "http://127.0.0.1:5050",
                                   "default_host": True, "dial_timeout": "500ms"}
    assert agent["swarm"] == {"stall_timeout": "5s"}  # agent.config merged in
    assert [u["name"] for u in agent["upstreams"]] == ["registry.example.com", "registry.internal:5000", "docker.io"]
    # node mode: the agents get the node logins; the origin its own
    assert [u.get("username") for u in agent["upstreams"]] == ["nodes", "nodes2", None]
    assert [u.get("username") for u in origin["upstreams"]] == ["seeder", "seeder2", None]
    assert origin["upstreams"][2]["token_realms"] == ["https://auth.docker.io/token"]
    assert origin["operators"]["registry"] == {"upstream": "registry.example.com",
                                               "roles": {"alice": ["seed", "audit"]}}
    # challenge mode (default): the agents hold no registry password at all
    default_agent = config(rendered["default"], "agent")
    assert all(set(u) == {"name", "url"} for u in default_agent["upstreams"])
    default_pod = find(rendered["default"], "DaemonSet")["spec"]["template"]["spec"]
    assert "passwords" not in {v["name"] for v in default_pod["volumes"]}


def test_passwords_are_only_in_secrets(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["full"]
    secret = find(docs, "Secret", name("upstreams"))
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "origin-0": "seeder-password-in-values", "node-1": "node-password-in-values"}
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert "password-in-values" not in text, doc["metadata"]["name"]
    origin_files = _mounted_files(docs, "StatefulSet", "origin")
    assert origin_files["/etc/shoal/upstreams/origin-0.password"] == f"secret {name('upstreams')} key origin-0"
    assert origin_files["/etc/shoal/upstreams/origin-1.password"] == "secret internal-login key password"
    agent_files = _mounted_files(docs, "DaemonSet", "agent")
    assert agent_files["/etc/shoal/upstreams/node-0.password"] == "secret node-login key pw"
    assert agent_files["/etc/shoal/upstreams/node-1.password"] == f"secret {name('upstreams')} key node-1"


def test_the_origin_signing_key_is_mounted_only_in_the_origin(rendered: dict[str, list[Doc]]) -> None:
    for label in VALUE_SETS:
        docs = rendered[label]
        keys = "shoal-keys" if label == "full" else name("keys")
        for workload, container in (("DaemonSet", "agent"), ("Deployment", "tracker"), ("StatefulSet", "origin")):
            files = _mounted_files(docs, workload, container)
            signing_key = any(v == f"secret {keys} key origin-signing.pem" for v in files.values())
            assert signing_key == (workload == "StatefulSet"), (label, workload)


def test_agent_pod_runs_as_the_brief_says(rendered: dict[str, list[Doc]]) -> None:
    for label, docs in rendered.items():
        ds = find(docs, "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True
        assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert pod["priorityClassName"] == "system-node-critical"
        assert {"operator": "Exists"} in pod["tolerations"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["automountServiceAccountToken"] is False
        # never many nodes at once
        assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
        (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
        assert agent["command"] == ["shoal-agent"]
        assert agent["args"][agent["args"].index("--node") + 1] == "$(NODE_NAME)"
        assert agent["args"][agent["args"].index("--torrent-listen") + 1] == "[$(HOST_IP)]:6881"
        for probe, path in (("livenessProbe", protocol.HEALTHZ.path()), ("readinessProbe", protocol.READYZ.path()),
                            ("startupProbe", protocol.HEALTHZ.path())):
            assert agent[probe]["httpGet"] == {"host": "127.0.0.1", "port": 5050, "path": path}
            assert 1 <= agent[probe]["timeoutSeconds"] <= 2
        assert agent["livenessProbe"]["periodSeconds"] * agent["livenessProbe"]["failureThreshold"] <= 15
        assert "cpu" not in agent["resources"]["limits"] and agent["resources"]["limits"]["memory"]
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert sc["runAsNonRoot"] is True
        # the one root step: CHOWN only, for the host directories the agent writes
        for init in pod.get("initContainers", []):
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
            assert init["securityContext"]["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["certs-d"]["hostPath"] == {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
        if label == "default":
            assert volumes["cache"]["hostPath"] == {"path": "/var/lib/shoal/agent", "type": "DirectoryOrCreate"}
            (init,) = pod["initContainers"]
            assert init["args"] == ["/host/certs.d/registry.example.com", "/host/cache"]
        else:
            assert volumes["cache"]["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "local-path"
            (init,) = pod["initContainers"]
            assert init["args"] == ["/host/certs.d/registry.example.com", "/host/certs.d/registry.internal:5000",
                                    "/host/certs.d/docker.io", "/host/certs.d/_default"]


def test_agents_can_be_held_back_during_an_upgrade(tmp_path: Path) -> None:
    """README's two-step upgrade: OnDelete first (the origin and the tracker roll alone)."""
    (ds,) = template(None, tmp_path, "--show-only", "templates/agent-daemonset.yaml",
                     "--set", "agent.updateStrategy.type=OnDelete")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(ds, version, strict=True)


def test_agent_daemonset_renders_alone(tmp_path: Path) -> None:
    """The rendered agent pod is what `podman kube play` runs (the lead's check)."""
    docs = template(None, tmp_path, "--show-only", "templates/agent-daemonset.yaml",
                    "--set", "agent.cache.hostPath=/srv/shoal-cache",
                    "--set", "agent.containerd.configPath=/srv/certs.d")
    (ds,) = docs
    assert ds["kind"] == "DaemonSet"
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["hostPath"]["path"] == "/srv/shoal-cache"
    assert volumes["certs-d"]["hostPath"]["path"] == "/srv/certs.d"
    (agent,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    assert {"name": "certs-d", "mountPath": "/srv/certs.d"} in agent["volumeMounts"]


def test_generated_keys_load_with_shoals_loaders(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    secret = find(rendered["default"], "Secret", name("keys"))
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for key, value in secret["data"].items():
        (tmp_path / key).write_bytes(base64.b64decode(value))
    private = signing.load_private_key(str(tmp_path / "origin-signing.pem"), "signing_key")
    public = signing.load_public_key(str(tmp_path / "origin-public.pem"), "origin_public_key")
    # the template's public key is the private key's (derived there from a certificate's DER)
    derived = signing.public_pem((tmp_path / "origin-signing.pem").read_bytes())
    assert (tmp_path / "origin-public.pem").read_bytes() == derived
    token = signing.issue_token(private, "node-a", 600, signing.EVERY_BLOB)
    assert signing.verify_token(public, token).node == "node-a"
    for name_ in ("node.token", "registration.token"):
        assert len(read_token(SecretSource(file=str(tmp_path / name_)), name_)) >= 40


def test_public_key_derivation_rejects_a_non_ed25519_key(tmp_path: Path) -> None:
    """The derivation looks for Ed25519's key header in the certificate: another key type fails
    at render time with a message, never a wrong public key."""
    probe = tmp_path / "probe"
    shutil.copytree(CHART, probe)
    (probe / "templates" / "probe.yaml").write_text(
        '{{- $k := include "shoal.publicKey" (genPrivateKey "ecdsa") }}\n')
    out = run_helm("template", "x", str(probe))
    assert out.returncode != 0
    assert "not an Ed25519 key" in out.stderr


def test_lookup_keeps_the_keys_across_upgrades(tmp_path: Path) -> None:
    """helm's real `lookup` (template --dry-run=server) against tests/deploy/fakeapi.py: the first
    render generates keys; with that Secret in the cluster the next renders return it unchanged,
    and a Secret missing its tokens gets new tokens but keeps its key (and the public key derived
    from it)."""
    env = {**os.environ, "HOME": str(tmp_path)}
    server = ["--dry-run=server", "--disable-openapi-validation", "--show-only", "templates/secret.yaml"]
    with FakeAPI() as api:
        env["KUBECONFIG"] = str(api.kubeconfig(tmp_path, NAMESPACE))
        (first,) = template(None, tmp_path, *server, env=env)
        assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{name('keys')}" in api.requests
        (fresh,) = template(None, tmp_path, *server, env=env)
        assert fresh["data"]["origin-signing.pem"] != first["data"]["origin-signing.pem"]  # nothing stored yet
        # as helm install leaves it: owned by the release
        first["metadata"]["annotations"].update({"meta.helm.sh/release-name": "rel",
                                                 "meta.helm.sh/release-namespace": NAMESPACE})
        api.store_secret(NAMESPACE, first)
        for _ in range(2):
            (again,) = template(None, tmp_path, *server, env=env)
            assert again["data"] == first["data"]
        partial = copy.deepcopy(first)
        del partial["data"]["node.token"], partial["data"]["origin-public.pem"]
        api.store_secret(NAMESPACE, partial)
        (mended,) = template(None, tmp_path, *server, env=env)
        for key in ("origin-signing.pem", "origin-public.pem", "registration.token"):
            assert mended["data"][key] == first["data"][key], key
        assert mended["data"]["node.token"] != first["data"]["node.token"]


@pytest.mark.parametrize(("values", "named"), [
    ({"bogus": 1}, "'bogus'"),
    ({"agent": {"mirrorPort": "abc"}}, "/agent/mirrorPort"),
    ({"agent": {"cacheMaxBytes": 53687091200}}, "/agent/cacheMaxBytes"),  # a float once YAML-parsed
    ({"agent": {"cache": {"type": "nfs"}}}, "/agent/cache/type"),
    ({"agent": {"auth": {"unauthenticated": "anyone"}}}, "/agent/auth/unauthenticated"),
    ({"agent": {"extra": True}}, "'extra'"),
    ({"upstreams": [{"name": "https://registry.example.com", "url": "https://registry.example.com"}]},
     "/upstreams/0/name"),
    ({"upstreams": []}, "/upstreams"),
    ({"metrics": {"prometheusRule": {"enabled": "yes"}}}, "/".join(("", "metrics", "prometheusRule", "enabled"))),
])
def test_values_schema_rejects_bad_values_naming_the_key(values: Doc, named: str, tmp_path: Path) -> None:
    out = template_raw(values, tmp_path)
    assert out.returncode != 0
    assert "schema" in out.stderr and named in out.stderr, out.stderr


@pytest.mark.parametrize(("values", "message"), [
    ({"networkPolicy": {"enabled": True}}, "networkPolicy.nodeCIDRs"),
    ({"tracker": {"replicas": 2}}, "tracker.replicas: more than one tracker needs tracker.redis.address"),
    ({"upstreams": [{"name": "r.example", "url": "https://r.example", "origin": {"username": "u"}}]},
     "upstreams[0].origin: username \"u\" needs password or existingSecret"),
])
def test_incomplete_values_fail_with_the_key(values: Doc, message: str, tmp_path: Path) -> None:
    out = template_raw(values, tmp_path)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_alert_rules_pass_promtool(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    groups = rule_groups(rendered["full"])
    rules.write_text(yaml.safe_dump(groups))
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    count = sum(len(g["rules"]) for g in groups["groups"])
    assert f"SUCCESS: {count} rules found" in out.stdout
    alerts = {r["alert"] for g in groups["groups"] for r in g["rules"]}
    assert {"ShoalSwarmFallbackRatioHigh", "ShoalIntegrityFailure", "ShoalJournalShippingStalled",
            "ShoalSwarmCredentialExpiring", "ShoalCacheFull"} <= alerts


def test_fallback_alert_fires_in_promtools_rule_tests(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    """promtool's rule unit tests: 1 fallback in 10 downloads a minute fires the 5 % alert after
    its 10 minutes, not before. Swarm grants expiring at 2h fire theirs once less than an hour
    is left (and 5 minutes have passed), not at 30 minutes."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(rendered["full"])))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m",
         "input_series": [
             {"series": 'shoal_agent_fallbacks_total{pod="a",reason="stalled"}', "values": "0+1x40"},
             {"series": 'shoal_agent_downloads_total{pod="a",source="registry",result="ok"}', "values": "0+10x40"},
             {"series": 'shoal_agent_fallbacks_total{pod="b",reason="stalled"}', "values": "0+0x40"},
             {"series": 'shoal_agent_swarm_token_expiry_timestamp_seconds{pod="a"}', "values": "7200x80"},
         ],
         "alert_rule_test": [
             {"eval_time": "25m", "alertname": "ShoalSwarmFallbackRatioHigh",
              "exp_alerts": [{"exp_labels": {"severity": "warning"}, "exp_annotations": {
                  "summary": "More than 5% of blob downloads fell back to the registry",
                  "description": "Fallbacks by reason: sum by (reason) (rate(shoal_agent_fallbacks_total[10m])). "
                                 "The registry carries the load the swarm should."}}]},
             {"eval_time": "5m", "alertname": "ShoalSwarmFallbackRatioHigh", "exp_alerts": []},
             {"eval_time": "70m", "alertname": "ShoalSwarmCredentialExpiring",
              "exp_alerts": [{"exp_labels": {"severity": "warning", "pod": "a"}, "exp_annotations": {
                  "summary": "Swarm grants of agent a expire in less than 3600s",
                  "description": "The origin did not renew them (unreachable, or the node is banned); at expiry "
                                 "the node leaves every swarm and pulls from the registry."}}]},
             {"eval_time": "30m", "alertname": "ShoalSwarmCredentialExpiring", "exp_alerts": []},
         ]},
    ]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(["promtool", "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_notes_say_how_to_check_the_install(tmp_path: Path) -> None:
    out = run_helm("install", "rel", str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "--set", "agent.containerd.defaultHost=true")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    for expected in ("kubectl -n shoal rollout status daemonset/rel-shoal-agent",
                     "kubectl -n shoal rollout status statefulset/rel-shoal-origin",
                     "curl -s http://127.0.0.1:5050/readyz",
                     "cat /etc/containerd/certs.d/registry.example.com/hosts.toml",
                     "cat /etc/containerd/certs.d/_default/hosts.toml",
                     "crictl pull --creds USER:PASSWORD registry.example.com/",
                     "upstreams still names the example registry"):
        assert expected in notes, expected


def test_helm_binary_is_the_pinned_one() -> None:
    out = subprocess.run([helm(), "version", "--short"], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.startswith("v4.1.4"), out.stdout


def test_config_error_names_the_key_for_a_bad_override(rendered: dict[str, list[Doc]]) -> None:
    """The loaders are strict: a key the chart renders wrongly would be caught by the load tests
    above (this guards that they really reject)."""
    doc = config(rendered["default"], "tracker")
    doc["not_a_key"] = 1
    with pytest.raises(ConfigError, match="not_a_key: unknown key"):
        tracker_config.load(doc)


@pytest.mark.parametrize("values", [
    {"agent": {"containerd": {"enabled": False}}},
    {"agent": {"metrics": {"enabled": False}}, "metrics": {"serviceMonitor": {"enabled": True}}},
    {"agent": {"containerd": {"enabled": False}, "cache": {"type": "ephemeral"}}},
    {"agent": {"zoneLabel": ""}},
], ids=["no-containerd", "no-agent-metrics", "no-host-dirs", "no-zone"])
def test_optional_agent_parts_switch_off_cleanly(values: Doc, tmp_path: Path) -> None:
    docs = template(values, tmp_path)
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
    pod = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    agent = config(docs, "agent")
    if not values["agent"].get("containerd", {}).get("enabled", True):
        assert "certs-d" not in volumes and "containerd" not in agent
    if values["agent"].get("cache", {}).get("type") == "ephemeral":
        assert "initContainers" not in pod  # no host directory to prepare: no root step at all
    if values["agent"].get("zoneLabel") == "":
        assert "--zone" not in pod["containers"][0]["args"]
        assert "SHOAL_ZONE" not in {e["name"] for e in pod["containers"][0]["env"]}
    if values["agent"].get("metrics", {}).get("enabled") is False:
        assert [c["name"] for c in pod["containers"]] == ["agent"]
        assert {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceMonitor"} == {name("tracker"),
                                                                                          name("origin")}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root (CI runs as root)")
def test_init_step_prepares_the_host_directories(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    """The rendered init container's own program, on directories like the node's: containerd's
    certs.d exists (root's, with another registry's directory in it), the registry's directory
    and the cache do not yet."""
    (init,) = find(rendered["default"], "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:2] == ["python3", "-c"]
    certs = tmp_path / "certs.d"
    (certs / "other.example").mkdir(parents=True)
    dirs = [certs / "registry.example.com", tmp_path / "var" / "lib" / "shoal" / "agent"]
    subprocess.run([shutil.which("python3") or "python3", "-c", init["command"][2], *map(str, dirs)], check=True,
                   timeout=60)
    for d in dirs:
        assert (d.stat().st_uid, d.stat().st_gid, d.stat().st_mode & 0o7777) == (65532, 65532, 0o755), d
    assert certs.stat().st_uid == 0 and (certs / "other.example").stat().st_uid == 0  # nothing else changes
    # a second start finds them in place
    subprocess.run([shutil.which("python3") or "python3", "-c", init["command"][2], *map(str, dirs)], check=True,
                   timeout=60)


@pytest.mark.parametrize("part", sorted(WORKLOADS))
def test_temporary_files_go_to_a_writable_volume(rendered: dict[str, list[Doc]], part: str) -> None:
    """The image points TMPDIR at /var/lib/shoal, which the chart does not mount (each part's data
    is below it): with a read-only root, SQLite's spill files need TMPDIR on a volume."""
    spec = find(rendered["default"], WORKLOADS[part])["spec"]["template"]["spec"]
    container = spec["containers"][0]
    tmpdir = {e["name"]: e.get("value") for e in container["env"]}["TMPDIR"]
    volume = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[tmpdir]
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[volume]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("bad", [".", "..", "..:5000"])
def test_an_upstream_name_that_is_no_directory_is_refused(bad: str, tmp_path: Path) -> None:
    """The init step would otherwise give containerd's certs.d (or its parent) to the agent."""
    out = template_raw({"upstreams": [{"name": bad, "url": "https://registry.example.com"}]}, tmp_path)
    assert out.returncode != 0
    assert "upstreams[0].name" in out.stderr and "cannot name a directory" in out.stderr
