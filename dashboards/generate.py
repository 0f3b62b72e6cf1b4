"""The Grafana dashboard, generated: `python -m dashboards.generate` rewrites
dashboards/coredns-health.json (`--check`: exit 1 if it is out of date).

One dashboard, fixed uid, a `${datasource}` variable and namespace/service/pod variables.
Queries use the exporter's raw series (not the recording rules), so the dashboard works
whether or not the shipped rules are loaded. Every panel's query is run against a real
Prometheus by tests/test_e2e.py.
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
POD = f'{SEL}, pod=~"$pod"'


def _panel(kind: str, title: str, targets: list[tuple[str, str]], x: int, y: int, w: int,
           h: int, unit: str = "", description: str = "", **extra: Any) -> dict[str, Any]:
    panel: dict[str, Any] = {
        "type": kind, "title": title, "description": description, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend,
                     "refId": chr(ord("A") + i)} for i, (expr, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    panel.update(extra)
    return panel


def panels() -> list[dict[str, Any]]:
    ok_map = {"mappings": [{"type": "value", "options": {
        "0": {"text": "FAILING", "color": "red"}, "1": {"text": "OK", "color": "green"}}}]}
    p = [
        _panel("stat", "Service IP answers",
               [(f'min by (service, protocol) (dnsprobe_success{{kind="service", {SEL}}})',
                 "{{service}} {{protocol}}")], 0, 0, 8, 5,
               description="The CoreDNS Service IP, probed as clients use it. FAILING here "
                           "is a cluster-wide DNS outage.",
               fieldConfig={"defaults": ok_map, "overrides": []}),
        _panel("stat", "Pods answering",
               [(f'count(dnsprobe_success{{kind="pod", protocol="udp", {POD}}} == 1)',
                 "answering UDP"),
                (f'count(dnsprobe_target_info{{{POD}}})', "pods")], 8, 0, 8, 5),
        _panel("stat", "Pods Ready (Kubernetes)",
               [(f'count by (ready) (dnsprobe_target_info{{{POD}}})', "ready={{ready}}")],
               16, 0, 8, 5,
               description="The pods' Ready condition, as the API says: compare with the "
                           "pods answering DNS."),
        _panel("state-timeline", "Success per pod and protocol",
               [(f'dnsprobe_success{{kind="pod", {POD}}}', "{{pod}} {{protocol}}")],
               0, 5, 24, 8, fieldConfig={"defaults": ok_map, "overrides": []}),
        _panel("timeseries", "Failure ratio per pod and protocol",
               [(f'1 - sum by (pod, protocol) (rate(dnsprobe_probes_total{{kind="pod", '
                 f'result="success", {POD}}}[$__rate_interval])) / sum by (pod, protocol) '
                 f'(rate(dnsprobe_probes_total{{kind="pod", {POD}}}[$__rate_interval]))',
                 "{{pod}} {{protocol}}")], 0, 13, 12, 8, unit="percentunit"),
        _panel("timeseries", "UDP vs TCP disagreement",
               [(f'sum by (pod, address) (dnsprobe_success{{protocol="tcp", {POD}}}) - '
                 f'sum by (pod, address) (dnsprobe_success{{protocol="udp", {POD}}})',
                 "{{pod}} {{address}}")], 12, 13, 12, 8,
               description="1: TCP answers while UDP does not (UDP/53 blocked or stuck); "
                           "-1: the other way round; 0: they agree."),
        _panel("timeseries", "Latency p99 per pod",
               [(f'histogram_quantile(0.99, sum by (le, pod, protocol) (rate('
                 f'dnsprobe_duration_seconds_bucket{{{POD}}}[$__rate_interval])))',
                 "{{pod}} {{protocol}}")], 0, 21, 12, 8, unit="s"),
        _panel("timeseries", "Latency p50 per pod",
               [(f'histogram_quantile(0.5, sum by (le, pod, protocol) (rate('
                 f'dnsprobe_duration_seconds_bucket{{{POD}}}[$__rate_interval])))',
                 "{{pod}} {{protocol}}")], 12, 21, 12, 8, unit="s"),
        _panel("timeseries", "Failure reasons",
               [(f'sum by (result, protocol) (rate(dnsprobe_probes_total{{result!="success", '
                 f'{POD}}}[$__rate_interval])) > 0', "{{result}} {{protocol}}")],
               0, 29, 12, 8, unit="ops",
               description="Probes by outcome other than success: timeout (dropped), "
                           "unreachable (nothing listening), rcode, wrong_answer, truncated."),
        _panel("timeseries", "Remediation decisions",
               [('sum by (action, result) (increase(dnsprobe_remediations_total'
                 '[$__rate_interval])) > 0', "{{action}} {{result}}")],
               12, 29, 12, 8,
               description="Every decision of the webhook: evictions, dry runs, and skips "
                           "with their reason."),
        _panel("table", "Targets",
               [(f'dnsprobe_target_info{{{POD}}}', "")], 0, 37, 16, 8,
               options={"showHeader": True},
               transformations=[{"id": "labelsToFields", "options": {}}]),
        _panel("stat", "Exporter",
               [('min(dnsprobe_discovery_synced)', "discovery synced"),
                ('count(dnsprobe_build_info)', "exporters")], 16, 37, 8, 8),
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
        "timezone": "", "schemaVersion": 39, "version": 1, "editable": True,
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
