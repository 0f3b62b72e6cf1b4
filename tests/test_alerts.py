"""The shipped rules: generated from one source, valid for real promtool, unit-tested at
every `for:` boundary, and each alert with a runbook entry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from alerts.generate import MIXIN_ALERTS, OUTPUT, Config, render, rules
from tests.harness.components import MONITORING_BIN, missing, monitoring_missing

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted((ROOT / "alerts" / "tests").glob("*.yaml"))
ALERTS = [r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r]


def promtool() -> str:
    """Prometheus 3's own promtool (scripts/install-monitoring-tools)."""
    reason = monitoring_missing("promtool")
    if reason:
        missing("promtool", reason)
    return str(MONITORING_BIN / "promtool")


def test_committed_rules_are_what_the_generator_makes() -> None:
    assert OUTPUT.read_text() == render(), "run: python -m alerts.generate"


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(OUTPUT)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    total = sum(len(g["rules"]) for g in rules()["groups"])
    assert f"SUCCESS: {total} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = subprocess.run([promtool(), "test", "rules", *map(str, TESTS)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(TESTS)


def test_every_alert_fires_in_a_unit_test_and_is_checked_before_its_for() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(ALERTS)
    assert quiet >= set(ALERTS) - {"CoreDNSRemediationFailing"}  # the one without a `for:`


def test_every_alert_has_a_runbook_section() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = set(re.findall(r"^## (\S+)$", runbook, re.M))
    for alert in rules()["groups"][1]["rules"]:
        url = alert["annotations"]["runbook_url"]
        assert url.endswith(f"runbook.md#{alert['alert'].lower()}")
        assert alert["alert"].lower() in anchors, f"docs/runbook.md lacks ## {alert['alert']}"
        assert alert["labels"]["severity"] in ("warning", "critical", "info")


def test_thresholds_and_selectors_change_in_one_place() -> None:
    custom = rules(Config(selector='job="dns"', window="30s", for_pod="1m"))
    text = yaml.safe_dump(custom)
    assert 'job="coredns-health-exporter"' not in text
    assert "[30s]" in text and "[2m]" not in text
    pod_alert = next(r for r in custom["groups"][1]["rules"]
                     if r["alert"] == "CoreDNSPodUDPFailing")
    assert pod_alert["for"] == "1m"


@pytest.mark.parametrize("alert", ALERTS)
def test_alert_names_follow_the_mixin_style(alert: str) -> None:
    assert re.fullmatch(r"CoreDNS[A-Z][A-Za-z]+", alert)


def test_no_alert_shares_a_name_with_the_coredns_mixin() -> None:
    """The coredns-mixin (in kube-prometheus and kube-prometheus-stack) is installed beside
    these in many clusters: a shared name would merge their silences, routes and runbooks."""
    assert not set(ALERTS) & MIXIN_ALERTS
    assert "CoreDNSLatencyHigh" in MIXIN_ALERTS and "CoreDNSProbeLatencyHigh" in ALERTS


def test_the_per_node_alert_reads_only_the_daemonsets_job() -> None:
    """The Deployment's alerts select its job; the per-node alert the DaemonSet's (whose
    series carry `source_node`), and it never drives the webhook: its alert name differs
    from the one the shipped routes send there."""
    c = Config()
    groups = rules(c)["groups"]
    records = {r["record"]: r["expr"] for r in groups[0]["rules"]}
    for name, expr in records.items():
        selector = c.node_selector if name.startswith("source_node_") else c.selector
        assert selector in expr, (name, expr)
    [alert] = [r for r in groups[1]["rules"] if r["alert"] == "CoreDNSFailingFromNode"]
    assert "source_node_target_protocol:dnsprobe_failure_ratio:rate" in alert["expr"]
    assert "{{ $labels.source_node }}" in alert["annotations"]["description"]
