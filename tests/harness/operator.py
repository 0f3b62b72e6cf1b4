"""Monitoring on the real cluster as users run it: the Prometheus Operator, its CRDs and a
Prometheus and an Alertmanager object it reconciles into StatefulSets; and, beside it, a
plain Prometheus and Alertmanager (Deployments) configured by hand from the shipped scrape
configs and rules. Every image is one scripts/build-test-images made from the binaries of
scripts/install-monitoring-tools; nothing is pulled.

The Operator's own manifests (its RBAC, Deployment, and the Prometheus ServiceAccount and
ClusterRole) are upstream's examples of the same release, with only the namespace and the
image names changed.
"""

from __future__ import annotations

import base64
import gzip
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import yaml

from .components import OPERATOR_CRDS, OPERATOR_EXAMPLES
from .node import MONITORING_IMAGES
from .realcluster import RealCluster

NAMESPACE = "monitoring"
# The plain stack's own namespace: the Operator's `alertmanager-operated` Service selects
# every pod labelled app.kubernetes.io/name=alertmanager in its namespace, so a plain
# Alertmanager beside it would receive the Operator's Prometheus' alerts too.
PLAIN_NAMESPACE = "monitoring-plain"
PROMETHEUS_VERSION, ALERTMANAGER_VERSION, OPERATOR_VERSION = "v3.16.0", "v0.35.0", "v0.85.0"
PROMETHEUS_IMAGE = MONITORING_IMAGES["prometheus.tar"]
ALERTMANAGER_IMAGE = MONITORING_IMAGES["alertmanager.tar"]
OPERATOR_IMAGE = MONITORING_IMAGES["prometheus-operator.tar"]
RELOADER_IMAGE = MONITORING_IMAGES["prometheus-config-reloader.tar"]
# Names the Operator gives what it makes of the objects below.
PROMETHEUS_SET, ALERTMANAGER_SET = "prometheus-k8s", "alertmanager-main"
PLAIN_PROMETHEUS, PLAIN_ALERTMANAGER = "prometheus-plain", "alertmanager-plain"


def _upstream(*parts: str) -> list[dict[str, Any]]:
    path = OPERATOR_EXAMPLES.joinpath(*parts)
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def operator_objects() -> list[dict[str, Any]]:
    """Upstream's example RBAC and Deployment of the Operator, in `monitoring`, with the
    images made here (the Operator's and, by its flag, the config reloader's)."""
    docs: list[dict[str, Any]] = []
    for name in ("service-account", "cluster-role", "cluster-role-binding", "deployment"):
        docs += _upstream("prometheus-operator", f"prometheus-operator-{name}.yaml")
    docs += [d for name in ("service-account", "cluster-role", "cluster-role-binding")
             for d in _upstream("prometheus", f"prometheus-{name}.yaml")]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            doc["metadata"]["namespace"] = NAMESPACE
        for subject in doc.get("subjects", []):
            subject["namespace"] = NAMESPACE
        if doc["kind"] == "Deployment":
            [container] = doc["spec"]["template"]["spec"]["containers"]
            container["image"] = OPERATOR_IMAGE
            container["args"] = [f"--prometheus-config-reloader={RELOADER_IMAGE}"
                                 if a.startswith("--prometheus-config-reloader=") else a
                                 for a in container["args"]]
    return docs


def reconciled_objects() -> list[dict[str, Any]]:
    """A Prometheus and an Alertmanager as an operator of a cluster writes them: every
    ServiceMonitor, PodMonitor, PrometheusRule and AlertmanagerConfig of every namespace
    selected; ServiceMonitors discovered through EndpointSlices, as the shipped
    ServiceMonitor's comment asks."""
    every: dict[str, Any] = {}
    prometheus = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
        "metadata": {"name": "k8s", "namespace": NAMESPACE},
        "spec": {
            "image": PROMETHEUS_IMAGE, "version": PROMETHEUS_VERSION, "replicas": 1,
            "serviceAccountName": "prometheus", "serviceDiscoveryRole": "EndpointSlice",
            "scrapeInterval": "15s", "evaluationInterval": "15s",
            "serviceMonitorSelector": every, "serviceMonitorNamespaceSelector": every,
            "podMonitorSelector": every, "podMonitorNamespaceSelector": every,
            "ruleSelector": every, "ruleNamespaceSelector": every,
            "alerting": {"alertmanagers": [{"namespace": NAMESPACE, "name": "alertmanager-operated",
                                            "port": "web"}]},
            "resources": {"requests": {"memory": "100Mi"}},
        },
    }
    alertmanager = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "Alertmanager",
        "metadata": {"name": "main", "namespace": NAMESPACE},
        "spec": {
            "image": ALERTMANAGER_IMAGE, "version": ALERTMANAGER_VERSION, "replicas": 1,
            "alertmanagerConfigSelector": every, "alertmanagerConfigNamespaceSelector": every,
        },
    }
    return [prometheus, alertmanager]


def plain_objects(scrape_configs: list[dict[str, Any]], rules: str,
                  alertmanager_config: dict[str, Any], token: str) -> list[dict[str, Any]]:
    """Prometheus and Alertmanager without the Operator: one Deployment each, configured
    from ConfigMaps holding the shipped scrape configs and rule file, the webhook's token
    in a Secret; Prometheus' ServiceAccount bound to the same ClusterRole as the
    Operator's Prometheus."""
    labels = {"app.kubernetes.io/name": "prometheus", "app.kubernetes.io/instance": "plain"}
    am_labels = {"app.kubernetes.io/name": "alertmanager", "app.kubernetes.io/instance": "plain"}
    meta = {"namespace": PLAIN_NAMESPACE}
    prometheus_config = {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["/etc/prometheus/rules/*.yaml"],
        "alerting": {"alertmanagers": [{"static_configs": [
            {"targets": [f"{PLAIN_ALERTMANAGER}.{PLAIN_NAMESPACE}:9093"]}]}]},
        "scrape_configs": scrape_configs,
    }
    secure = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities": {"drop": ["ALL"]}}

    def deployment(name: str, pod_labels: dict[str, str], container: dict[str, Any],
                   volumes: list[dict[str, Any]], account: str | None = None
                   ) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                "fsGroup": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{**container, "securityContext": secure}], "volumes": volumes}
        if account:
            spec["serviceAccountName"] = account
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, **meta},
                "spec": {"replicas": 1, "selector": {"matchLabels": pod_labels},
                         "template": {"metadata": {"labels": pod_labels}, "spec": spec}}}

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": PLAIN_PROMETHEUS, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": PLAIN_PROMETHEUS},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "prometheus"},
         "subjects": [{"kind": "ServiceAccount", "name": PLAIN_PROMETHEUS,
                       "namespace": PLAIN_NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": PLAIN_PROMETHEUS, **meta},
         "data": {"prometheus.yml": yaml.safe_dump(prometheus_config)}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": f"{PLAIN_PROMETHEUS}-rules", **meta},
         "data": {"coredns-health-exporter.rules.yaml": rules}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": PLAIN_ALERTMANAGER, **meta},
         "stringData": {"alertmanager.yml": yaml.safe_dump(alertmanager_config),
                        "token": token}},
        deployment(PLAIN_PROMETHEUS, labels, {
            "name": "prometheus", "image": PROMETHEUS_IMAGE,
            "args": ["--config.file=/etc/prometheus/config/prometheus.yml",
                     "--storage.tsdb.path=/prometheus"],
            "ports": [{"name": "web", "containerPort": 9090}],
            "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "web"},
                               "periodSeconds": 2},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/prometheus/config"},
                {"name": "rules", "mountPath": "/etc/prometheus/rules"},
                {"name": "data", "mountPath": "/prometheus"}]},
            [{"name": "config", "configMap": {"name": PLAIN_PROMETHEUS}},
             {"name": "rules", "configMap": {"name": f"{PLAIN_PROMETHEUS}-rules"}},
             {"name": "data", "emptyDir": {}}], account=PLAIN_PROMETHEUS),
        deployment(PLAIN_ALERTMANAGER, am_labels, {
            "name": "alertmanager", "image": ALERTMANAGER_IMAGE,
            "args": ["--config.file=/etc/alertmanager/alertmanager.yml",
                     "--storage.path=/alertmanager", "--cluster.listen-address="],
            "ports": [{"name": "web", "containerPort": 9093}],
            "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "web"},
                               "periodSeconds": 2},
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/alertmanager"},
                {"name": "data", "mountPath": "/alertmanager"}]},
            [{"name": "config", "secret": {"secretName": PLAIN_ALERTMANAGER}},
             {"name": "data", "emptyDir": {}}]),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": PLAIN_ALERTMANAGER, **meta},
         "spec": {"selector": am_labels, "ports": [{"name": "web", "port": 9093}]}},
    ]


def apply(real: RealCluster, docs: list[dict[str, Any]]) -> None:
    real.kubectl("apply", "-f", "-", stdin="\n---\n".join(json.dumps(d) for d in docs))


def install_crds(real: RealCluster) -> None:
    """The Operator's CRDs of its release, server-side (the largest are over the size a
    client-side apply can annotate), then waited for until the API serves them."""
    real.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(OPERATOR_CRDS),
                 timeout=180)
    real.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 *[f"crd/{p.name.removeprefix('monitoring.coreos.com_').removesuffix('.yaml')}"
                   ".monitoring.coreos.com" for p in sorted(OPERATOR_CRDS.glob("*.yaml"))],
                 timeout=70)


def rollout(real: RealCluster, *workloads: str, timeout: int = 240,
            namespace: str = NAMESPACE) -> None:
    for workload in workloads:
        real.kubectl("-n", namespace, "rollout", "status", workload, f"--timeout={timeout}s",
                     timeout=timeout + 10)


def await_statefulset(real: RealCluster, name: str, timeout: float = 180) -> None:
    """The Operator makes the StatefulSet some time after its object: wait for it to
    exist (a watch), then for its rollout."""
    real.kubectl("-n", NAMESPACE, "wait", "--for=create", f"statefulset/{name}",
                 f"--timeout={int(timeout)}s", timeout=timeout + 10)
    rollout(real, f"statefulset/{name}", timeout=int(timeout))


def generated_config(real: RealCluster, secret: str, key: str) -> str:
    """What the Operator wrote for Prometheus or Alertmanager to run (gzipped or not)."""
    answer = real.cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret}")
    assert answer is not None, secret
    raw = base64.b64decode(answer["data"][key])
    return (gzip.decompress(raw) if key.endswith(".gz") else raw).decode()


def pod_ip(real: RealCluster, selector: str, namespace: str = NAMESPACE) -> str:
    [pod] = [p for p in real.pods(namespace, urllib.parse.quote(selector, safe=","))
             if not p["metadata"].get("deletionTimestamp")]
    ip: str = pod["status"]["podIP"]
    return ip


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML or JSON document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)

