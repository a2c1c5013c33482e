"""Rendering helm/shoal with the real helm binary (scripts/ensure-helm), for tests/deploy/."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shoal"
RELEASE = "rel"
NAMESPACE = "shoal"

Doc = dict[str, Any]

# Every optional feature on: NetworkPolicy, ServiceMonitor, PrometheusRule, dashboard, an existing
# keys Secret, several upstreams with logins from values and from existing Secrets, node mode
# (the agents get the node logins), the _default host, an ephemeral cache volume.
FULL: Doc = {
    "image": {"repository": "registry.internal:5000/shoal", "tag": "0.1.0-test", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "pull"}],
    "upstreams": [
        {"name": "registry.example.com", "url": "https://registry.example.com",
         "origin": {"username": "seeder", "password": "seeder-password-in-values"},
         "node": {"username": "nodes", "existingSecret": "node-login", "existingSecretKey": "pw"}},
        {"name": "registry.internal:5000", "url": "http://10.0.0.9:5000",
         "origin": {"username": "seeder2", "existingSecret": "internal-login"},
         "node": {"username": "nodes2", "password": "node-password-in-values"},
         "redirectHosts": ["storage.internal"]},
        {"name": "docker.io", "url": "https://registry-1.docker.io",
         "tokenRealms": ["https://auth.docker.io/token"]},
    ],
    "secrets": {"existingSecret": "shoal-keys"},
    "agent": {
        "auth": {"unauthenticated": "node", "mode": "availability"},
        "containerd": {"defaultHost": True, "dialTimeout": "500ms"},
        "cache": {"type": "ephemeral", "ephemeral": {"storageClassName": "local-path", "size": "80Gi"}},
        "cacheMaxBytes": "70GiB",
        "config": {"swarm": {"stall_timeout": "5s"}, "journal": {"max_disk_bytes": "2GiB"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "podAnnotations": {"example.com/team": "platform"},
    },
    "tracker": {"interval": "60s", "config": {"numwant_default": 30}, "replicas": 3,
                "redis": {"address": "redis.redis.svc.cluster.local:6379", "existingSecret": "shoal-redis",
                          "passwordKey": "redis-password"}},
    "origin": {
        "operators": {"registry": {"upstream": "registry.example.com", "roles": {"alice": ["seed", "audit"]}},
                      "existingSecret": "shoal-operators"},
        "persistence": {"storageClassName": "fast", "size": "500Gi"},
        "config": {"admission_ttl": "30s"},
    },
    "networkPolicy": {
        "enabled": True, "nodeCIDRs": ["10.0.0.0/16", "10.1.0.0/16"],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "dashboard": {"enabled": True},
    },
}


@functools.cache
def helm() -> str:
    """The helm binary, fetched once into .tools/ by scripts/ensure-helm."""
    out = subprocess.run([str(ROOT / "scripts" / "ensure-helm")], capture_output=True, text=True, check=True,
                         timeout=600)
    return out.stdout.strip().splitlines()[-1]


def run_helm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, env=env)


def template(values: Doc | None, tmp: Path, *extra: str, env: dict[str, str] | None = None) -> list[Doc]:
    """The rendered objects (`helm template`), failing the test on a helm error."""
    out = template_raw(values, tmp, *extra, env=env)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def template_raw(values: Doc | None, tmp: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
    if values is not None:
        path = tmp / f"values-{len(list(tmp.glob('values-*')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    return run_helm(*args, env=env)


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def name(part: str) -> str:
    return f"{RELEASE}-shoal-{part}"


def config(docs: list[Doc], part: str) -> Doc:
    """A component's configuration, from its ConfigMap."""
    doc = yaml.safe_load(find(docs, "ConfigMap", name(part))["data"][f"{part}.yaml"])
    assert isinstance(doc, dict)
    return doc


def rule_groups(docs: list[Doc]) -> Doc:
    spec = find(docs, "PrometheusRule")["spec"]
    assert isinstance(spec, dict)
    return spec


def dashboard(docs: list[Doc]) -> Doc:
    doc = json.loads(find(docs, "ConfigMap", name("dashboard"))["data"]["shoal.json"])
    assert isinstance(doc, dict)
    return doc


_METRIC = re.compile(r"\bshoal_[a-z0-9_]+")


def metric_names(docs: list[Doc]) -> set[str]:
    """Every shoal metric name the rendered alert rules and dashboard use."""
    exprs = [r["expr"] for g in rule_groups(docs)["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in dashboard(docs)["panels"] for t in p["targets"]]
    return {m for e in exprs for m in _METRIC.findall(e)}
