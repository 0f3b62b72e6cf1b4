"""The one source of the Prometheus rules: recording rules and alerts, generated from a
config of selectors, windows and thresholds.

    python -m alerts.generate            # rewrites alerts/coredns-health-exporter.rules.yaml,
                                         # deploy/prometheus-operator/prometheusrule.yaml
                                         # and the Helm chart's files/rules.yaml
    python -m alerts.generate --check    # exit 1 if the file is not what this generates

Change a threshold or a selector in `Config` (or pass your own Config to `rules()`), not in
the YAML: a test checks that the committed file is what this generates, and the end-to-end
test runs the same rules with shorter windows through the same function.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OUTPUT = Path(__file__).with_name("coredns-health-exporter.rules.yaml")
# The same rules as a Prometheus Operator object (one source of truth).
PROMETHEUS_RULE = (Path(__file__).resolve().parents[1] / "deploy" / "prometheus-operator"
                   / "prometheusrule.yaml")
# And as the Helm chart's PrometheusRule reads them (a chart cannot read files outside it).
CHART_RULES = (Path(__file__).resolve().parents[1] / "deploy" / "helm" / "coredns-health-exporter"
               / "files" / "rules.yaml")
RUNBOOK = "https://github.com/coredns-health-exporter/coredns-health-exporter/blob/main/docs/runbook.md"


@dataclass(frozen=True)
class Config:
    # Which scrape jobs are this exporter (Prometheus Operator: the ServiceMonitor's job).
    selector: str = 'job="coredns-health-exporter"'
    # The DaemonSet overlay's job (deploy/overlays/daemonset): one exporter per node, its
    # series labelled with `source_node` (the plain scrape config's job name, and the
    # PodMonitor's through its jobLabel).
    node_selector: str = 'job="coredns-health-exporter-node"'
    # Rate window of the failure ratios: long enough that one lost packet (1 probe of 24 at
    # the default 5 s interval) is a blip, short enough to notice a dead pod in minutes.
    window: str = "2m"
    # Share of probes failing above which a target is failing, below which it answers.
    failing: float = 0.5
    answering: float = 0.1
    for_pod: str = "3m"
    for_service: str = "2m"
    latency_window: str = "5m"
    latency_p99_seconds: float = 0.25
    for_latency: str = "10m"
    for_wrong_answer: str = "5m"
    for_exporter: str = "5m"
    for_no_targets: str = "10m"
    for_absent: str = "10m"
    for_node: str = "5m"
    for_discovery: str = "15m"
    for_upstream: str = "2m"
    # The query label of the exporter's default query (kubernetes.default.svc.<domain>):
    # answered by CoreDNS from the API, never forwarded upstream.
    cluster_query: str = "kubernetes"
    remediation_window: str = "1h"
    remediation_failures: int = 3
    runbook: str = RUNBOOK
    interval: str = ""  # rule evaluation interval; empty: Prometheus' global one


TARGET = "kind, namespace, service, pod, node, address"
RATIO = "target_protocol:dnsprobe_failure_ratio:rate"
PROBES = "target_protocol:dnsprobe_probes:rate"
P99 = "target_protocol:dnsprobe_duration_seconds:p99"
# Per query as well: an upstream failure fails the external queries of every pod while
# the cluster query passes, which the ratio over all queries blurs.
QUERY_PROBES = "target_protocol_query:dnsprobe_probes:rate"
QUERY_RATIO = "target_protocol_query:dnsprobe_failure_ratio:rate"
# The per-node view: each target's failure ratio as seen from each node.
NODE_PROBES = "source_node_target_protocol:dnsprobe_probes:rate"
NODE_RATIO = "source_node_target_protocol:dnsprobe_failure_ratio:rate"
# Alert names of the coredns-mixin (and nodelocaldns-mixin), installed beside these in many
# clusters (kube-prometheus, kube-prometheus-stack): none of ours may share one.
MIXIN_ALERTS = frozenset({
    "CoreDNSDown", "CoreDNSLatencyHigh", "CoreDNSErrorsHigh", "CoreDNSForwardLatencyHigh",
    "CoreDNSForwardErrorsHigh", "CoreDNSForwardHealthcheckFailureCount",
    "CoreDNSForwardHealthcheckBrokenCount", "NodeLocalDNSMetricsDown",
    "NodeLocalDNSSetupErrorsHigh", "NodeLocalDNSSetupErrorsHighNew"})


def _alert(c: Config, name: str, expr: str, duration: str, severity: str, summary: str,
           description: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": _squash(expr)}
    if duration and duration != "0s":
        rule["for"] = duration
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": _squash(description),
        "runbook_url": f"{c.runbook}#{name.lower()}",
    }
    return rule


def _squash(text: str) -> str:
    return " ".join(text.split())


def _pod_failing(c: Config, protocol: str) -> str:
    """One pod failing `protocol` while another pod of its Service answers over it."""
    pods = f'{RATIO}{{kind="pod", protocol="{protocol}"}}'
    return (f"({pods} > {c.failing}) and on (namespace, service) "
            f"(count by (namespace, service) ({pods} < {c.answering}) > 0)")


def rules(c: Config = Config()) -> dict[str, Any]:
    """The rule file as data."""
    s = c.selector
    keep = "instance, result, query"
    recording = [
        {"record": PROBES,
         "expr": _squash(f"sum without ({keep}) (rate(dnsprobe_probes_total{{{s}}}[{c.window}]))")},
        # 1 - successes / probes: every outcome counter is exported from 0, so a target
        # that never failed has a ratio of 0 rather than no ratio at all.
        {"record": RATIO,
         "expr": _squash(f"1 - sum without ({keep}) (rate(dnsprobe_probes_total{{{s}, "
                         f'result="success"}}[{c.window}])) / {PROBES}')},
        {"record": QUERY_PROBES,
         "expr": _squash(f"sum without (instance, result) (rate(dnsprobe_probes_total{{{s}}}"
                         f"[{c.window}]))")},
        {"record": QUERY_RATIO,
         "expr": _squash(f"1 - sum without (instance, result) (rate(dnsprobe_probes_total"
                         f'{{{s}, result="success"}}[{c.window}])) / {QUERY_PROBES}')},
        {"record": P99,
         "expr": _squash(f"histogram_quantile(0.99, sum without (instance, query) "
                         f"(rate(dnsprobe_duration_seconds_bucket{{{s}}}[{c.latency_window}])))")},
        # From each node (the DaemonSet): the same, kept apart by `source_node`. `pod` is
        # dropped too: on the Service's series it is the exporter's own pod (the target's
        # is empty), and `address` names a CoreDNS pod on its own.
        {"record": NODE_PROBES,
         "expr": _squash(f"sum without ({keep}, pod) (rate(dnsprobe_probes_total"
                         f"{{{c.node_selector}}}[{c.window}]))")},
        {"record": NODE_RATIO,
         "expr": _squash(f"1 - sum without ({keep}, pod) (rate(dnsprobe_probes_total"
                         f'{{{c.node_selector}, result="success"}}[{c.window}])) / {NODE_PROBES}')},
    ]
    alerts = [
        _alert(c, "CoreDNSPodUDPFailing",
               _pod_failing(c, "udp"),
               c.for_pod, "warning",
               "A CoreDNS pod fails UDP DNS while other pods answer.",
               f"""CoreDNS pod {{{{ $labels.namespace }}}}/{{{{ $labels.pod }}}} ({{{{
               $labels.address }}}}, node {{{{ $labels.node }}}}) failed {{{{ $value |
               humanizePercentage }}}} of its UDP probes over the last {c.window} while other
               pods of {{{{ $labels.service }}}} answer. Clients sent to it time out. This
               alert drives the exporter's remediation webhook (evict the pod)."""),
        _alert(c, "CoreDNSPodTCPFailing",
               _pod_failing(c, "tcp"),
               c.for_pod, "warning",
               "A CoreDNS pod fails TCP DNS while other pods answer.",
               f"""CoreDNS pod {{{{ $labels.namespace }}}}/{{{{ $labels.pod }}}} ({{{{
               $labels.address }}}}, node {{{{ $labels.node }}}}) failed {{{{ $value |
               humanizePercentage }}}} of its TCP probes over the last {c.window} while other
               pods of {{{{ $labels.service }}}} answer. Clients retrying a truncated answer
               over TCP, and those that use TCP, fail when sent to it. Not remediated: the
               webhook restarts pods whose UDP fails."""),
        _alert(c, "CoreDNSUDPFailingTCPWorks",
               f"""({RATIO}{{kind=~"pod|service", protocol="udp"}} > {c.failing})
               and on ({TARGET})
               ({RATIO}{{kind=~"pod|service", protocol="tcp"}} < {c.answering})""",
               c.for_pod, "warning",
               "CoreDNS answers over TCP but not over UDP.",
               """{{ $labels.kind }} {{ $labels.address }} of {{ $labels.namespace
               }}/{{ $labels.service }}{{ if $labels.pod }} (pod {{ $labels.pod
               }}){{ end }} fails {{ $value | humanizePercentage }} of UDP probes
               while TCP works: UDP/53 is blocked or
               the UDP listener is stuck (coredns/coredns#3617); the HTTP health check does
               not see this."""),
        _alert(c, "CoreDNSServiceFailing",
               f'{RATIO}{{kind="service"}} > {c.failing}',
               c.for_service, "critical",
               "The CoreDNS Service IP fails DNS: cluster DNS is down.",
               f"""The CoreDNS Service {{{{ $labels.namespace }}}}/{{{{ $labels.service }}}}
               at {{{{ $labels.address }}}} failed {{{{ $value | humanizePercentage }}}} of
               its {{{{ $labels.protocol }}}} probes over the last {c.window}. This is a
               cluster-wide outage: page a human; restarting a pod will not fix it."""),
        _alert(c, "CoreDNSAllPodsFailing",
               f'min by (namespace, service, protocol) ({RATIO}{{kind="pod"}}) > {c.failing}',
               c.for_service, "critical",
               "Every CoreDNS pod fails DNS.",
               """Every pod of {{ $labels.namespace }}/{{ $labels.service }} fails
               at least {{ $value | humanizePercentage }} of its {{ $labels.protocol
               }} probes. No restart will be attempted (no other pod is Ready); look for a
               shared cause: the Corefile, the upstream resolvers, the network."""),
        _alert(c, "CoreDNSUpstreamFailing",
               f"""(min by (namespace, service, protocol, query)
                 ({QUERY_RATIO}{{kind="pod", query!="{c.cluster_query}"}}) > {c.failing})
               and on (namespace, service, protocol)
               (max by (namespace, service, protocol)
                 ({QUERY_RATIO}{{kind="pod", query="{c.cluster_query}"}}) < {c.answering})""",
               c.for_upstream, "warning",
               "Every CoreDNS pod fails a query for a name outside the cluster.",
               f"""Every pod of {{{{ $labels.namespace }}}}/{{{{ $labels.service }}}} fails
               at least {{{{ $value | humanizePercentage }}}} of its {{{{ $labels.protocol }}}}
               probes of {{{{ $labels.query }}}} over the last {c.window}, while they answer
               the cluster's own name ({c.cluster_query}): the upstream resolvers CoreDNS
               forwards to fail. Pods cannot resolve names outside the cluster. CoreDNS is
               fine, so nothing is restarted for it."""),
        _alert(c, "CoreDNSFailingFromNode",
               f"""({NODE_RATIO}{{kind=~"pod|service"}} > {c.failing})
               and on (kind, namespace, service, address, protocol)
               (count by (kind, namespace, service, address, protocol)
                 ({NODE_RATIO}{{kind=~"pod|service"}} < {c.answering}) > 0)""",
               c.for_node, "warning",
               "CoreDNS fails from one node while other nodes reach it.",
               f"""From node {{{{ $labels.source_node }}}}, {{{{ $labels.kind }}}} {{{{
               $labels.address }}}} of {{{{ $labels.namespace }}}}/{{{{ $labels.service }}}}
               failed {{{{ $value | humanizePercentage }}}} of its {{{{ $labels.protocol }}}}
               probes over the last {c.window}, while from other nodes it answers. Pods on
               that node lose DNS; CoreDNS itself is fine, so nothing is restarted: look at
               that node's kube-proxy, conntrack and iptables, NodeLocal DNSCache and network
               policy."""),
        _alert(c, "CoreDNSNodeLocalCacheFailing",
               f'{NODE_RATIO}{{kind="nodelocal"}} > {c.failing}',
               c.for_node, "warning",
               "The NodeLocal DNSCache of a node fails DNS.",
               f"""The NodeLocal DNSCache at {{{{ $labels.address }}}} on node {{{{
               $labels.node }}}} failed {{{{ $value | humanizePercentage }}}} of its {{{{
               $labels.protocol }}}} probes over the last {c.window}. The pods of that node
               resolve through it and lose DNS, whatever CoreDNS does: look at the
               node-local-dns pod of that node. Never remediated by restarting CoreDNS."""),
        _alert(c, "CoreDNSProbeLatencyHigh",
               f'{P99}{{kind=~"pod|service"}} > {c.latency_p99_seconds}',
               c.for_latency, "warning",
               "CoreDNS answers slowly.",
               f"""99th percentile latency of {{{{ $labels.protocol }}}} DNS at {{{{
               $labels.kind }}}} {{{{ $labels.address }}}} ({{{{ $labels.pod }}}}) is {{{{
               $value | humanizeDuration }}}} over the last {c.latency_window} (threshold
               {c.latency_p99_seconds}s)."""),
        _alert(c, "CoreDNSWrongAnswers",
               f"""sum without ({keep}) (rate(dnsprobe_probes_total{{{s},
               result="wrong_answer"}}[{c.window}])) > 0""",
               c.for_wrong_answer, "warning",
               "CoreDNS gives wrong answers.",
               f"""{{{{ $labels.kind }}}} {{{{ $labels.address }}}} ({{{{ $labels.pod }}}})
               keeps answering with records other than the expected ones (for the
               kubernetes query: the ClusterIP of default/kubernetes), {{{{ printf "%.2f"
               $value }}}} per second over the last {c.window}: a stale cache, a wrong
               upstream or a broken Corefile."""),
        _alert(c, "CoreDNSHealthExporterDown",
               f"up{{{s}}} == 0", c.for_exporter, "warning",
               "The CoreDNS health exporter cannot be scraped.",
               """Prometheus cannot scrape {{ $labels.instance }}: cluster DNS is not being
               watched from there."""),
        _alert(c, "CoreDNSHealthExporterAbsent",
               f"absent(up{{{s}}})", c.for_absent, "warning",
               "The CoreDNS health exporter has vanished from Prometheus.",
               """Prometheus has no scrape target for the CoreDNS health exporter at all:
               its Deployment is scaled to 0 or deleted, or the ServiceMonitor (scrape
               config) no longer selects it. Cluster DNS is not being watched, and no other
               alert of this exporter can fire."""),
        _alert(c, "CoreDNSHealthExporterNoTargets",
               f"""up{{{s}}} == 1 unless on (instance)
               (count by (instance) (dnsprobe_success{{{s}}}) > 0)""",
               c.for_no_targets, "warning",
               "The CoreDNS health exporter probes nothing.",
               """{{ $labels.instance }} is up but exports no probe results: discovery has
               not found the CoreDNS Service or its pods (check --namespace/--service and its
               log), or it lacks the permissions to list them."""),
        _alert(c, "CoreDNSHealthExporterDiscoveryFailing",
               f"""sum without (instance, reason) (rate(dnsprobe_kubernetes_errors_total{{{s}}}
               [{c.window}])) > 0""",
               c.for_discovery, "warning",
               "The CoreDNS health exporter keeps failing to talk to the Kubernetes API.",
               """Discovery of {{ $labels.resource }} has failed for a while; probing goes
               on with the targets known, but new or replaced CoreDNS pods are not seen. Its
               log names the error (a 403 names the missing permission)."""),
        _alert(c, "CoreDNSRemediationFailing",
               f"""sum without (instance) (increase(dnsprobe_remediations_total{{{s},
               action!="skip", result!="success"}}[{c.remediation_window}]))
               >= {c.remediation_failures}""",
               "0s", "warning",
               "Restarts of sick CoreDNS pods keep failing or being blocked.",
               f"""{{{{ $value | humanize }}}} remediation attempts ended {{{{ $labels.result
               }}}} (action {{{{ $labels.action }}}}) in the last {c.remediation_window}: a
               PodDisruptionBudget refuses evictions, or permissions are missing. The sick
               pod is still serving (badly)."""),
    ]
    recording_group: dict[str, Any] = {"name": "coredns-health-exporter.rules",
                                       "rules": recording}
    alert_group: dict[str, Any] = {"name": "coredns-health-exporter.alerts", "rules": alerts}
    if c.interval:
        recording_group["interval"] = alert_group["interval"] = c.interval
    return {"groups": [recording_group, alert_group]}


HEADER = ("# Generated by `python -m alerts.generate` from alerts/generate.py: edit that,\n"
          "# not this file (a test checks they agree).\n")


def render(c: Config = Config()) -> str:
    return HEADER + yaml.safe_dump(rules(c), sort_keys=False, width=100)


def render_prometheus_rule(c: Config = Config()) -> str:
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "coredns-health-exporter", "namespace": "coredns-health-exporter",
                     "labels": {"app.kubernetes.io/name": "coredns-health-exporter"}},
        "spec": rules(c),
    }
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m alerts.generate")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated file is not up to date")
    args = parser.parse_args(argv)
    outputs = {OUTPUT: render(), PROMETHEUS_RULE: render_prometheus_rule(),
               CHART_RULES: render()}
    stale = [p for p, text in outputs.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python -m alerts.generate", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
