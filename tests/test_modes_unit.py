"""The pure parts of the modes: which Services and nodes become nodeport and loadbalancer
targets, which protocols each target gets, the probe pod's manifest, and reading its
result back onto the checks it probed."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from exporter import kube
from exporter.config import Mode, load
from exporter.discovery.targets import exposed_targets
from exporter.discovery.watch import mode_targets
from exporter.model import (
    Endpoint,
    Kind,
    NodeInfo,
    Outcome,
    PodInfo,
    Protocol,
    Query,
    ServiceInfo,
    Target,
    expand_checks,
)
from exporter.probing.probepod import (
    LABELS,
    ProbePodError,
    cannot_start,
    parse_output,
    pod_manifest,
)

SELECTOR = (("k8s-app", "kube-dns"),)
COREDNS = ServiceInfo("kube-system", "kube-dns", ("10.96.0.10",), 53, SELECTOR)
NODES = [NodeInfo("n1", (("InternalIP", "192.0.2.1"), ("ExternalIP", "198.51.100.1"))),
         NodeInfo("n2", (("InternalIP", "192.0.2.2"),)),
         NodeInfo("n3", (("Hostname", "n3"),))]


def service(name: str, type_: str, ports: list[dict[str, Any]], selector: Any = SELECTOR,
            ingress: tuple[str, ...] = ()) -> ServiceInfo:
    return kube.service_info({
        "metadata": {"name": name, "namespace": "kube-system"},
        "spec": {"type": type_, "selector": dict(selector), "ports": ports},
        "status": {"loadBalancer": {"ingress": [{"ip": ip} for ip in ingress]}},
    })


UDP = {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53, "nodePort": 30053}
TCP = {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": 53, "nodePort": 30054}


def test_node_ports_are_probed_on_every_node_over_their_own_protocol() -> None:
    np = service("dns-np", "NodePort", [UDP, TCP])
    targets = exposed_targets(COREDNS, [np], NODES, "InternalIP")
    assert [(t.kind, t.node, t.endpoint.address, t.only) for t in targets] == [
        (Kind.NODEPORT, "n1", "192.0.2.1:30053", Protocol.UDP),
        (Kind.NODEPORT, "n1", "192.0.2.1:30054", Protocol.TCP),
        (Kind.NODEPORT, "n2", "192.0.2.2:30053", Protocol.UDP),
        (Kind.NODEPORT, "n2", "192.0.2.2:30054", Protocol.TCP),
    ]  # n3 has no InternalIP
    checks = expand_checks(targets, (Protocol.UDP, Protocol.TCP), (Query("k", "k."),))
    assert [(c.target.endpoint.port, c.protocol) for c in checks][:2] == [
        (30053, Protocol.UDP), (30054, Protocol.TCP)]
    external = exposed_targets(COREDNS, [np], NODES, "ExternalIP")
    assert {t.endpoint.host for t in external} == {"198.51.100.1"}


def test_load_balancers_are_probed_on_their_ingress_ips() -> None:
    udp_only = service("dns-lb", "LoadBalancer", [UDP], ingress=("203.0.113.7", "bad"))
    both = service("dns-lb2", "LoadBalancer", [UDP, TCP], ingress=("203.0.113.8",))
    targets = exposed_targets(COREDNS, [udp_only, both], [], "InternalIP")
    assert [(t.kind, t.service, t.endpoint.address, t.only) for t in targets] == [
        (Kind.LOADBALANCER, "dns-lb", "203.0.113.7:53", Protocol.UDP),
        (Kind.LOADBALANCER, "dns-lb2", "203.0.113.8:53", None),
    ]


def test_load_balancers_node_ports_are_probed_too_unless_it_has_none() -> None:
    with_node_ports = service("dns-lb", "LoadBalancer", [UDP], ingress=("203.0.113.7",))
    pending = service("dns-lb2", "LoadBalancer", [TCP])  # no ingress IP yet
    targets = exposed_targets(COREDNS, [with_node_ports, pending], NODES[:1], "InternalIP")
    assert [(t.kind, t.service, t.endpoint.address, t.only) for t in targets] == [
        (Kind.NODEPORT, "dns-lb", "192.0.2.1:30053", Protocol.UDP),
        (Kind.LOADBALANCER, "dns-lb", "203.0.113.7:53", Protocol.UDP),
        (Kind.NODEPORT, "dns-lb2", "192.0.2.1:30054", Protocol.TCP),
    ]
    # allocateLoadBalancerNodePorts: false (Kubernetes 1.24+): no node ports to probe.
    no_node_ports = service("dns-lb", "LoadBalancer", [{**UDP, "nodePort": None}],
                            ingress=("203.0.113.7",))
    assert [t.kind for t in exposed_targets(COREDNS, [no_node_ports], NODES,
                                            "InternalIP")] == [Kind.LOADBALANCER]


@pytest.mark.parametrize("svc", [
    service("other-app", "NodePort", [UDP], selector=(("app", "web"),)),
    service("no-selector", "NodePort", [UDP], selector=()),
    service("not-dns", "NodePort", [{"name": "http", "protocol": "TCP", "port": 80,
                                     "targetPort": 8080, "nodePort": 30080}]),
    service("cluster-ip", "ClusterIP", [UDP]),
    service("pending-lb", "LoadBalancer", [{**UDP, "nodePort": None}]),
])
def test_services_not_in_front_of_coredns_dns_are_ignored(svc: ServiceInfo) -> None:
    assert exposed_targets(COREDNS, [svc], NODES, "InternalIP") == []


def test_a_narrower_selector_still_fronts_coredns() -> None:
    wide = ServiceInfo("kube-system", "kube-dns", (), 53, (("k8s-app", "kube-dns"),
                                                           ("tier", "dns")))
    np = service("dns-np", "NodePort", [UDP])  # selects k8s-app=kube-dns only
    assert len(exposed_targets(wide, [np], NODES[:1], "InternalIP")) == 1
    assert exposed_targets(None, [np], NODES, "InternalIP") == []


def test_dns_ports_are_found_by_name_port_or_target_port() -> None:
    ports = [{"name": "x", "protocol": "UDP", "port": 5353, "targetPort": "dns"},
             {"protocol": "TCP", "port": 53},
             {"name": "metrics", "protocol": "TCP", "port": 9153},
             {"name": "dns", "protocol": "SCTP", "port": 53}]
    assert kube.dns_ports(ports) == ((Protocol.UDP, 5353, 0), (Protocol.TCP, 53, 0))


def test_port_forward_probes_pods_alone_over_tcp_alone() -> None:
    settings = load([])
    pod = PodInfo("kube-system", "coredns-a", "u1", ("10.244.0.5",), "n1", True, "Running",
                  SELECTOR)
    targets, ready = mode_targets(Mode.PORT_FORWARD, settings, COREDNS, [pod], [], [])
    assert [(t.kind, t.only) for t in targets] == [(Kind.POD, Protocol.TCP)]
    assert ready == {targets[0]: True}
    in_cluster, _ = mode_targets(Mode.IN_CLUSTER, settings, COREDNS, [pod], [], [])
    assert [t.kind for t in in_cluster] == [Kind.SERVICE, Kind.POD]
    checks = expand_checks(targets, settings.probe.protocols, (Query("k", "k."),))
    assert [c.protocol for c in checks] == [Protocol.TCP]


DEFAULT = Query("kubernetes", "kubernetes.default.svc.cluster.local.", "A", ("10.96.0.1",))
EXTRA = Query("example.org/AAAA", "example.org.", "AAAA")
POD_T = Target(Kind.POD, Endpoint("10.244.0.5", 53), "kube-system", "kube-dns", "coredns-a",
               "n1")
SVC_T = Target(Kind.SERVICE, Endpoint("10.96.0.10", 53), "kube-system", "kube-dns")
CHECKS = expand_checks([SVC_T, POD_T], (Protocol.UDP, Protocol.TCP), (DEFAULT, EXTRA))


def test_the_probe_pod_is_unprivileged_labelled_and_given_every_target_and_query() -> None:
    settings = load(["--probe-pod-namespace", "probes", "--probe-pod-image", "registry/x:1",
                     "--timeout", "0.5"])
    pod = pod_manifest(settings, CHECKS, "abc123")
    spec, [container] = pod["spec"], pod["spec"]["containers"]
    assert pod["metadata"]["labels"] == {**LABELS, "dnsprobe.io/instance": "abc123"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] > 0
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "privileged": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"]["memory"]
    assert container["image"] == "registry/x:1"
    args = container["args"]
    assert args[:2] == ["check", "--json"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--server"] == [
        "10.96.0.10:53", "10.244.0.5:53"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--query"] == [
        "kubernetes.default.svc.cluster.local/A", "example.org/AAAA"]
    assert args[args.index("--expect") + 1] == "10.96.0.1"
    assert args[args.index("--timeout") + 1] == "0.5"


def record(address: str, protocol: str, query: str, outcome: str = "success") -> dict[str, Any]:
    return {"kind": "static", "namespace": "", "service": "", "pod": "", "node": "",
            "address": address, "protocol": protocol, "query": query, "outcome": outcome,
            "success": outcome == "success", "rcode": "NOERROR", "answers": ["10.96.0.1"],
            "latency_seconds": 0.0012, "reason": "r", "started_at": 1.0}


def test_the_probe_pods_log_is_read_back_onto_the_checks() -> None:
    results = [record("10.244.0.5:53", "udp", "kubernetes.default.svc.cluster.local",
                      "timeout"),
               record("10.96.0.10:53", "tcp", "example.org/AAAA"),
               record("192.0.2.99:53", "udp", "kubernetes.default.svc.cluster.local")]
    log_lines = '{"ts": "x", "level": "info", "msg": "static targets from --server"}\n'
    text = log_lines + json.dumps({"healthy": False, "results": results}, indent=2) + "\n"
    got = parse_output(text, CHECKS)
    by = {(c.target.kind, c.protocol, c.query.label): r for c, r in got.items()}
    assert by[(Kind.POD, Protocol.UDP, "kubernetes")].outcome is Outcome.TIMEOUT
    assert by[(Kind.SERVICE, Protocol.TCP, "example.org/AAAA")].rtt_seconds == 0.0012
    assert len(got) == 2  # the unknown address is nobody's


@pytest.mark.parametrize(("text", "expected"), [
    ("", "no result in the probe pod's log: (empty)"),
    ("exec format error\n", "no result"),
    ('{\n  "healthy": tru', "unreadable result"),
    ('{\n  "results": 5\n}\n', "no list of results"),
    ('{\n  "results": [{"address": "x"}]\n}\n', "unexpected result record"),
    ('{\n  "results": [' + json.dumps(record("10.96.0.10:53", "udp", "q", "exploded"))
     + "]\n}\n", "unexpected result record"),
])
def test_a_probe_pod_log_without_a_usable_result_is_a_clear_error(text: str,
                                                                  expected: str) -> None:
    with pytest.raises(ProbePodError, match=re.escape(expected)):
        parse_output(text, CHECKS)


@pytest.mark.parametrize(("state", "stuck"), [
    ("waiting: ErrImagePull: failed to pull and unpack image", True),
    ("waiting: ImagePullBackOff: Back-off pulling image", True),
    ("waiting: InvalidImageName", True),
    ("waiting: CreateContainerConfigError: secret not found", True),
    ("waiting: ContainerCreating", False),
    ("running", False),
    ("terminated: exit code 0 (Completed)", False),
    ("", False),
])
def test_a_probe_pod_that_cannot_start_is_told_apart(state: str, stuck: bool) -> None:
    pod = PodInfo("ns", "dnsprobe-x", "uid", (), "node-a", False, "Pending", state=state)
    assert cannot_start(pod) is stuck
