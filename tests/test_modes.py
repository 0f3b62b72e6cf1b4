"""The four ways to reach CoreDNS, and `--mode auto` choosing among them.

Against the real test cluster: the exporter runs in a namespace outside the cluster
network (it reaches the API server and the node's outside address, no pod or Service IP),
with credentials that allow exactly one mode, and must pick that mode, probe through it
and export correct series. Pod logs and port-forwards go through the real API server
(its RBAC, its proxying) to the stand-in kubelet of tests/harness/kubelet.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from exporter import kube
from exporter.probepod import LABELS, ProbePod
from tests.conftest import LabExporter
from tests.harness.cluster import KUBERNETES_CLUSTER_IP
from tests.harness.exporter import Exporter
from tests.harness.kubelet import TEST_IMAGE
from tests.harness.lab import LB_ADDRESS, NODE_OUTSIDE, Lab
from tests.harness.scrape import samples, scrape_until, wait_until

FAST = ["--interval", "1", "--timeout", "0.5"]
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# The credentials of each mode are the ones deploy/outside/ ships.
OUTSIDE = DEPLOY / "outside"


def success(body: str, **labels: str) -> dict[tuple[str, ...], float]:
    """dnsprobe_success by (kind, pod or service, node, address, protocol)."""
    found: dict[tuple[str, ...], float] = {}
    for s in samples(body):
        if s.name == "dnsprobe_success" and all(s.labels.get(k) == v
                                                for k, v in labels.items()):
            key = (s.labels["kind"], s.labels["pod"] or s.labels["service"], s.labels["node"],
                   s.labels["address"], s.labels["protocol"])
            found[key] = s.value
    return found


def mode_of(body: str) -> list[str]:
    return [s.labels["mode"] for s in samples(body)
            if s.name == "dnsprobe_mode_info" and s.value == 1]


def chosen(exporter: Exporter) -> dict[str, Any]:
    records = exporter.logged("mode chosen", timeout=30)
    assert records, exporter.raw
    return records[0]


def start_outside(lab: Lab, lab_exporter: LabExporter, token: str, *args: str) -> Exporter:
    return lab_exporter(token, "--mode", "auto", *FAST, *args, netns=lab.outside())


async def test_auto_picks_nodeport_when_only_services_and_nodes_may_be_read(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    pods = [lab.add_pod(), lab.add_pod()]
    lab.create_service()
    lab.outside()
    lab.ensure_node("node-a")
    lab.create_exposed_service("NodePort", "kube-dns-nodeport")
    lab.create_exposed_service("LoadBalancer", "kube-dns-lb", ("UDP",))
    token = lab.apply_deploy_rbac(OUTSIDE / "nodeport.yaml")

    exporter = start_outside(lab, lab_exporter, token)
    decision = chosen(exporter)
    assert decision["mode"] == "nodeport", decision
    assert "not allowed to list pods" in decision["skipped"]["in-cluster"]

    def complete(body: str) -> bool:
        got = success(body)
        return all(got.get(k) == 1 for k in wanted)

    nodeport = lab.raw.request(
        "GET", f"/api/v1/namespaces/{lab.namespace}/services/kube-dns-nodeport")
    ports = {p["protocol"].lower(): p["nodePort"] for p in nodeport["spec"]["ports"]}
    wanted = [("nodeport", "kube-dns-nodeport", "node-a", f"{NODE_OUTSIDE}:{port}", proto)
              for proto, port in ports.items()]
    lb = lab.raw.request("GET", f"/api/v1/namespaces/{lab.namespace}/services/kube-dns-lb")
    [lb_node_port] = [p["nodePort"] for p in lb["spec"]["ports"]]
    wanted.append(("loadbalancer", "kube-dns-lb", "", f"{LB_ADDRESS}:53", "udp"))
    # The LB's own node port, the path a cloud load balancer forwards to, is probed too.
    wanted.append(("nodeport", "kube-dns-lb", "node-a", f"{NODE_OUTSIDE}:{lb_node_port}", "udp"))
    body = await scrape_until(exporter.url, complete)
    got = success(body)
    assert all(got.get(k) == 1 for k in wanted), got
    # Each node port is probed over its own protocol only; no pod is probed from here.
    assert not [k for k in got if k[0] == "nodeport" and k[3].endswith(
        str(ports["tcp" if k[4] == "udp" else "udp"])) and ports["udp"] != ports["tcp"]]
    assert not success(body, kind="pod") and not success(body, kind="service")
    assert not success(body, kind="loadbalancer", protocol="tcp")  # a UDP-only LB
    assert not success(body, kind="nodeport", service="kube-dns-lb", protocol="tcp")
    assert mode_of(body) == ["nodeport"]

    # A pod that stops answering UDP fails the node-port UDP probes that reach it.
    for pod in pods:
        pod.netns.drop("udp", 53)
    def udp_failing(body: str) -> bool:
        udp = success(body, kind="nodeport", protocol="udp", node="node-a")
        return bool(udp) and all(v == 0 for v in udp.values())

    body = await scrape_until(exporter.url, udp_failing)
    assert all(v == 0 for v in success(body, kind="nodeport", protocol="udp",
                                       node="node-a").values())
    assert all(v == 1 for v in success(body, kind="nodeport", protocol="tcp",
                                       node="node-a").values())


async def test_auto_picks_probe_pod_when_pods_may_be_created(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    lab.start_kubelet()
    healthy, udp_dead = lab.add_pod(), lab.add_pod()
    udp_dead.netns.drop("udp", 53)
    cluster_ip = lab.create_service()
    token = lab.apply_deploy_rbac(OUTSIDE / "probe-pod.yaml")

    exporter = start_outside(lab, lab_exporter, token, "--probe-pod-namespace", lab.namespace,
                             "--probe-pod-image", TEST_IMAGE)
    decision = chosen(exporter)
    assert decision["mode"] == "probe-pod", decision
    assert "answered DNS from here" in decision["skipped"]["in-cluster"]
    assert "not allowed to list nodes" in decision["skipped"]["nodeport"]

    wanted = {
        ("pod", healthy.name, "node-a", f"{healthy.ip}:53", "udp"): 1.0,
        ("pod", healthy.name, "node-a", f"{healthy.ip}:53", "tcp"): 1.0,
        ("pod", udp_dead.name, "node-a", f"{udp_dead.ip}:53", "udp"): 0.0,
        ("pod", udp_dead.name, "node-a", f"{udp_dead.ip}:53", "tcp"): 1.0,
        ("service", "kube-dns", "", f"{cluster_ip}:53", "tcp"): 1.0,
    }
    body = await scrape_until(
        exporter.url, lambda b: all(success(b).get(k) == v for k, v in wanted.items()),
        deadline=60)
    got = success(body)
    assert all(got.get(k) == v for k, v in wanted.items()), got
    assert mode_of(body) == ["probe-pod"]
    assert next(s.value for s in samples(body) if s.name == "dnsprobe_probe_pod_runs_total"
                and s.labels["result"] == "success") >= 1
    # The expectation read from the API went into the pod: the default query passed.
    assert any(s.labels["query"] == "kubernetes" for s in samples(body)
               if s.name == "dnsprobe_success")

    # Every probe pod is deleted once read; none is left when the exporter stops.
    exporter.stop()
    selector = ",".join(f"{k}={v}" for k, v in LABELS.items())

    def no_probe_pods() -> bool:
        return not lab.core.list_namespaced_pod(lab.namespace, label_selector=selector).items

    assert await wait_until(no_probe_pods, 30)


async def test_a_failed_probe_pod_round_is_counted_said_and_leaves_no_stale_series(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    lab.add_pod()
    lab.create_service()  # no kubelet: the probe pod never runs
    token = lab.apply_deploy_rbac(OUTSIDE / "probe-pod.yaml")
    exporter = start_outside(lab, lab_exporter, token, "--mode", "probe-pod",
                             "--probe-pod-namespace", lab.namespace)
    selector = ",".join(f"{k}={v}" for k, v in LABELS.items())
    names: list[str] = []

    def probe_pod_exists() -> bool:
        names[:] = [p.metadata.name for p in lab.core.list_namespaced_pod(
            lab.namespace, label_selector=selector).items]
        return bool(names)

    assert await wait_until(probe_pod_exists, 30)
    lab.core.delete_namespaced_pod(names[0], lab.namespace, grace_period_seconds=0)
    [warning] = exporter.logged("probe pod round failed; the checks have no results until "
                                "a round succeeds", timeout=30)
    assert "was deleted before it ended" in warning["error"]
    body = await scrape_until(exporter.url, lambda b: True)
    failed = [s.value for s in samples(body) if s.name == "dnsprobe_probe_pod_runs_total"
              and s.labels["result"] == "failed"]
    assert failed == [1.0]
    assert not success(body)  # nothing was probed: no series claims otherwise


async def test_probe_pod_leftovers_of_this_instance_are_removed(lab: Lab) -> None:
    client = kube.Client.connect(str(lab.cluster.admin_kubeconfig))
    from exporter.config import load

    settings = load(["--probe-pod-namespace", lab.namespace])
    runner = ProbePod(settings, client)
    lab.core.create_namespaced_pod(lab.namespace, {
        "metadata": {"name": "dnsprobe-left", "labels": {
            **LABELS, "dnsprobe.io/instance": runner.instance}},
        "spec": {"containers": [{"name": "probe", "image": "other"}]}})
    lab.core.create_namespaced_pod(lab.namespace, {
        "metadata": {"name": "dnsprobe-another", "labels": {
            **LABELS, "dnsprobe.io/instance": "someone-else"}},
        "spec": {"containers": [{"name": "probe", "image": "other"}]}})
    await asyncio.to_thread(runner._remove_leftovers)
    left = {p.metadata.name for p in lab.core.list_namespaced_pod(lab.namespace).items
            if p.metadata.deletion_timestamp is None}
    # Another replica's young pod may be mid-round: it is left to that replica.
    assert left == {"dnsprobe-another"}
    client.close()


async def test_auto_picks_port_forward_when_only_pods_may_be_forwarded(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    lab.start_kubelet()
    healthy, tcp_dead, stopped = lab.add_pod(), lab.add_pod(), lab.add_pod()
    tcp_dead.netns.drop("tcp", 53)
    stopped.server.stop()  # nothing listens: the kubelet's connect is refused
    lab.create_service()
    token = lab.apply_deploy_rbac(OUTSIDE / "port-forward.yaml")

    exporter = start_outside(lab, lab_exporter, token)
    decision = chosen(exporter)
    assert decision["mode"] == "port-forward", decision
    assert "not allowed to create pods" in decision["skipped"]["probe-pod"]
    assert "UDP cannot be forwarded" in decision["means"]

    wanted = {
        ("pod", healthy.name, "node-a", f"{healthy.ip}:53", "tcp"): 1.0,
        ("pod", tcp_dead.name, "node-a", f"{tcp_dead.ip}:53", "tcp"): 0.0,
        ("pod", stopped.name, "node-a", f"{stopped.ip}:53", "tcp"): 0.0,
    }
    body = await scrape_until(
        exporter.url, lambda b: all(success(b).get(k) == v for k, v in wanted.items()))
    got = success(body)
    assert got == wanted, got  # TCP alone, pods alone: nothing else is claimed
    assert mode_of(body) == ["port-forward"]
    dead = [s for s in samples(body) if s.name == "dnsprobe_probes_total"
            and s.labels["pod"] == tcp_dead.name and s.value > 0]
    assert {s.labels["result"] for s in dead} == {"timeout"}
    refused = [s for s in samples(body) if s.name == "dnsprobe_probes_total"
               and s.labels["pod"] == stopped.name and s.value > 0]
    assert {s.labels["result"] for s in refused} == {"unreachable"}
    latency = [s for s in samples(body) if s.name == "dnsprobe_duration_seconds_count"
               and s.labels["pod"] == healthy.name]
    assert latency and latency[0].value >= 1


async def test_auto_picks_in_cluster_where_pod_ips_answer(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    pod = lab.add_pod()
    lab.create_service()
    token = lab.apply_deploy_rbac(DEPLOY / "base" / "rbac.yaml")
    exporter = lab_exporter(token, "--mode", "auto", *FAST)  # in the node namespace
    decision = chosen(exporter)
    assert decision["mode"] == "in-cluster", decision
    assert "answered over" in decision["reason"]
    body = await scrape_until(exporter.url, lambda b: success(b, kind="pod", protocol="udp")
                              .get(("pod", pod.name, "node-a", f"{pod.ip}:53", "udp")) == 1)
    assert success(body, kind="pod")[("pod", pod.name, "node-a", f"{pod.ip}:53", "udp")] == 1
    assert mode_of(body) == ["in-cluster"]


async def test_no_mode_allowed_is_said_and_retried_not_a_crash(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    lab.add_pod()
    lab.create_service()
    token = lab.service_account_token("nothing", [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}])
    exporter = start_outside(lab, lab_exporter, token)
    records = exporter.logged(
        "no mode can reach CoreDNS with these credentials from here; trying again "
        "(see docs/modes.md)", timeout=30)
    assert records, exporter.raw
    reasons = records[0]["reasons"]
    for mode in ("in-cluster", "nodeport", "probe-pod", "port-forward"):
        assert f"{mode}: not allowed to" in reasons
    assert exporter.process.poll() is None  # still serving, not ready
    body = await scrape_until(exporter.url, lambda b: True)
    assert mode_of(body) == []


def test_check_json_through_probe_pod_labels_results_as_direct(lab: Lab) -> None:
    lab.start_kubelet()
    pod = lab.add_pod()
    lab.create_service()
    token = lab.apply_deploy_rbac(OUTSIDE / "probe-pod.yaml")
    kubeconfig = lab.kubeconfig(token, "check")
    outside = lab.outside()
    result = subprocess.run(
        outside.command([sys.executable, "-m", "exporter", "check", "--json", "--kubeconfig",
                         str(kubeconfig), "--namespace", lab.namespace, "--mode", "probe-pod",
                         "--probe-pod-namespace", lab.namespace, "--probe-pod-image", TEST_IMAGE,
                         "--timeout", "0.5"]),
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)["results"]
    by = {(r["kind"], r["pod"], r["protocol"]): r for r in records}
    assert by[("pod", pod.name, "udp")]["success"] is True
    assert by[("pod", pod.name, "udp")]["node"] == "node-a"
    assert by[("pod", pod.name, "udp")]["answers"] == [KUBERNETES_CLUSTER_IP]
    assert {r["kind"] for r in records} == {"service", "pod"}


def test_a_bad_mode_is_a_usage_error() -> None:
    bad = subprocess.run([sys.executable, "-m", "exporter", "check", "--mode", "tunnel"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "--mode: expected one of auto, in-cluster, nodeport, probe-pod, port-forward" in (
        bad.stderr)
