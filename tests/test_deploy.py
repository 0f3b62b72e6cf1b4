"""deploy/: every manifest renders with kubectl kustomize, parses into the kubernetes client's
models without losing a field, is hardened as promised, and is applied to the real test
cluster; the plain Prometheus scrape config, run by a real Prometheus against the test
cluster's service discovery, keeps the exporter's `pod` label."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from alerts.generate import Config, render_prometheus_rule
from exporter.kube import ApiException
from exporter.kube import Client as RawClient
from tests.harness.cluster import KUBE_BIN, Cluster
from tests.harness.components import missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BUILDS = (".", "base", "overlays/daemonset", "overlays/tls", "prometheus-operator")
CORE_KINDS = {
    "Namespace": "V1Namespace", "ServiceAccount": "V1ServiceAccount", "Role": "V1Role",
    "RoleBinding": "V1RoleBinding", "Deployment": "V1Deployment", "DaemonSet": "V1DaemonSet",
    "Service": "V1Service", "PodDisruptionBudget": "V1PodDisruptionBudget",
    "NetworkPolicy": "V1NetworkPolicy", "Secret": "V1Secret",
}


def kustomize(path: str) -> list[dict[str, Any]]:
    """deploy/PATH rendered as `kubectl apply -k` renders it: by the pinned kubectl's own
    kustomize."""
    binary = KUBE_BIN / "kubectl"
    if not binary.is_file():
        missing("kubectl", "run scripts/install-kube-test-cluster (built with Kubernetes)")
    done = subprocess.run([str(binary), "kustomize", str(DEPLOY / path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a multi-document YAML text."""
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _keys(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {k for key, v in value.items()
                for k in ({prefix + key} | _keys(v, f"{prefix}{key}."))}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v, prefix)}
    return set()


@pytest.mark.parametrize("path", BUILDS)
def test_manifests_render_and_parse_into_client_models(path: str) -> None:
    docs = kustomize(path)
    assert docs
    for doc in docs:
        assert_parses(doc)


def assert_parses(doc: dict[str, Any]) -> None:
    """The object parses into its kubernetes client model without losing a field (the
    Prometheus Operator's kinds have no model there)."""
    model_name = CORE_KINDS.get(doc["kind"])
    if model_name is None:
        assert doc["apiVersion"].startswith("monitoring.coreos.com/"), doc["kind"]
        return
    model = getattr(kubernetes.client, model_name).from_dict(doc)
    lost = _keys(doc) - _keys(model.model_dump(by_alias=True, exclude_none=True))
    assert not lost, f"{doc['kind']} {doc['metadata']['name']}: unknown fields {lost}"


def workloads() -> list[dict[str, Any]]:
    docs = kustomize("overlays/daemonset")
    return by_kind(docs, "Deployment") + by_kind(docs, "DaemonSet")


# By kind, rendered in the test: a missing kubectl skips (or, in CI, fails) the test
# rather than breaking the collection of the whole module.
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_workloads_are_hardened(kind: str) -> None:
    [workload] = [w for w in workloads() if w["kind"] == kind]
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["serviceAccountName"] == "coredns-health-exporter"
    assert pod["terminationGracePeriodSeconds"] >= 15
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["image"].startswith("ghcr.io/coredns-health-exporter/")
    assert container["args"][0] == "serve"


def test_deployment_serves_the_webhook_and_the_daemonset_never_acts() -> None:
    [deployment] = [w for w in workloads() if w["kind"] == "Deployment"]
    [daemonset] = [w for w in workloads() if w["kind"] == "DaemonSet"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--remediation=dry-run" in args  # a new install shows before it acts
    assert any(a.startswith("--webhook-token-file=") for a in args)
    node_args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--remediation=off" in node_args
    assert not any(a.startswith("--webhook-token-file") for a in node_args)


def test_the_tls_overlay_reads_its_web_config_from_a_secret_and_probes_over_https(
        tmp_path: Path) -> None:
    from exporter.web.webconfig import load

    [deployment] = by_kind(kustomize("overlays/tls"), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert "--web-config-file=/etc/coredns-health-exporter/web/web.yml" in container["args"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "web-config"]
    assert mount["mountPath"] == "/etc/coredns-health-exporter/web" and mount["readOnly"]
    [volume] = [v for v in spec["volumes"] if v["name"] == "web-config"]
    assert volume["secret"]["secretName"] == "coredns-health-exporter-web"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    # The example is a web config the exporter reads, which the kubelet's probes pass.
    example = DEPLOY / "overlays" / "tls" / "web.yml.example"
    config = load(example)
    assert config.tls is not None and config.tls.client_auth.value == "VerifyClientCertIfGiven"
    assert set(config.users) == {"prometheus"}


def test_rbac_is_namespaced_and_least_privilege() -> None:
    docs = kustomize("base")
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    rules = [(d["metadata"]["namespace"], r) for d in by_kind(docs, "Role") for r in d["rules"]]
    granted = {(ns, res, verb) for ns, r in rules for res in r["resources"] for verb in r["verbs"]}
    assert not any(res == "secrets" for _, res, _ in granted)
    assert ("kube-system", "pods", "delete") not in granted
    assert ("kube-system", "pods/eviction", "create") in granted
    assert {ns for ns, _, _ in granted} == {"kube-system", "default"}
    [default_rule] = [r for ns, r in rules if ns == "default"]
    assert default_rule["resourceNames"] == ["kubernetes"]


# One file per mode; probe-pod-remediation.yaml adds to probe-pod.yaml (tested below).
OUTSIDE = sorted(p for p in (DEPLOY / "outside").glob("*.yaml")
                 if not p.stem.endswith("-remediation"))


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: p.stem)
def test_outside_credentials_are_least_privilege_for_their_mode(path: Path) -> None:
    """deploy/outside/: one ServiceAccount, namespaced grants but for nodes (read-only),
    no Secrets, pods created and deleted only in the exporter's own namespace; each file is
    used by tests/test_modes.py against the real API server."""
    docs = documents(path.read_text())
    for doc in docs:
        model = getattr(kubernetes.client, f"V1{doc['kind']}").from_dict(doc)
        lost = _keys(doc) - _keys(model.model_dump(by_alias=True, exclude_none=True))
        assert not lost, f"{doc['kind']} {doc['metadata']['name']}: unknown fields {lost}"
    [account] = by_kind(docs, "ServiceAccount")
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": account["metadata"]["name"],
                                        "namespace": "coredns-health-exporter"}]
    granted = {(d["metadata"].get("namespace", "*"), res, verb)
               for d in by_kind(docs, "Role") + by_kind(docs, "ClusterRole")
               for r in d["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert not any("secrets" in res for _, res, _ in granted)
    assert {g for g in granted if g[0] == "*"} <= {("*", "nodes", "list"),
                                                   ("*", "nodes", "watch")}
    writes = {(ns, res) for ns, res, verb in granted
              if verb in ("create", "delete", "update", "patch") and res == "pods"}
    assert writes <= {("coredns-health-exporter", "pods")}
    assert ("kube-system", "services", "list") in granted


def test_outside_remediation_grants_what_the_in_cluster_remediation_has() -> None:
    """The add-on for probe-pod mode: bound to probe-pod.yaml's ServiceAccount, it grants
    in kube-system what the in-cluster exporter's remediation needs, and no more."""
    docs = documents((DEPLOY / "outside" / "probe-pod-remediation.yaml").read_text())
    assert sorted(d["kind"] for d in docs) == ["Role", "RoleBinding"]
    [account] = by_kind(documents((DEPLOY / "outside" / "probe-pod.yaml").read_text()),
                        "ServiceAccount")
    [binding] = by_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "coredns-health-exporter"}]
    [role] = by_kind(docs, "Role")
    assert role["metadata"]["namespace"] == "kube-system"
    granted = {(res, verb) for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    [base] = [d for d in by_kind(kustomize("base"), "Role")
              if d["metadata"]["namespace"] == "kube-system"]
    in_cluster = {(res, verb) for r in base["rules"] for res in r["resources"]
                  for verb in r["verbs"]}
    assert ("pods/eviction", "create") in granted and ("pods", "delete") not in granted
    assert granted <= in_cluster  # nothing the in-cluster exporter does not have
    assert not {(res, verb) for res, verb in granted if verb == "watch"}  # reads, fresh


def test_network_policy_admits_only_prometheus_and_alertmanager() -> None:
    [policy] = by_kind(kustomize("base"), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    names = rule["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(names) == ["alertmanager", "prometheus"]
    assert rule["ports"] == [{"port": 9953, "protocol": "TCP"}]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selected.items()), workload["kind"]


def test_prometheus_rule_is_generated_from_the_alerts() -> None:
    text = (DEPLOY / "prometheus-operator" / "prometheusrule.yaml").read_text()
    assert text == render_prometheus_rule(), "run: python -m alerts.generate"
    [servicemonitor] = by_kind(kustomize("prometheus-operator"), "ServiceMonitor")
    assert all(e["honorLabels"] for e in servicemonitor["spec"]["endpoints"])
    [podmonitor] = by_kind(kustomize("prometheus-operator"), "PodMonitor")
    [endpoint] = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["targetLabel"] == "source_node"
    # The per-node rules select the job the PodMonitor's jobLabel names.
    assert podmonitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert podmonitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == \
        "coredns-health-exporter-node"
    assert 'job="coredns-health-exporter-node"' in Config().node_selector
    # Under the Operator's default matcher strategy (OnNamespace) an AlertmanagerConfig
    # only sees alerts of its own namespace: CoreDNS's, where CoreDNSPodUDPFailing is.
    [config] = by_kind(kustomize("prometheus-operator"), "AlertmanagerConfig")
    assert config["metadata"]["namespace"] == "kube-system"
    assert config["spec"]["route"]["matchers"] == [
        {"name": "alertname", "value": "CoreDNSPodUDPFailing"}]


# -- applied to the real test cluster ---------------------------------------------------------

# Minimal CRDs for the Prometheus Operator's kinds (schema: anything), so that the API
# server accepts their objects in a server-side dry run: group, version, kind, scope and
# object metadata are checked; the Operator's own schema is not (it is not installed).
OPERATOR_KINDS = {"ServiceMonitor": ("servicemonitors", "v1"),
                  "PodMonitor": ("podmonitors", "v1"),
                  "PrometheusRule": ("prometheusrules", "v1"),
                  "AlertmanagerConfig": ("alertmanagerconfigs", "v1alpha1")}
PATHS = {  # kind -> (API prefix, plural, namespaced)
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Service": ("/api/v1", "services", True),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    **{kind: (f"/apis/monitoring.coreos.com/{version}", plural, True)
       for kind, (plural, version) in OPERATOR_KINDS.items()},
}


@pytest.fixture
def admin(kube_cluster: Cluster) -> Iterator[RawClient]:
    client = RawClient.connect(str(kube_cluster.admin_kubeconfig))
    yield client
    client.close()


def install_operator_crds(client: RawClient) -> None:
    for kind, (plural, version) in OPERATOR_KINDS.items():
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": version, "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {
                                       "type": "object",
                                       "x-kubernetes-preserve-unknown-fields": True}}}]},
        }
        with contextlib.suppress(ApiException):  # 409: made by an earlier test
            client.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                           body=crd)
    deadline = time.monotonic() + 30
    while True:
        try:
            for plural, version in OPERATOR_KINDS.values():
                client.request("GET", f"/apis/monitoring.coreos.com/{version}/{plural}")
            return
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # polling: a new CRD is served a moment after it is made


def apply(client: RawClient, doc: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    prefix, plural, namespaced = PATHS[doc["kind"]]
    ns = doc["metadata"].get("namespace")
    path = f"{prefix}/namespaces/{ns}/{plural}" if namespaced else f"{prefix}/{plural}"
    return client.request("POST", path, body=doc, query={"dryRun": "All"} if dry_run else None)


def test_manifests_apply_to_the_real_api(admin: RawClient) -> None:
    created: list[dict[str, Any]] = []
    try:
        for doc in kustomize("overlays/daemonset"):
            answer = apply(admin, doc)
            created.append(doc)
            assert answer["metadata"]["uid"], doc["kind"]
        deployment = admin.request(
            "GET", "/apis/apps/v1/namespaces/coredns-health-exporter/deployments/"
            "coredns-health-exporter")
        stored = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert stored["readOnlyRootFilesystem"] is True
        install_operator_crds(admin)
        for doc in kustomize("prometheus-operator"):
            answer = apply(admin, doc, dry_run=True)
            assert (answer["kind"], answer["metadata"]["name"]) == (
                doc["kind"], doc["metadata"]["name"])
    finally:
        for doc in reversed(created):
            prefix, plural, namespaced = PATHS[doc["kind"]]
            ns, name = doc["metadata"].get("namespace"), doc["metadata"]["name"]
            path = (f"{prefix}/namespaces/{ns}/{plural}/{name}" if namespaced
                    else f"{prefix}/{plural}/{name}")
            with contextlib.suppress(ApiException):
                admin.request("DELETE", path)
