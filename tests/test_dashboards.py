"""The shipped dashboard: generated from one source, importable (fixed uid, a datasource
variable, every query on it), and every panel's numbers right for 2 replicas, the
DaemonSet overlay and two queries, checked against a real Prometheus 3 fed known series.
Its queries also run against a live Prometheus in test_e2e.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from dashboards.generate import OUTPUT, UID, dashboard, render
from tests.harness.components import missing, monitoring_missing
from tests.harness.monitoring import Backfilled


def test_committed_dashboard_is_what_the_generator_makes() -> None:
    assert OUTPUT.read_text() == render(), "run: python -m dashboards.generate"


def test_dashboard_has_a_fixed_uid_and_variables() -> None:
    board = json.loads(OUTPUT.read_text())
    assert board["uid"] == UID
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "service", "pod"]
    assert board["templating"]["list"][0]["query"] == "prometheus"


def test_every_panel_uses_the_datasource_variable_and_has_a_unique_place() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert "dnsprobe_" in target["expr"]
    places = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}
    assert len(places) == len(panels)


# -- every panel's numbers, from a real Prometheus fed known series ---------------------------

# Two Deployment replicas and a DaemonSet exporter on each of two nodes, every one probing
# three CoreDNS pods and the Service with two queries over both protocols. coredns-c's UDP
# fails from node n2 only: the central view sees every pod answer; the per-node view sees
# one (node, pod) path fail.
CENTRAL = [("coredns-health-exporter", "10.244.0.9:9953", ""),
           ("coredns-health-exporter", "10.244.1.9:9953", "")]
PER_NODE = [("coredns-health-exporter-node", "10.244.0.8:9953", "n1"),
            ("coredns-health-exporter-node", "10.244.1.8:9953", "n2")]
COREDNS = {"coredns-a": ("n1", "10.244.0.2:53"), "coredns-b": ("n2", "10.244.1.2:53"),
           "coredns-c": ("n1", "10.244.0.3:53")}
QUERIES = ("kubernetes", "example.org")
STEP, SPAN = 15.0, 600.0  # a scrape every 15 s for 10 minutes; probes every 5 s


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items() if v) + "}"


def ramp(per_scrape: float, start: float) -> Callable[[int], float]:
    """The value at the i-th scrape: a gauge (per_scrape 0) or a counter's growth."""
    return lambda i: start + per_scrape * i


def known_series(end: float) -> dict[str, list[tuple[float, float]]]:
    times = [end - SPAN + i * STEP for i in range(int(SPAN / STEP) + 1)]
    series: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, value: Callable[[int], float], **labels: str) -> None:
        series[name + _labels(**labels)] = [(t, value(i)) for i, t in enumerate(times)]

    for job, instance, source_node in CENTRAL + PER_NODE:
        scrape = {"job": job, "instance": instance, "source_node": source_node}
        add("dnsprobe_build_info", lambda i: 1, **scrape, version="0.1.0")
        add("dnsprobe_discovery_synced", lambda i: 1, **scrape)
        targets = [("service", "", "", "10.96.0.10:53")] + [
            ("pod", pod, node, address) for pod, (node, address) in COREDNS.items()]
        for kind, pod, node, address in targets:
            target = {**scrape, "kind": kind, "namespace": "kube-system",
                      "service": "kube-dns", "pod": pod, "node": node, "address": address}
            if kind == "pod":
                add("dnsprobe_target_info", lambda i: 1, **target, ready="true")
            for protocol in ("udp", "tcp"):
                dead = source_node == "n2" and pod == "coredns-c" and protocol == "udp"
                for query in QUERIES:
                    probe = {**target, "protocol": protocol, "query": query}
                    add("dnsprobe_success", ramp(0, 0 if dead else 1), **probe)
                    for result in ("success", "timeout"):
                        counts = (result == "timeout") == dead
                        add("dnsprobe_probes_total", ramp(3 if counts else 0, 0),
                            **probe, result=result)
                    if not dead:  # every answer within 5 ms
                        for le in ("0.005", "0.01", "+Inf"):
                            add("dnsprobe_duration_seconds_bucket", lambda i: 3 * i,
                                **probe, le=le)
    # One decision, by one replica, 30 s before the end.
    add("dnsprobe_remediations_total", lambda i: 1 if times[i] >= end - 30 else 0,
        job="coredns-health-exporter", instance=CENTRAL[0][1], action="dry-run",
        result="success")
    return series


def _expr(expr: str) -> str:
    """A panel's query as Grafana sends it with every variable at All."""
    for variable in ("namespace", "service", "pod"):
        expr = expr.replace(f"${variable}", ".*")
    return expr.replace("$__rate_interval", "1m")


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backfilled, float]]:
    reason = monitoring_missing("prometheus", "promtool")
    if reason:
        missing("Prometheus", reason)
    end = float(int(time.time()) - 120)
    prometheus = Backfilled(tmp_path_factory.mktemp("dashboard"), known_series(end))
    try:
        yield prometheus, end
    finally:
        prometheus.stop()


def test_every_panel_counts_pods_not_series(backfilled: tuple[Backfilled, float]) -> None:
    prometheus, end = backfilled
    panels = {p["title"]: p for p in dashboard()["panels"]}

    def results(title: str, ref: str = "A") -> list[tuple[dict[str, str], float]]:
        [target] = [t for t in panels[title]["targets"] if t["refId"] == ref]
        return [({k: v for k, v in r["metric"].items()}, float(r["value"][1]))
                for r in prometheus.query(_expr(target["expr"]), end)]

    def scalar(title: str, ref: str = "A") -> float:
        [(_, number)] = results(title, ref)
        return number

    def by(title: str, *labels: str, ref: str = "A") -> dict[tuple[str, ...], float]:
        got = results(title, ref)
        table = {tuple(m.get(label, "") for label in labels): v for m, v in got}
        assert len(table) == len(got), got  # one series per key: nothing repeats
        return table

    pods = sorted(COREDNS)
    assert by("Service IP answers", "service", "protocol") == {
        ("kube-dns", "udp"): 1, ("kube-dns", "tcp"): 1}
    assert (scalar("Pods answering", "A"), scalar("Pods answering", "B")) == (3, 3)
    assert (scalar("Pods Ready (Kubernetes)", "A"), scalar("Pods Ready (Kubernetes)", "B")) \
        == (3, 3)
    assert by("Success per pod and protocol", "pod", "protocol") == {
        (pod, protocol): 1 for pod in pods for protocol in ("udp", "tcp")}
    assert by("Failure ratio per pod and protocol", "pod", "protocol") == {
        (pod, protocol): 0 for pod in pods for protocol in ("udp", "tcp")}
    assert by("UDP vs TCP disagreement", "pod", "address") == {
        ("", "10.96.0.10:53"): 0, **{(pod, address): 0 for pod, (_, address) in COREDNS.items()}}
    for title in ("Latency p99 per pod", "Latency p50 per pod"):
        latency = by(title, "pod", "protocol")
        assert set(latency) == {(pod, p) for pod in pods for p in ("udp", "tcp")}
        assert all(0 < v <= 0.005 for v in latency.values()), latency
    assert results("Failure reasons") == []  # the central view saw no failure
    [decision] = results("Remediation decisions")
    assert decision[0] == {"action": "dry-run", "result": "success"}
    assert 1 <= decision[1] < 2, decision  # one decision (extrapolated over the window)
    rows = by("Targets", "pod", "node", "address", "ready")
    assert rows == {(pod, node, address, "true"): 1
                    for pod, (node, address) in COREDNS.items()}
    assert [scalar("Exporters", ref) for ref in "ABC"] == [1, 2, 2]
    # The per-node view: 2 nodes x 3 pods, one path failing.
    assert (scalar("Node-to-pod paths failing", "A"),
            scalar("Node-to-pod paths failing", "B")) == (1, 6)
    assert by("Which nodes fail to reach which pods", "source_node", "pod", "protocol") == {
        ("n2", "coredns-c", "udp"): 0}
    assert by("Service IP from each node", "source_node", "protocol") == {
        (node, protocol): 1 for node in ("n1", "n2") for protocol in ("udp", "tcp")}
    assert by("Pods from each node", "source_node", "pod") == {
        (node, pod): 0 if (node, pod) == ("n2", "coredns-c") else 1
        for node in ("n1", "n2") for pod in pods}
    # Every panel was checked above.
    assert len(panels) == 16


PER_NODE_PANELS = {"Node-to-pod paths failing", "Which nodes fail to reach which pods",
                   "Service IP from each node", "Pods from each node"}


def test_central_panels_never_read_the_per_node_series(
        backfilled: tuple[Backfilled, float]) -> None:
    """The central panels select the Deployment's series only: the DaemonSet's (with
    `source_node`) cannot change their counts; the per-node panels read only those."""
    prometheus, end = backfilled
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            per_node = 'source_node!=""' in expr
            assert per_node or panel["title"] not in PER_NODE_PANELS, expr
            if per_node or "dnsprobe_remediations_total" in expr:
                continue  # decisions are the Deployment's alone (the overlay runs with off)
            for series in prometheus.query(_expr(expr), end):
                assert "source_node" not in series["metric"], (panel["title"], series)
