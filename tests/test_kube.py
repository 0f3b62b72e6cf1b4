"""exporter/kube: API objects turned into records, errors named, and the Watcher against the real
test cluster (resume after the server ends a watch, relist on 410 Gone)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import kubernetes
import pytest
import urllib3

from exporter import kube
from exporter.discovery.targets import kubernetes_targets
from exporter.model import Kind, PodInfo, Protocol, ServiceInfo
from tests.harness.cluster import Cluster

# -- records -------------------------------------------------------------------------------

KUBE_DNS: dict[str, Any] = {
    "metadata": {"name": "kube-dns", "namespace": "kube-system"},
    "spec": {
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10", "fd00::a"],
        "selector": {"k8s-app": "kube-dns"},
        "ports": [
            {"name": "metrics", "port": 9153, "protocol": "TCP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
    },
}


def pod(name: str, ips: list[str], ready: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "kube-system", "uid": f"uid-{name}",
                     "labels": {"k8s-app": "kube-dns", "pod-template-hash": "x"},
                     **extra.pop("metadata", {})},
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": extra.pop("phase", "Running"),
            "podIP": ips[0] if ips else None,
            "podIPs": [{"ip": ip} for ip in ips],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_service_info_reads_dual_stack_ips_dns_port_and_selector() -> None:
    info = kube.service_info(KUBE_DNS)
    assert info == ServiceInfo(
        "kube-system", "kube-dns", ("10.96.0.10", "fd00::a"), 53, (("k8s-app", "kube-dns"),),
        dns_ports=((Protocol.TCP, 53, 0), (Protocol.UDP, 53, 0)), target_port=53)


@pytest.mark.parametrize(
    ("spec", "ips", "port"),
    [
        ({"clusterIP": "None", "ports": [{"port": 53, "protocol": "UDP"}]}, (), 53),
        ({"clusterIP": "10.0.0.10", "ports": [{"port": 5353, "protocol": "UDP"}]},
         ("10.0.0.10",), 5353),
        ({"clusterIP": "10.0.0.10", "ports": [{"name": "dns-tcp", "port": 54}]},
         ("10.0.0.10",), 54),
        ({"clusterIP": "10.0.0.10", "ports": [{"name": "web", "port": 80}]}, ("10.0.0.10",), None),
        ({}, (), None),
    ],
    ids=["headless", "udp-port", "tcp-only", "no-dns-port", "empty"],
)
def test_service_info_edge_cases(spec: dict[str, Any], ips: tuple[str, ...],
                                 port: int | None) -> None:
    info = kube.service_info({"metadata": {"name": "s", "namespace": "n"}, "spec": spec})
    assert (info.cluster_ips, info.port) == (ips, port)


def test_pod_info_reads_ips_node_and_ready() -> None:
    info = kube.pod_info(pod("coredns-a", ["10.244.0.2", "fd00::2"], ready=False))
    assert info.ips == ("10.244.0.2", "fd00::2")
    assert (info.node, info.ready, info.phase, info.uid) == ("node-1", False, "Running",
                                                             "uid-coredns-a")
    assert info.matches((("k8s-app", "kube-dns"),))
    assert not info.matches((("k8s-app", "other"),))
    assert not info.matches(())  # an empty selector selects nothing


def test_pod_info_survives_missing_and_malformed_fields() -> None:
    info = kube.pod_info({"metadata": None, "status": {"podIPs": "nonsense", "conditions": 3}})
    assert info == PodInfo("", "", "", (), "", False, "")


def test_targets_cover_every_service_ip_and_every_pod_ip() -> None:
    service = kube.service_info(KUBE_DNS)
    pods = [
        kube.pod_info(pod("b", ["10.244.0.3"])),
        kube.pod_info(pod("a", ["10.244.0.2", "fd00::2"], ready=False)),
        kube.pod_info(pod("done", ["10.244.0.9"], phase="Succeeded")),
        kube.pod_info(pod("pending", [])),
        kube.pod_info(pod("garbage", ["not-an-ip"])),
    ]
    targets, ready = kubernetes_targets(service, pods, 53)
    assert [(t.kind, t.endpoint.address, t.pod) for t in targets] == [
        (Kind.SERVICE, "10.96.0.10:53", ""),
        (Kind.SERVICE, "[fd00::a]:53", ""),
        (Kind.POD, "10.244.0.2:53", "a"),
        (Kind.POD, "[fd00::2]:53", "a"),
        (Kind.POD, "10.244.0.3:53", "b"),
    ]
    assert all(t.service == "kube-dns" and t.namespace == "kube-system" for t in targets)
    assert {t.pod: r for t, r in ready.items()} == {"a": False, "b": True}
    assert kubernetes_targets(None, pods, 53) == ([], {})


def named_target_port(target: int | str) -> dict[str, Any]:
    """kube-dns whose DNS ports send to `target` (a number, or a name of the pods')."""
    spec = dict(KUBE_DNS["spec"], ports=[
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": target},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": target}])
    return dict(KUBE_DNS, spec=spec)


def test_pods_are_probed_on_the_port_their_services_target_port_names() -> None:
    """CoreDNS listening on 1053 (a non-root image, say), the Service's targetPort naming
    it: each pod is probed where its own spec says the name is; --dns-port overrides."""
    service = kube.service_info(named_target_port("dns"))
    assert service.target_port == "dns"
    ports = [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
             {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"},
             {"name": "metrics", "containerPort": 9153, "protocol": "TCP"}]
    moved = pod("moved", ["10.244.0.2"])
    moved["spec"]["containers"] = [{"name": "coredns", "ports": ports}]
    stock = pod("stock", ["10.244.0.3"])
    stock["spec"]["containers"] = [{"name": "coredns", "ports": [
        {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]
    unnamed = pod("unnamed", ["10.244.0.4"])  # the name is not in its spec: 53
    pods = [kube.pod_info(p) for p in (moved, stock, unnamed)]
    assert pods[0].ports == (("dns", "UDP", 1053), ("dns-tcp", "TCP", 1053),
                             ("metrics", "TCP", 9153))
    targets, _ = kubernetes_targets(service, pods, None)
    assert [(t.pod, t.endpoint.address) for t in targets if t.kind is Kind.POD] == [
        ("moved", "10.244.0.2:1053"), ("stock", "10.244.0.3:53"), ("unnamed", "10.244.0.4:53")]
    # A numeric targetPort is the port on every pod.
    numeric = kube.service_info(named_target_port(5353))
    assert [t.endpoint.port for t in kubernetes_targets(numeric, pods, None)[0]
            if t.kind is Kind.POD] == [5353, 5353, 5353]
    # --dns-port wins over both.
    assert {t.endpoint.port for t in kubernetes_targets(service, pods, 53)[0]} == {53}


def test_host_network_pods_are_probed_at_their_node_ip_and_terminating_ones_not() -> None:
    """A hostNetwork CoreDNS pod's IP is its node's; a pod being deleted is leaving."""
    service = kube.service_info(KUBE_DNS)
    host = pod("host", ["192.168.1.10"])
    host["spec"] |= {"hostNetwork": True, "containers": [{"name": "coredns", "ports": [
        {"name": "dns", "containerPort": 53, "hostPort": 53, "protocol": "UDP"}]}]}
    host["status"]["hostIP"] = "192.168.1.10"
    leaving = pod("leaving", ["10.244.0.5"],
                  metadata={"deletionTimestamp": "2026-12-01T10:00:00Z"})
    pods = [kube.pod_info(host), kube.pod_info(leaving)]
    assert pods[1].deleting
    targets, ready = kubernetes_targets(service, pods, None)
    assert [(t.pod, t.node, t.endpoint.address) for t in targets if t.kind is Kind.POD] == [
        ("host", "node-1", "192.168.1.10:53")]
    assert {t.pod for t in ready} == {"host"}


# -- errors --------------------------------------------------------------------------------


def api_error(status: int, message: str = "") -> kubernetes.client.ApiException:
    exc = kubernetes.client.ApiException(status=status, reason="reason")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


def test_forbidden_names_the_verb_resource_and_namespace() -> None:
    problem = kube.classify(api_error(403, 'User "x" cannot list resource "pods"'),
                            "list", "pods", "kube-system")
    assert problem.reason == "forbidden"
    assert "may not list pods in namespace kube-system" in problem.message
    assert "grant the 'list' verb on 'pods'" in problem.message
    assert 'User "x" cannot list' in problem.message


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (api_error(401), "unauthorized"),
        (api_error(404), "not_found"),
        (api_error(500, "etcdserver: request timed out"), "error"),
        (urllib3.exceptions.MaxRetryError(
            cast(Any, None), "/", urllib3.exceptions.NewConnectionError(
                cast(Any, None), "Connection refused")), "unreachable"),
        (urllib3.exceptions.ReadTimeoutError(cast(Any, None), "/", "read timed out"), "timeout"),
        (urllib3.exceptions.ProtocolError("Connection broken"), "unreachable"),
        (ValueError("bad json"), "error"),
    ],
)
def test_api_failures_are_classified(exc: BaseException, reason: str) -> None:
    assert kube.classify(exc, "watch", "pods", "ns").reason == reason


def test_unusable_kubeconfig_is_a_config_error(tmp_path: Any) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\nusers: []\ncontexts: []\n")
    with pytest.raises(kube.KubeConfigError, match="cannot use the Kubernetes config"):
        kube.Client.connect(str(bad))


# -- the Watcher, against the real API server ---------------------------------------------


@pytest.fixture
def admin(kube_cluster: Cluster) -> Iterator[tuple[kube.Client, Any, str]]:
    client = kube.Client.connect(str(kube_cluster.admin_kubeconfig))
    # The harness speaks to the API through the generated client; the exporter does not.
    core: Any = kubernetes.client.CoreV1Api(client.api)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": namespace}})
    kube_cluster.await_default_account(namespace)
    yield client, core, namespace
    core.delete_namespace(namespace, _preload_content=False)
    client.close()


def make_pod(core: Any, namespace: str, name: str) -> None:
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": name, "labels": {"k8s-app": "kube-dns"}},
        "spec": {"containers": [{"name": "c", "image": "coredns"}]},
    }, _preload_content=False)


def watch(client: kube.Client, namespace: str, **kw: Any) -> tuple[kube.Watcher, queue.Queue[Any]]:
    events: queue.Queue[Any] = queue.Queue()
    watcher = kube.Watcher(client, "pods", namespace, kube.pod_info, events.put,
                           label_selector="k8s-app=kube-dns", **kw)
    return watcher, events


def next_event(events: queue.Queue[Any], kind: type) -> Any:
    while True:
        event = events.get(timeout=30)
        if isinstance(event, kind):
            return event


def test_watch_resumes_after_the_server_ends_it(admin: tuple[kube.Client, Any, str]) -> None:
    client, core, namespace = admin
    make_pod(core, namespace, "before")
    watcher, events = watch(client, namespace, watch_seconds=1)
    watcher.start()
    try:
        listed = next_event(events, kube.Listed)
        assert [p.name for p in listed.items] == ["before"]
        # Let the server end at least two one-second watches, then change something.
        deadline = time.monotonic() + 20
        while watcher.watches < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the counter: the event waited for is a new watch
        assert watcher.watches >= 3
        make_pod(core, namespace, "after")
        changed = next_event(events, kube.Changed)
        assert (changed.type, changed.item.name) == ("ADDED", "after")
        assert watcher.relists == 0
        assert all(not isinstance(e, kube.Listed) for e in list(events.queue))
    finally:
        watcher.stop()


def test_watch_from_an_expired_version_lists_again(
    kube_cluster: Cluster, admin: tuple[kube.Client, Any, str]
) -> None:
    """As after an API server restart: the version a watch would resume from is older than
    the new server's watch cache, which answers 410 Gone; the watcher lists again."""
    client, core, namespace = admin
    make_pod(core, namespace, "existing")
    _, version = client.list_objects("pods", namespace)
    make_pod(core, namespace, "later")
    kube_cluster.stop_apiserver()
    kube_cluster.start_apiserver()
    watcher, events = watch(client, namespace)
    watcher.start(resource_version=version)
    try:
        listed = next_event(events, kube.Listed)
        assert sorted(p.name for p in listed.items) == ["existing", "later"]
        assert watcher.relists == 1
        assert not any(isinstance(e, kube.Failed) for e in list(events.queue))
    finally:
        watcher.stop()


def test_eviction_honours_the_uid_precondition_and_dry_run(
    admin: tuple[kube.Client, Any, str]
) -> None:
    client, core, namespace = admin
    make_pod(core, namespace, "coredns-a")
    with pytest.raises(kube.ApiException) as stale:
        client.evict(namespace, "coredns-a", "00000000-0000-0000-0000-000000000000",
                     dry_run=False)
    assert stale.value.status == 409  # a replacement of the same name is never hit
    pod = client.get_pod(namespace, "coredns-a")
    assert pod is not None and not pod.deleting
    client.evict(namespace, "coredns-a", pod.uid, dry_run=True)
    after_dry_run = client.get_pod(namespace, "coredns-a")
    assert after_dry_run is not None and not after_dry_run.deleting
    client.evict(namespace, "coredns-a", pod.uid, dry_run=False)
    gone = client.get_pod(namespace, "coredns-a")
    assert gone is None or gone.deleting
    with pytest.raises(kube.ApiException) as missing:
        client.evict(namespace, "no-such-pod", pod.uid, dry_run=False)
    assert missing.value.status == 404
