"""Discovery against the real test cluster: the exporter, inside a node namespace with no
route out, finds the CoreDNS Service and its pods through a real kube-apiserver, probes
real CoreDNS pods in namespaces of their own, and follows pod churn and API trouble."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.samples import Sample

from tests.harness.cluster import ADMIN_TOKEN, KUBERNETES_CLUSTER_IP
from tests.harness.coredns import Behaviour
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab
from tests.harness.scrape import samples, scrape, scrape_until

FAST = ["--interval", "0.5", "--timeout", "0.3"]
Start = Callable[..., Exporter]


@pytest.fixture
def start_exporter(lab: Lab) -> Iterator[Start]:
    """Start `serve` inside the lab's node namespace, against the test cluster."""
    started: list[Exporter] = []

    def start(*args: str, token: str = ADMIN_TOKEN) -> Exporter:
        kubeconfig = lab.kubeconfig(token, f"exporter-{len(started)}")
        exporter = Exporter(
            ["--kubeconfig", str(kubeconfig), "--namespace", lab.namespace, *FAST, *args],
            netns=lab.node,
            expose=lambda address: lab.relay_out(address).address,
        )
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def series(body: str, name: str = "dnsprobe_success", **labels: str) -> list[Sample]:
    return [
        s for s in samples(body)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def pods_with(body: str, **labels: str) -> dict[str, float]:
    """{pod/protocol: value} of dnsprobe_success for pod targets."""
    return {
        f"{s.labels['pod']}/{s.labels['protocol']}": s.value
        for s in series(body, kind="pod", **labels)
    }


def probed(*pods: str) -> Callable[[str], bool]:
    """True once every pod has a passing udp and tcp series."""
    def ready(body: str) -> bool:
        seen = pods_with(body)
        return all(seen.get(f"{p}/{proto}") == 1.0 for p in pods for proto in ("udp", "tcp"))
    return ready


async def test_discovers_service_and_pods_and_probes_each(lab: Lab, start_exporter: Start) -> None:
    pods = [lab.add_pod(node=f"node-{i}") for i in range(3)]
    cluster_ip = lab.create_service()
    exporter = start_exporter()
    body = await scrape_until(exporter.url, probed(*(p.name for p in pods)))
    assert probed(*(p.name for p in pods))(body), body
    for pod in pods:
        for proto in ("udp", "tcp"):
            [sample] = series(body, pod=pod.name, protocol=proto)
            assert sample.labels == {
                "kind": "pod", "namespace": lab.namespace, "service": "kube-dns",
                "pod": pod.name, "node": pod.node, "address": f"{pod.ip}:53",
                "protocol": proto, "query": "kubernetes",
            }
        [info] = series(body, "dnsprobe_target_info", pod=pod.name)
        assert info.labels["ready"] == "true" and info.value == 1.0
    service = series(body, kind="service")
    assert {(s.labels["address"], s.labels["protocol"], s.value) for s in service} == {
        (f"{cluster_ip}:53", "udp", 1.0), (f"{cluster_ip}:53", "tcp", 1.0)
    }
    assert all(s.labels["pod"] == "" and s.labels["node"] == "" for s in service)
    status, _, text = await scrape(exporter.url, "/-/ready")
    assert status == 200, text
