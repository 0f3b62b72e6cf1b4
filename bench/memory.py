"""Resident memory with 1,000 CoreDNS pods discovered from a real Kubernetes API.

The lab's test cluster (Kubernetes v1.37.2 without nodes: tests/harness/cluster.py)
gets a headless kube-system/kube-dns Service and 1,000 Running, Ready Pod objects whose
IPs are the loopback addresses one CoreDNS answers on. `coredns-health-exporter serve`
runs as its own process with the admin kubeconfig: it lists and watches them, probes
2,000 checks (UDP and TCP) every 5 s and is scraped every 5 s. Its VmRSS is read after
a minute of that, and its VmHWM (the peak) too. A headless Service has no ClusterIP, so
nothing is sent anywhere but loopback.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import kubernetes

from tests.harness.cluster import Cluster, binaries_missing

from .common import DNS_PORT, await_http, fetch, free_port, process, rss_mb, sample_sum

NAMESPACE = "kube-system"
SELECTOR = {"k8s-app": "kube-dns"}
NODES = 20


def _populate(core: Any, hosts: list[str]) -> None:
    core.create_namespaced_service(NAMESPACE, {
        "metadata": {"name": "kube-dns", "labels": SELECTOR},
        "spec": {"clusterIP": "None", "selector": SELECTOR,
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
    })
    for n in range(NODES):
        core.create_node({"metadata": {"name": f"node-{n:02d}"}})

    def pod(i: int) -> None:
        name = f"coredns-5d78c9869d-{i:05d}"
        core.create_namespaced_pod(NAMESPACE, {
            "metadata": {"name": name, "labels": SELECTOR},
            "spec": {"nodeName": f"node-{i % NODES:02d}",
                     "containers": [{"name": "coredns", "image": "coredns"}]},
        })
        core.patch_namespaced_pod_status(name, NAMESPACE, {"status": {
            "phase": "Running", "podIP": hosts[i], "podIPs": [{"ip": hosts[i]}],
            "conditions": [{"type": "Ready", "status": "True"},
                           {"type": "ContainersReady", "status": "True"}],
        }})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(pod, range(len(hosts))))


def run(workdir: Path, hosts: list[str], seconds: float) -> dict[str, float]:
    why = binaries_missing()
    if why:
        sys.exit(f"bench: the Kubernetes test cluster is not available: {why}")
    cluster = Cluster.for_lab(workdir / "cluster")
    started = time.monotonic()
    try:
        cluster.start()
        api = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(cluster.admin_kubeconfig)
        )
        _populate(cast(Any, kubernetes.client.CoreV1Api(api)), hosts)
        populated = time.monotonic() - started
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = workdir / "exporter-1000-pods.log"
        args = [sys.executable, "-m", "exporter", "serve", "--kubeconfig",
                str(cluster.admin_kubeconfig), "--dns-port", str(DNS_PORT),
                "--interval", "5", "--listen", f"127.0.0.1:{port}"]
        with process(args, log) as child:
            await_http(url + "/-/ready", child, log, timeout=60)
            t0 = time.monotonic()
            body = ""
            while time.monotonic() - t0 < seconds:  # bounded: `seconds` of 5 s scrapes
                time.sleep(5.0)  # Prometheus' pace for this phase
                body = fetch(url + "/metrics").decode()
            rss, peak = rss_mb(child.pid), rss_mb(child.pid, "VmHWM")
    finally:
        cluster.stop()
    return {
        "rss_mb_1000_pods": rss,
        "rss_peak_mb_1000_pods": peak,
        "rss_pods_discovered": sample_sum(body, "dnsprobe_target_info"),
        "rss_checks_succeeding": sample_sum(body, "dnsprobe_success"),
        "rss_cluster_setup_seconds": populated,
    }

