"""The Helm chart (deploy/helm/coredns-health-exporter), by the real Helm: `helm lint`
clean; with its default values it renders the objects of the kustomize base (the
Namespace aside: Helm installs into the release's namespace), with the DaemonSet and the
Operator objects turned on those of the overlay and deploy/prometheus-operator, with a web
config those of the tls overlay; every value reaches the exporter as a flag its own parser
accepts; a misspelt value is refused, naming it. Installed into the real cluster by
tests/test_real_cluster.py."""

from __future__ import annotations

import base64
import subprocess
from typing import Any

import pytest
import yaml

import exporter
from exporter.config import load
from tests.harness.components import CACHE, missing
from tests.test_deploy import DEPLOY, assert_parses, by_kind, documents, kustomize

CHART = DEPLOY / "helm" / "coredns-health-exporter"
HELM = CACHE / "helm" / "bin" / "helm"
RELEASE = "coredns-health-exporter"
NAMESPACE = "coredns-health-exporter"
# The labels Helm's conventions add, which kustomize's objects do not carry.
HELM_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
               "app.kubernetes.io/version"}


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        missing("Helm", "run scripts/install-helm (built from the Go module proxy)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def template(*values: str, release: str = RELEASE) -> list[dict[str, Any]]:
    """The chart rendered as `helm install` would, with `--set` values."""
    done = helm("template", release, str(CHART), "--namespace", NAMESPACE,
                *(a for v in values for a in ("--set", v)))
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def _without_helm_labels(value: Any) -> Any:
    """`value` with Helm's labels left out of every `labels` mapping in it."""
    if isinstance(value, dict):
        return {k: ({n: x for n, x in v.items() if n not in HELM_LABELS}
                    if k == "labels" and isinstance(v, dict) else _without_helm_labels(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_without_helm_labels(v) for v in value]
    return value


def objects(docs: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    """(kind, namespace, name) -> the object, Helm's own labels left out."""
    return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]):
            _without_helm_labels(d) for d in docs}


def shipped(*paths: str) -> dict[tuple[str, str, str], Any]:
    """What kustomize renders for deploy/PATHs, but the Namespace (Helm's release's)."""
    return objects([d for p in paths for d in kustomize(p) if d["kind"] != "Namespace"])


def _diff(chart: dict[tuple[str, str, str], Any], base: dict[tuple[str, str, str], Any]
          ) -> list[str]:
    lines = [f"only in the chart: {k}" for k in chart.keys() - base.keys()]
    lines += [f"only in kustomize: {k}" for k in base.keys() - chart.keys()]
    for key in chart.keys() & base.keys():
        if chart[key] != base[key]:
            lines.append(f"{key} differs:\n chart: {yaml.safe_dump(chart[key])}\n"
                         f" kustomize: {yaml.safe_dump(base[key])}")
    return lines


def test_helm_lint_is_clean() -> None:
    done = helm("lint", "--strict", str(CHART))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout, done.stdout
    assert "[WARNING]" not in done.stdout, done.stdout


def test_default_values_render_the_kustomize_base() -> None:
    docs = template()
    assert not _diff(objects(docs), shipped("base")), "\n".join(_diff(objects(docs),
                                                                        shipped("base")))
    # Helm's labels are there all the same, on every object and pod template.
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_daemonset_and_operator_values_render_the_overlay_and_the_operator_objects() -> None:
    docs = template("daemonset.enabled=true", "serviceMonitor.enabled=true",
                    "podMonitor.enabled=true", "prometheusRule.enabled=true",
                    "alertmanagerConfig.enabled=true")
    diff = _diff(objects(docs), shipped("overlays/daemonset", "prometheus-operator"))
    assert not diff, "\n".join(diff)


def test_web_config_values_render_the_tls_overlay() -> None:
    docs = template("webConfig.secretName=coredns-health-exporter-web")
    diff = _diff(objects(docs), shipped("overlays/tls"))
    assert not diff, "\n".join(diff)


def test_every_rendered_object_parses_into_the_client_models() -> None:
    docs = template("daemonset.enabled=true", "serviceMonitor.enabled=true",
                    "podMonitor.enabled=true", "prometheusRule.enabled=true",
                    "alertmanagerConfig.enabled=true", "webhook.token=s3cret",
                    "remediation.allowDelete=true", "webConfig.secretName=web")
    for doc in docs:
        assert_parses(doc)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "DaemonSet", "Secret", "ServiceMonitor", "PodMonitor",
            "PrometheusRule", "AlertmanagerConfig"} <= kinds


def args_of(docs: list[dict[str, Any]], kind: str) -> list[str]:
    [workload] = by_kind(docs, kind)
    args: list[str] = workload["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_values_become_flags_the_exporter_accepts() -> None:
    docs = template("remediation.mode=evict", "remediation.minReady=2",
                    "remediation.cooldown=10m", "remediation.selfRemediate=true",
                    "probe.interval=2.5", "probe.timeout=0.5", "probe.protocol=udp",
                    "probe.queries[0].name=example.com", "probe.queries[0].expect[0]=192.0.2.1",
                    "probe.queries[1].name=example.org", "probe.queries[1].type=AAAA",
                    "probe.endpoint=known", "coredns.namespace=dns", "coredns.service=coredns",
                    "port=9100", "daemonset.enabled=true", "daemonset.nodeLocalDNS=169.254.20.10")
    args = args_of(docs, "Deployment")
    assert args == ["serve", "--listen=:9100", "--namespace=dns", "--service=coredns",
                    "--remediation=evict",
                    "--webhook-token-file=/etc/coredns-health-exporter/webhook/token",
                    "--log-format=json", "--min-ready=2", "--cooldown=10m", "--self-remediate",
                    "--interval=2.5", "--timeout=0.5", "--protocol=udp",
                    "--query=example.com", "--expect=192.0.2.1", "--query=example.org/AAAA",
                    "--probe-endpoint=known"]
    settings = load(args)  # the exporter's own parser: every flag is one it knows
    assert settings.probe.interval == 2.5 and settings.probe.timeout == 0.5
    assert [(q.label, q.rdtype, q.expect) for q in settings.probe.queries] == [
        ("example.com", "A", ("192.0.2.1",)), ("example.org/AAAA", "AAAA", ())]
    node_args = args_of(docs, "DaemonSet")
    assert "--remediation=off" in node_args and "--node-local-dns=169.254.20.10" in node_args
    assert not [a for a in node_args if a.startswith(("--webhook", "--self-remediate"))]
    load(node_args, env={"DNSPROBE_NODE_NAME": "worker-1"})
    # The Role follows CoreDNS to its namespace.
    assert {r["metadata"]["namespace"] for r in by_kind(docs, "Role")} == {"dns", "default"}
    [service] = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 9100


def test_allow_delete_grants_delete_on_pods_and_nothing_else() -> None:
    def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(d["metadata"]["namespace"], res, verb) for d in by_kind(docs, "Role")
                for r in d["rules"] for res in r["resources"] for verb in r["verbs"]}

    before, after = granted(template()), granted(template("remediation.allowDelete=true"))
    assert after - before == {("kube-system", "pods", "delete")}
    assert "--allow-delete" in args_of(template("remediation.allowDelete=true"), "Deployment")


def test_a_webhook_token_value_makes_the_secret_the_pods_mount() -> None:
    docs = template("webhook.token=s3cret", "alertmanagerConfig.enabled=true")
    secrets = {s["metadata"]["namespace"]: s for s in by_kind(docs, "Secret")}
    assert set(secrets) == {NAMESPACE, "kube-system"}  # and where the AlertmanagerConfig reads
    for secret in secrets.values():
        assert base64.b64decode(secret["data"]["token"]) == b"s3cret"
    [deployment] = by_kind(docs, "Deployment")
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                if v["name"] == "webhook-token"]
    assert volume["secret"]["secretName"] == secrets[NAMESPACE]["metadata"]["name"]
    [route] = by_kind(docs, "AlertmanagerConfig")
    [hook] = route["spec"]["receivers"][0]["webhookConfigs"]
    assert hook["httpConfig"]["authorization"]["credentials"]["name"] == \
        secrets["kube-system"]["metadata"]["name"]
    # An existing Secret instead: named, and none made.
    docs = template("webhook.existingSecret=mine")
    assert not by_kind(docs, "Secret")
    [deployment] = by_kind(docs, "Deployment")
    assert {"name": "webhook-token", "secret": {"secretName": "mine", "optional": True}} in \
        deployment["spec"]["template"]["spec"]["volumes"]


def test_another_release_name_keeps_the_job_names_the_rules_select() -> None:
    docs = template("serviceMonitor.enabled=true", "podMonitor.enabled=true",
                    "daemonset.enabled=true", release="dns-watch")
    [deployment] = by_kind(docs, "Deployment")
    assert deployment["metadata"]["name"] == "dns-watch-coredns-health-exporter"
    [monitor] = by_kind(docs, "ServiceMonitor")
    [service] = by_kind(docs, "Service")
    # The job is the Service's app.kubernetes.io/name (jobLabel), not the release's name.
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "coredns-health-exporter"
    [pods] = by_kind(docs, "PodMonitor")
    [daemonset] = by_kind(docs, "DaemonSet")
    assert daemonset["spec"]["template"]["metadata"]["labels"][pods["spec"]["jobLabel"]] == \
        "coredns-health-exporter-node"
    # The RBAC binds the release's ServiceAccount.
    for binding in by_kind(docs, "RoleBinding"):
        assert binding["subjects"][0]["name"] == deployment["spec"]["template"]["spec"][
            "serviceAccountName"]


def test_the_prometheus_rule_holds_the_generated_rules() -> None:
    from alerts.generate import CHART_RULES, render, rules

    assert CHART_RULES.read_text() == render(), "run: python -m alerts.generate"
    [rule] = by_kind(template("prometheusRule.enabled=true"), "PrometheusRule")
    assert rule["spec"] == rules()
    # Helm left the alert templates alone ({{ $labels.pod }} is Prometheus's to fill).
    assert "{{ $labels.pod }}" in yaml.safe_dump(rule)


@pytest.mark.parametrize(("value", "named"), [
    ("remediaton.mode=evict", "remediaton"),
    ("remediation.mode=evcit", "/remediation/mode"),
    ("probe.interval=0", "/probe/interval"),
    ("serviceMonitor.enabeld=true", "enabeld"),
])
def test_a_wrong_value_is_refused_naming_it(value: str, named: str) -> None:
    done = helm("template", RELEASE, str(CHART), "--set", value)
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    assert "panic" not in done.stderr


def test_token_and_existing_secret_together_are_refused() -> None:
    done = helm("template", RELEASE, str(CHART), "--set", "webhook.token=a",
                "--set", "webhook.existingSecret=b")
    assert done.returncode != 0
    assert "either token or existingSecret" in done.stderr, done.stderr


def test_the_chart_installs_the_exporters_own_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == chart["version"] == exporter.__version__
    [deployment] = by_kind(template(), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    repository = "ghcr.io/coredns-health-exporter/coredns-health-exporter"
    assert image == f"{repository}:{exporter.__version__}"


def test_every_value_is_in_the_schema() -> None:
    """values.yaml and values.schema.json name the same keys (a value the schema does not
    know would be refused; one values.yaml does not show is undocumented)."""
    import json

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def keys(v: Any, s: dict[str, Any], prefix: str = "") -> list[str]:
        problems = []
        props = s.get("properties", {})
        if isinstance(v, dict) and props:
            for k in v.keys() - props.keys():
                problems.append(f"{prefix}{k}: in values.yaml, not in the schema")
            for k in props.keys() - v.keys() - {"global"}:
                problems.append(f"{prefix}{k}: in the schema, not in values.yaml")
            for k in v.keys() & props.keys():
                problems += keys(v[k], props[k], f"{prefix}{k}.")
        return problems

    assert not keys(values, schema)

