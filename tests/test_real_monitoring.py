"""The shipped monitoring artifacts where users run them, on the real cluster: the
Prometheus Operator reconciling a Prometheus and an Alertmanager with the shipped
ServiceMonitor, PodMonitor, PrometheusRule and AlertmanagerConfig, exactly as shipped;
and, beside it, a plain Prometheus and Alertmanager running the shipped scrape configs and
rule file. Both discover the exporter (the Deployment and the DaemonSet overlay) through
Kubernetes service discovery against the real API server, load the rules, and route a
UDP-dead CoreDNS pod's alert to the exporter's webhook."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts.generate import MIXIN_ALERTS, OUTPUT, rules
from tests.harness import operator
from tests.harness.cluster import NODE_NAMES
from tests.harness.components import missing, monitoring_missing
from tests.harness.monitoring import alertmanager_config, get, instant_query
from tests.harness.realcluster import RealCluster
from tests.harness.scrape import wait_until
from tests.test_real_cluster import NAMESPACE, evictions, ready_coredns

REPO = Path(__file__).resolve().parent.parent
WEBHOOK = f"http://coredns-health-exporter.{NAMESPACE}:9953/webhook/alertmanager"
ALERTS = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}


@dataclass
class Stack:
    """One Prometheus and its Alertmanager, reached from the host through relays."""

    name: str
    prometheus: str
    alertmanager: str

    def get(self, url: str) -> Any:
        return get(url)

    def query(self, expr: str) -> list[dict[str, Any]]:
        return instant_query(self.prometheus, expr)

    def requests(self, kind: str) -> float:
        """Alertmanager's own count of webhook requests (`total` or `failed`). Not
        alertmanager_notifications_total: that one counts a notification when its retry
        loop starts, before any request has been answered."""
        text: str = self.get(f"{self.alertmanager}/metrics")
        name = f"alertmanager_notification_requests_{'failed_' if kind == 'failed' else ''}total"
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and 'integration="webhook"' in line)

    def delivered(self) -> float:
        """Webhook requests answered 2xx."""
        return self.requests("total") - self.requests("failed")


@dataclass
class Monitored:
    real: RealCluster
    stacks: dict[str, Stack]
    exporters: list[dict[str, Any]]  # the Deployment's pods
    per_node: list[dict[str, Any]]  # the DaemonSet's


@pytest.fixture(scope="module")
def monitored(real_cluster: RealCluster) -> Iterator[Monitored]:
    reason = monitoring_missing()
    if reason:
        missing("Prometheus, Alertmanager and the Prometheus Operator", reason)
    real = real_cluster
    token = os.urandom(16).hex()
    overlay = REPO / "deploy" / "overlays" / "daemonset"
    shipped_operator = REPO / "deploy" / "prometheus-operator"
    try:
        # The README's steps: the token Secret (and, for the AlertmanagerConfig, the same
        # in CoreDNS's namespace), the DaemonSet overlay over the base.
        real.kubectl("create", "namespace", NAMESPACE)
        for namespace in (NAMESPACE, "kube-system"):
            real.kubectl("-n", namespace, "create", "secret", "generic",
                         "coredns-health-exporter-webhook", f"--from-literal=token={token}")
        real.kubectl("apply", "-k", str(overlay))
        # The Operator as upstream ships it, its CRDs first.
        operator.install_crds(real)
        for namespace in (operator.NAMESPACE, operator.PLAIN_NAMESPACE):
            real.kubectl("create", "namespace", namespace)
            real.cluster.await_default_account(namespace)
        operator.apply(real, operator.operator_objects())
        operator.rollout(real, "deployment/prometheus-operator")
        operator.apply(real, operator.reconciled_objects())
        real.kubectl("apply", "-k", str(shipped_operator))
        # Without the Operator: the shipped scrape configs and rule file, as they are.
        shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "scrape-configs.yaml")
                                 .read_text())["scrape_configs"]
        am = alertmanager_config(WEBHOOK, Path("/etc/alertmanager/token"))
        operator.apply(real, operator.plain_objects(shipped, OUTPUT.read_text(), am, token))
        real.kubectl("-n", NAMESPACE, "rollout", "status", "deployment/coredns-health-exporter",
                     "daemonset/coredns-health-exporter-node", "--timeout=180s", timeout=190)
        operator.rollout(real, f"deployment/{operator.PLAIN_PROMETHEUS}",
                         f"deployment/{operator.PLAIN_ALERTMANAGER}",
                         namespace=operator.PLAIN_NAMESPACE)
        operator.await_statefulset(real, operator.PROMETHEUS_SET)
        operator.await_statefulset(real, operator.ALERTMANAGER_SET)
        with contextlib.ExitStack() as relays:
            def url(selector: str, port: int, namespace: str = operator.NAMESPACE) -> str:
                address = f"{operator.pod_ip(real, selector, namespace)}:{port}"
                return "http://" + relays.enter_context(real.cluster.exposed(address))

            plain = "app.kubernetes.io/instance=plain,app.kubernetes.io/name="
            stacks = {
                "operator": Stack("operator", url("prometheus=k8s", 9090),
                                  url("alertmanager=main", 9093)),
                "plain": Stack("plain",
                               url(plain + "prometheus", 9090, operator.PLAIN_NAMESPACE),
                               url(plain + "alertmanager", 9093, operator.PLAIN_NAMESPACE))}
            yield Monitored(
                real, stacks,
                real.pods(NAMESPACE, "app.kubernetes.io%2Fname%3Dcoredns-health-exporter"),
                real.pods(NAMESPACE, "app.kubernetes.io%2Fname%3Dcoredns-health-exporter-node"))
    finally:
        real.kubectl("delete", "namespace", operator.NAMESPACE, operator.PLAIN_NAMESPACE,
                     "--ignore-not-found",
                     "--wait=true", "--timeout=120s", timeout=130)
        real.kubectl("delete", "-k", str(shipped_operator), "--ignore-not-found", "--wait=false")
        real.kubectl("delete", "clusterrolebinding,clusterrole", "prometheus",
                     "prometheus-operator", "--ignore-not-found")
        real.kubectl("delete", "clusterrolebinding", operator.PLAIN_PROMETHEUS,
                     "--ignore-not-found")
        real.kubectl("-n", "kube-system", "delete", "secret", "coredns-health-exporter-webhook",
                     "--ignore-not-found")
        real.kubectl("delete", "-k", str(overlay), "--ignore-not-found", "--wait=true",
                     "--timeout=120s", timeout=130)


def test_the_operator_generates_what_the_shipped_objects_ask(monitored: Monitored) -> None:
    """The configuration the Operator wrote (in Secrets) for the real Prometheus and
    Alertmanager: the ServiceMonitor discovered through EndpointSlices, the PodMonitor's
    job named by its jobLabel, the AlertmanagerConfig's route matching CoreDNS's namespace
    (the Operator's default OnNamespace strategy) with the token from kube-system."""
    real = monitored.real
    prometheus = yaml.safe_load(operator.generated_config(
        real, operator.PROMETHEUS_SET, "prometheus.yaml.gz"))
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    service = jobs[f"serviceMonitor/{NAMESPACE}/coredns-health-exporter/0"]
    assert [sd["role"] for sd in service["kubernetes_sd_configs"]] == ["endpointslice"]
    assert service["honor_labels"] is True
    pods = jobs[f"podMonitor/{NAMESPACE}/coredns-health-exporter-node/0"]
    assert [sd["role"] for sd in pods["kubernetes_sd_configs"]] == ["pod"]
    alertmanager = yaml.safe_load(operator.generated_config(
        real, "alertmanager-main-generated", "alertmanager.yaml.gz"))
    [route] = [r for r in alertmanager["route"]["routes"]
               if r["receiver"] == "kube-system/coredns-health-exporter/coredns-health-exporter"]
    assert 'namespace="kube-system"' in route["matchers"], route
    assert 'alertname="CoreDNSPodUDPFailing"' in route["matchers"], route
    [receiver] = [r for r in alertmanager["receivers"] if r["name"] == route["receiver"]]
    [webhook] = receiver["webhook_configs"]
    assert webhook["url"] == WEBHOOK
    assert webhook["http_config"]["authorization"]["type"] == "Bearer"


@pytest.mark.parametrize("stack", ["operator", "plain"])
async def test_both_exporters_are_discovered_and_scraped_with_their_labels(
        monitored: Monitored, stack: str) -> None:
    m, s = monitored, monitored.stacks[stack]
    coredns = ready_coredns(m.real)
    exporters = {p["metadata"]["name"] for p in m.exporters}
    per_node = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in m.per_node}

    def scraped() -> bool:
        up = s.query('up{job=~"coredns-health-exporter|coredns-health-exporter-node"} == 1')
        return len(up) == len(exporters) + len(per_node) and len(s.query(
            'dnsprobe_success{job="coredns-health-exporter-node", kind="pod"}')) == \
            2 * 2 * len(coredns)

    assert await wait_until(scraped, 120), s.query("up")
    # The Deployment's pods, by the ServiceMonitor (scrape config) of the Service.
    up = s.query('up{job="coredns-health-exporter"}')
    assert {r["metric"]["pod"] for r in up} == exporters, up
    assert all(r["metric"]["namespace"] == NAMESPACE for r in up)
    # The DaemonSet's, by the PodMonitor (pod role), each with its node as source_node.
    up = s.query('up{job="coredns-health-exporter-node"}')
    assert {r["metric"]["pod"]: r["metric"]["source_node"] for r in up} == per_node
    assert set(per_node.values()) == set(NODE_NAMES)
    # The exporter's own labels win (honor_labels): the CoreDNS pod, its node, namespace.
    for job in ("coredns-health-exporter", "coredns-health-exporter-node"):
        series = s.query(f'dnsprobe_success{{job="{job}", kind="pod"}}')
        assert {r["metric"]["pod"] for r in series} == set(coredns), series
        for r in series:
            pod = coredns[r["metric"]["pod"]]
            assert r["metric"]["node"] == pod["spec"]["nodeName"], r
            assert r["metric"]["namespace"] == "kube-system", r
    assert not s.query('{exported_pod!=""} or {exported_namespace!=""}')
    assert {r["metric"]["source_node"] for r in s.query(
        'dnsprobe_success{job="coredns-health-exporter-node"}')} == set(NODE_NAMES)


@pytest.mark.parametrize("stack", ["operator", "plain"])
async def test_the_rules_load_and_evaluate(monitored: Monitored, stack: str) -> None:
    s = monitored.stacks[stack]

    def loaded() -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = s.get(f"{s.prometheus}/api/v1/rules")["data"]["groups"]
        return [r for g in groups for r in g["rules"]
                if g["name"].startswith("coredns-health-exporter")]

    def evaluated() -> bool:
        got = loaded()
        return len(got) == sum(len(g["rules"]) for g in rules()["groups"]) and all(
            r.get("lastEvaluation", "").startswith("2") and not r["lastEvaluation"].startswith(
                "0001") for r in got)

    assert await wait_until(evaluated, 90), loaded()
    got = loaded()
    assert {r["name"] for r in got if r["type"] == "alerting"} == ALERTS
    assert not ALERTS & MIXIN_ALERTS
    assert all(r["health"] == "ok" for r in got), [r for r in got if r["health"] != "ok"]
    # The per-node recording rule has each node's view of each target.
    ratio = "source_node_target_protocol:dnsprobe_failure_ratio:rate"
    assert await wait_until(lambda: {r["metric"].get("source_node") for r in s.query(
        f'{ratio}{{kind="pod"}}')} == set(NODE_NAMES), 60), s.query(ratio)


async def test_a_udp_dead_pod_is_alerted_and_posted_to_the_webhook_by_both(
        monitored: Monitored) -> None:
    """UDP/53 dropped inside one CoreDNS pod: the shipped CoreDNSPodUDPFailing fires in
    both Prometheus servers (shipped windows: 2m rate, for 3m); the Operator's
    Alertmanager routes it through the shipped AlertmanagerConfig, the plain one through
    the documented route; each posts it to the exporter's webhook, which decides on it
    (dry-run by default: an Event, no eviction)."""
    m, real = monitored, monitored.real
    sick = sorted(ready_coredns(real))[0]
    seen = {e["metadata"]["uid"] for e in evictions(real)}
    before = {name: s.delivered() for name, s in m.stacks.items()}
    rule = ["INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"]
    real.in_pod_network(sick, ["iptables", "-A", *rule])
    began = time.monotonic()
    try:
        def posted(name: str) -> bool:
            return m.stacks[name].delivered() > before[name]

        def alertmanager_log(name: str) -> list[str]:
            namespace = operator.NAMESPACE if name == "operator" else operator.PLAIN_NAMESPACE
            return [line for pod in real.pods(namespace, "app.kubernetes.io%2Fname%3Dalertmanager")
                    for line in real.kubectl("-n", namespace, "logs", "-c", "alertmanager",
                                             pod["metadata"]["name"]).splitlines()
                    if "otify" in line][-5:]

        for name, s in m.stacks.items():
            assert await wait_until(functools.partial(posted, name), 480), (
                name, s.query('ALERTS{alertname="CoreDNSPodUDPFailing"}'),
                s.requests("total"), s.requests("failed"), alertmanager_log(name))
            alerts = [a for a in s.get(f"{s.alertmanager}/api/v2/alerts")
                      if a["labels"]["alertname"] == "CoreDNSPodUDPFailing"]
            # One alert for the one sick pod, whatever the number of exporter replicas.
            assert len(alerts) == 1, [a["labels"] for a in alerts]
            [alert] = alerts
            assert alert["labels"]["pod"] == sick and alert["labels"]["namespace"] == "kube-system"
            receivers = {r["name"] for r in alert["receivers"]}
            expected = ("kube-system/coredns-health-exporter/coredns-health-exporter"
                        if name == "operator" else "coredns-health-exporter")
            assert expected in receivers, alert
        took = time.monotonic() - began

        # The webhook answered each post with a decision on the sick pod (logged).
        def decided() -> list[dict[str, Any]]:
            lines = []
            for pod in m.exporters:
                logs = real.kubectl("-n", NAMESPACE, "logs", pod["metadata"]["name"])
                lines += [json.loads(line) for line in logs.splitlines()
                          if line.startswith("{")]
            return [line for line in lines if line.get("alert") == "CoreDNSPodUDPFailing"
                    and line.get("pod") == sick]

        def webhook_log() -> list[list[str]]:
            return [[line for line in real.kubectl(
                "-n", NAMESPACE, "logs", p["metadata"]["name"]).splitlines()
                if "remediation" in line or "webhook" in line][-5:] for p in m.exporters]

        # Each stack's post was answered 2xx, so the webhook decided on it: a log line.
        assert len(decided()) >= 2, (decided(), webhook_log(),
                                     {name: alertmanager_log(name) for name in m.stacks})
        # dry-run, the base's default: the pod stays, an Event says what would be done.
        pod = real.cluster.api("GET", f"/api/v1/namespaces/kube-system/pods/{sick}")
        assert pod is not None and not pod["metadata"].get("deletionTimestamp")
        assert not evictions(real, seen)
        assert took > 180  # the shipped `for: 3m` was waited out, not shortened
    finally:
        real.in_pod_network(sick, ["iptables", "-D", *rule])
