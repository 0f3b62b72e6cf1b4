"""The four ways to reach CoreDNS, and `--mode auto` choosing among them.

Against the lab on the test API server: the exporter runs in a namespace outside the
cluster network (it reaches the API server and the node's outside address, no pod or
Service IP), with credentials that allow exactly one mode, and must pick that mode, probe
through it and export correct series (nodeport, in-cluster), or say why no mode can.
probe-pod and port-forward mode need a kubelet and a container runtime: they are tested
on the real node, in tests/test_real_outside.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from exporter import kube
from exporter.probing.probepod import LABELS, ProbePod
from tests.conftest import LabExporter
from tests.harness.exporter import Exporter
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


def test_a_bad_mode_is_a_usage_error() -> None:
    bad = subprocess.run([sys.executable, "-m", "exporter", "check", "--mode", "tunnel"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "--mode: expected one of auto, in-cluster, nodeport, probe-pod, port-forward" in (
        bad.stderr)
