"""The user's path on a real cluster: Kubernetes v1.37.2 with a real node, CoreDNS as
kube-dns, and the exporter installed with `kubectl apply -k deploy/` from its image."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.cluster import CLUSTER_DNS, KUBE_BIN, KUBERNETES_CLUSTER_IP
from tests.harness.node import EXPORTER_IMAGE
from tests.harness.realcluster import RealCluster
from tests.harness.scrape import samples, scrape_until

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "coredns-health-exporter"
SELECTOR = "app.kubernetes.io%2Fname%3Dcoredns-health-exporter"


def check_inside(real: RealCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`coredns-health-exporter check --json` run on the node (the cluster namespace)."""
    netns = real.cluster.netns
    assert netns is not None
    return subprocess.run(
        netns.enter([sys.executable, "-m", "exporter", "check", "--json",
                     "--kubeconfig", str(real.cluster.admin_kubeconfig_inside()), *args]),
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO)


def test_coredns_answers_from_the_real_api(real_cluster: RealCluster) -> None:
    pods = real_cluster.coredns_pods()
    assert len(pods) == 3
    assert {p["spec"]["nodeName"] for p in pods} == {real_cluster.node.name}
    done = check_inside(real_cluster, "--mode", "in-cluster")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    by_kind: dict[str, set[str]] = {}
    for r in results:
        assert r["outcome"] == "success", r
        by_kind.setdefault(r["kind"], set()).add(r["address"])
        if r["kind"] == "pod":
            assert r["node"] == real_cluster.node.name, r
    assert by_kind["service"] == {f"{CLUSTER_DNS}:53"}
    assert by_kind["pod"] == {f"{p['status']['podIP']}:53" for p in pods}
    # the default query's expected answer is the real `kubernetes` Service's ClusterIP
    assert all(KUBERNETES_CLUSTER_IP in " ".join(r["answers"]) for r in results), results


def rendered_image() -> str:
    """The exporter image `kubectl apply -k deploy/` asks for."""
    text = subprocess.run([str(KUBE_BIN / "kubectl"), "kustomize", str(REPO / "deploy")],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    for doc in yaml.safe_load_all(text):
        if doc and doc["kind"] == "Deployment":
            image: str = doc["spec"]["template"]["spec"]["containers"][0]["image"]
            return image
    raise AssertionError("deploy/ renders no Deployment")


@pytest.fixture
def installed(real_cluster: RealCluster) -> Iterator[list[dict[str, Any]]]:
    """deploy/ applied as a user applies it, the node holding the image under the name
    deploy/ gives it; the exporter's pods once Ready; everything deleted after."""
    real_cluster.node.tag(EXPORTER_IMAGE, rendered_image())
    real_cluster.kubectl("apply", "-k", str(REPO / "deploy"))
    try:
        real_cluster.kubectl("-n", NAMESPACE, "rollout", "status",
                             "deployment/coredns-health-exporter", "--timeout=180s",
                             timeout=190)
        yield real_cluster.pods(NAMESPACE, SELECTOR)
    finally:
        real_cluster.kubectl("delete", "-k", str(REPO / "deploy"), "--wait=true",
                             "--timeout=120s", timeout=130)


async def test_kubectl_apply_k_deploy_runs_the_image_and_probes_every_pod(
        real_cluster: RealCluster, installed: list[dict[str, Any]]) -> None:
    pods = installed
    assert len(pods) == 2
    for pod in pods:
        spec = pod["spec"]
        assert spec["serviceAccountName"] == "coredns-health-exporter"
        assert spec["nodeName"] == real_cluster.node.name
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True", pod["status"]
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0, status
    # Admitted under the namespace's `restricted` Pod Security level.
    ns = real_cluster.cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}")
    assert ns is not None
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # --mode auto decided in-cluster, from the pod's own ServiceAccount.
    logs = real_cluster.kubectl("-n", NAMESPACE, "logs", pods[0]["metadata"]["name"])
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    chosen = [line for line in lines if line.get("msg") == "mode chosen"]
    assert chosen and chosen[0]["mode"] == "in-cluster", logs[-3000:]
    assert not [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")], logs

    coredns = {p["status"]["podIP"]: p for p in real_cluster.coredns_pods()}

    def probed_all(body: str) -> bool:
        return len([s for s in samples(body) if s.name == "dnsprobe_success"
                    and s.labels["kind"] == "pod"]) == 2 * len(coredns)

    address = real_cluster.cluster.expose(f"{pods[0]['status']['podIP']}:9953")
    body = await scrape_until(f"http://{address}", probed_all, deadline=60)
    success = [s for s in samples(body) if s.name == "dnsprobe_success"]
    pod_series = {(s.labels["address"], s.labels["protocol"]): s for s in success
                  if s.labels["kind"] == "pod"}
    for ip, pod in coredns.items():
        for protocol in ("udp", "tcp"):
            series = pod_series[(f"{ip}:53", protocol)]
            assert series.value == 1, series
            assert series.labels["pod"] == pod["metadata"]["name"]
            assert series.labels["node"] == real_cluster.node.name
            assert series.labels["namespace"] == "kube-system"
    service = {s.labels["protocol"]: s.value for s in success
               if s.labels["kind"] == "service" and s.labels["address"] == f"{CLUSTER_DNS}:53"}
    assert service == {"udp": 1, "tcp": 1}
