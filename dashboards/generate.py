"""The Grafana dashboard, generated: `python -m dashboards.generate` rewrites
dashboards/coredns-health.json (`--check`: exit 1 if it is out of date).

One dashboard, fixed uid, a `${datasource}` variable and namespace/service/pod variables.
Queries use the exporter's raw series (not the recording rules), so the dashboard works
whether or not the shipped rules are loaded. Counts are of CoreDNS pods, not of series:
every exporter replica probes every target with every query, so each panel first reduces
to one series per pod (min: a pod answers only if every replica's probe passed). The
central panels read the Deployment's series (no `source_node`), the per-node panels the
DaemonSet overlay's. tests/test_dashboards.py checks every panel's numbers against a real
Prometheus fed known series; tests/test_e2e.py runs every query against a live one.

Built by hand as plain data rather than with grafana-foundation-sdk: the dashboard is 16
panels of a few fields each, the numbers are what needs proving, and the SDK's Python
package would add a dependency whose releases follow Grafana's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("coredns-health.json")
UID = "coredns-health-exporter"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", service=~"$service"'
# The central view: the Deployment's replicas (all probe every target; their series carry no
# `source_node`). The per-node view: the DaemonSet overlay's, one exporter per node, each
# series labelled with the node it was sent from (`source_node`, set at scrape time).
CENTRAL = 'source_node=""'
NODES = 'source_node!=""'
POD = f'{SEL}, pod=~"$pod", {CENTRAL}'
NODE_POD = f'{SEL}, pod=~"$pod", {NODES}'
# One series per CoreDNS pod, whatever the number of replicas and queries: the pod answers
# (1) only if every replica's every query of it passed.
PER_POD = "namespace, service, pod"


def _panel(kind: str, title: str, targets: list[tuple[str, str]], x: int, y: int, w: int,
           h: int, unit: str = "", description: str = "", instant: bool = False,
           **extra: Any) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    if instant:  # a table of the latest values, one row per series
        for target in panel["targets"]:
            target.update({"instant": True, "range": False, "format": "table"})
    panel.update(extra)
    return panel


def panels() -> list[dict[str, Any]]:
    ok_map = {"mappings": [{"type": "value", "options": {
        "0": {"text": "FAILING", "color": "red"}, "1": {"text": "OK", "color": "green"}}}]}
    ok = {"defaults": ok_map, "overrides": []}
    udp_per_pod = f'min by ({PER_POD}) (dnsprobe_success{{kind="pod", protocol="udp", {POD}}})'
    pods = f"max by ({PER_POD}) (dnsprobe_target_info{{{POD}}})"
    p = [
        _panel("stat", "Service IP answers",
               [(f'min by (service, protocol) (dnsprobe_success{{kind="service", {SEL}, '
                 f'{CENTRAL}}})', "{{service}} {{protocol}}")], 0, 0, 8, 5,
               description="The CoreDNS Service IP, probed as clients use it. FAILING here "
                           "is a cluster-wide DNS outage.", fieldConfig=ok),
        _panel("stat", "Pods answering",
               [(f"count({udp_per_pod} == 1) or vector(0)", "answering UDP"),
                (f"count({pods}) or vector(0)", "pods")], 8, 0, 8, 5,
               description="CoreDNS pods whose every UDP probe passed (every exporter "
                           "replica, every query), of the pods behind the Service."),
        _panel("stat", "Pods Ready (Kubernetes)",
               [(f'count(max by ({PER_POD}) (dnsprobe_target_info{{ready="true", {POD}}})) '
                 f"or vector(0)", "Ready"),
                (f"count({pods}) or vector(0)", "pods")], 16, 0, 8, 5,
               description="The pods' Ready condition, as the API says: compare with the "
                           "pods answering DNS."),
        _panel("state-timeline", "Success per pod and protocol",
               [(f'min by (pod, protocol) (dnsprobe_success{{kind="pod", {POD}}})',
                 "{{pod}} {{protocol}}")], 0, 5, 24, 8, fieldConfig=ok),
        _panel("timeseries", "Failure ratio per pod and protocol",
               [(f'1 - sum by (pod, protocol) (rate(dnsprobe_probes_total{{kind="pod", '
                 f'result="success", {POD}}}[$__rate_interval])) / sum by (pod, protocol) '
                 f'(rate(dnsprobe_probes_total{{kind="pod", {POD}}}[$__rate_interval]))',
                 "{{pod}} {{protocol}}")], 0, 13, 12, 8, unit="percentunit"),
        _panel("timeseries", "UDP vs TCP disagreement",
               [(f'min by (pod, address) (dnsprobe_success{{protocol="tcp", {POD}}}) - '
                 f'min by (pod, address) (dnsprobe_success{{protocol="udp", {POD}}})',
                 "{{pod}} {{address}}")], 12, 13, 12, 8,
               description="1: TCP answers while UDP does not (UDP/53 blocked or stuck); "
                           "-1: the other way round; 0: they agree."),
        _panel("timeseries", "Latency p99 per pod",
               [(f'histogram_quantile(0.99, sum by (le, pod, protocol) (rate('
                 f'dnsprobe_duration_seconds_bucket{{kind="pod", {POD}}}[$__rate_interval])))',
                 "{{pod}} {{protocol}}")], 0, 21, 12, 8, unit="s"),
        _panel("timeseries", "Latency p50 per pod",
               [(f'histogram_quantile(0.5, sum by (le, pod, protocol) (rate('
                 f'dnsprobe_duration_seconds_bucket{{kind="pod", {POD}}}[$__rate_interval])))',
                 "{{pod}} {{protocol}}")], 12, 21, 12, 8, unit="s"),
        _panel("timeseries", "Failure reasons",
               [(f'sum by (result, protocol) (rate(dnsprobe_probes_total{{result!="success", '
                 f'{POD}}}[$__rate_interval])) > 0', "{{result}} {{protocol}}")],
               0, 29, 12, 8, unit="ops",
               description="Probes per second by outcome other than success, summed over "
                           "the exporter replicas: timeout (dropped), unreachable (nothing "
                           "listening), rcode, wrong_answer, truncated."),
        _panel("timeseries", "Remediation decisions",
               [('sum by (action, result) (increase(dnsprobe_remediations_total'
                 '[$__rate_interval])) > 0', "{{action}} {{result}}")],
               12, 29, 12, 8,
               description="Every decision of the webhook: evictions, dry runs, and skips "
                           "with their reason."),
        _panel("table", "Targets",
               [(f"max by ({PER_POD}, node, address, ready) (dnsprobe_target_info{{{POD}}})",
                 "")], 0, 37, 16, 8, instant=True,
               description="One row per CoreDNS pod (the replicas agree; a pod changing "
                           "Ready shows twice for a scrape).",
               options={"showHeader": True}),
        _panel("stat", "Exporters",
               [('min(dnsprobe_discovery_synced)', "discovery synced"),
                (f'count(dnsprobe_build_info{{{CENTRAL}}}) or vector(0)', "replicas"),
                (f'count(dnsprobe_build_info{{{NODES}}}) or vector(0)', "per node")],
               16, 37, 8, 8,
               description="The exporters scraped: the Deployment's replicas and the "
                           "DaemonSet's per-node ones (0 without the overlay)."),
        # -- per node (the DaemonSet overlay) --
        _panel("stat", "Node-to-pod paths failing",
               [(f'count(min by (source_node, {PER_POD}) (dnsprobe_success{{kind="pod", '
                 f"{NODE_POD}}}) == 0) or vector(0)", "failing"),
                (f'count(min by (source_node, {PER_POD}) (dnsprobe_success{{kind="pod", '
                 f"{NODE_POD}}})) or vector(0)", "paths")], 0, 45, 8, 8,
               description="(node, CoreDNS pod) pairs where a probe from that node to "
                           "that pod failed, of all pairs. Needs the DaemonSet overlay."),
        _panel("table", "Which nodes fail to reach which pods",
               [(f'min by (source_node, {PER_POD}, protocol) (dnsprobe_success{{kind="pod", '
                 f"{NODE_POD}}}) == 0", "")], 8, 45, 16, 8, instant=True,
               description="One row per (node, pod, protocol) that fails; empty when every "
                           "node reaches every pod.", options={"showHeader": True}),
        _panel("state-timeline", "Service IP from each node",
               [(f'min by (source_node, protocol) (dnsprobe_success{{kind="service", {SEL}, '
                 f"{NODES}}})", "{{source_node}} {{protocol}}")], 0, 53, 24, 8,
               fieldConfig=ok,
               description="The Service IP probed from each node (kube-proxy's rules on "
                           "that node): one node FAILING while others are OK is that "
                           "node's problem, not CoreDNS's."),
        _panel("state-timeline", "Pods from each node",
               [(f'min by (source_node, pod) (dnsprobe_success{{kind="pod", {NODE_POD}}})',
                 "{{source_node}} → {{pod}}")], 0, 61, 24, 8, fieldConfig=ok),
    ]
    for i, panel in enumerate(p, 1):
        panel["id"] = i
    return p


def _variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID, "title": "CoreDNS health", "tags": ["coredns", "dns", "kubernetes"],
        "timezone": "", "schemaVersion": 42, "version": 1, "editable": True,
        "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "description": "CoreDNS probed over UDP and TCP by coredns-health-exporter: per "
                       "Service IP and per pod.",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            _variable("namespace", "label_values(dnsprobe_success, namespace)", "Namespace"),
            _variable("service", 'label_values(dnsprobe_success{namespace=~"$namespace"}, '
                                 "service)", "Service"),
            _variable("pod", "label_values(dnsprobe_target_info{namespace=~\"$namespace\", "
                             "service=~\"$service\"}, pod)", "Pod"),
        ]},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != render():
            print(f"{OUTPUT} is out of date: run python -m dashboards.generate",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
