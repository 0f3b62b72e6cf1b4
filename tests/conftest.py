"""Shared fixtures: the CoreDNS binary, CoreDNS servers with a chosen behaviour, namespaces."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import coredns
from tests.harness.cluster import Cluster, binaries_missing
from tests.harness.components import can_use_netns, coredns_binary, missing
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab
from tests.harness.netns import NetNS
from tests.harness.realcluster import RealCluster
from tests.harness.realcluster import missing as real_cluster_missing


@pytest.fixture(scope="session", autouse=True)
def no_ambient_kubernetes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests (and the exporters they start) must not find a developer's own cluster."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            mp.delenv(name, raising=False)
        for name in [n for n in os.environ if n.startswith("DNSPROBE_")]:
            mp.delenv(name)
        yield


@pytest.fixture(scope="session")
def coredns_bin() -> Path:
    binary = coredns_binary()
    if binary is None:
        missing("CoreDNS", "run scripts/install-test-tools (go install, cached)")
        raise AssertionError("unreachable")
    return binary


StartDNS = Callable[..., coredns.CoreDNS]


@pytest.fixture
def start_dns(coredns_bin: Path, tmp_path: Path) -> Iterator[StartDNS]:
    """Start CoreDNS servers for one test; every one is stopped by its PID afterwards."""
    servers: list[coredns.CoreDNS] = []

    def start(
        behaviour: coredns.Behaviour = coredns.Behaviour.HEALTHY, **kw: Any
    ) -> coredns.CoreDNS:
        server = coredns.start(coredns_bin, tmp_path / "coredns", behaviour, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def healthy_dns(start_dns: StartDNS) -> coredns.CoreDNS:
    return start_dns(coredns.Behaviour.HEALTHY)


@pytest.fixture
def udp_dead_dns(
    netns: Callable[[str], NetNS], start_dns: StartDNS
) -> tuple[NetNS, coredns.CoreDNS]:
    """A healthy CoreDNS in a namespace of its own whose inbound UDP to it is dropped."""
    ns = netns("udpdead")
    server = start_dns(coredns.Behaviour.HEALTHY, netns=ns)
    ns.drop("udp", server.port)
    return ns, server


@pytest.fixture
def netns() -> Iterator[Callable[[str], NetNS]]:
    """Make network namespaces for one test; all are deleted afterwards."""
    reason = can_use_netns()
    if reason:
        missing("network namespaces", reason)
    made: list[NetNS] = []

    def make(purpose: str) -> NetNS:
        ns = NetNS(purpose)
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The lab's control plane for the whole session: Kubernetes v1.37.2 without nodes
    (no scheduler, and no controller that acts on nodes or makes pods; see
    Cluster.for_lab)."""
    reason = binaries_missing()
    if reason:
        missing("the Kubernetes test cluster", reason)
    cluster = Cluster.for_lab(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory, coredns_bin: Path
                 ) -> Iterator[RealCluster]:
    """Kubernetes v1.37.2 with two real nodes (containerd, runc, CNI, kubelet, kube-proxy)
    and CoreDNS running as kube-system/kube-dns, for the whole session. A cluster of its
    own: the lab's fake nodes and pods (on `kube_cluster`) must not meet a scheduler, a
    node lifecycle controller or a kubelet."""
    reason = real_cluster_missing()
    if reason:
        missing("the real test cluster", reason)
    made = RealCluster(tmp_path_factory.mktemp("real-cluster"), coredns_bin)
    try:
        made.start()
        yield made
    finally:
        made.stop()


@pytest.fixture
def lab(kube_cluster: Cluster, coredns_bin: Path, tmp_path: Path) -> Iterator[Lab]:
    """A node namespace, CoreDNS pods in namespaces of their own, and a Kubernetes
    namespace of this test's own in the test cluster; all removed afterwards."""
    reason = can_use_netns()
    if reason:
        missing("network namespaces", reason)
    made = Lab(kube_cluster, coredns_bin, tmp_path)
    try:
        yield made
    finally:
        made.close()


LabExporter = Callable[..., Exporter]


@pytest.fixture
def lab_exporter(lab: Lab) -> Iterator[LabExporter]:
    """`start(token, *args, netns=)`: `serve` in the lab's node namespace (or `netns`),
    against the test cluster with a kubeconfig for `token`, probing the lab's namespace;
    every one stopped after."""
    started: list[Exporter] = []

    def start(token: str, *args: str, netns: NetNS | None = None) -> Exporter:
        kubeconfig = lab.kubeconfig(token, f"exporter-{len(started)}")
        # In the node namespace the exporter is in the cluster network; the mode tests
        # name theirs (auto, from outside).
        mode = [] if any(a.startswith("--mode") for a in args) else ["--mode", "in-cluster"]
        exporter = Exporter(
            ["--kubeconfig", str(kubeconfig), "--namespace", lab.namespace, *mode, *args],
            netns=netns or lab.node,
        )
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()
