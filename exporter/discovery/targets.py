"""Targets from configuration and from the Kubernetes records: the nameservers of a
resolv.conf and `--server` endpoints as static targets; the CoreDNS Service and its pods,
or the node ports and load-balancer IPs that expose it, as Kubernetes targets.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ..model import (
    DNS_PORT,
    Endpoint,
    Kind,
    NodeInfo,
    PodInfo,
    Protocol,
    ServiceInfo,
    Target,
    valid_ip,
)


def read_resolv_conf(path: Path) -> list[Endpoint]:
    """The `nameserver` entries of a resolv.conf, as port-53 endpoints, in file order.

    Entries that are not IP addresses are skipped, as the C library skips them; a zone
    index (`fe80::1%eth0`) is dropped because it cannot be probed portably.
    """
    endpoints: list[Endpoint] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            host = fields[1].split("%", 1)[0]
            try:
                endpoints.append(Endpoint(str(ipaddress.ip_address(host)), 53))
            except ValueError:
                continue
    return endpoints


def static_targets(endpoints: list[Endpoint] | tuple[Endpoint, ...]) -> list[Target]:
    seen: dict[Endpoint, Target] = {}
    for endpoint in endpoints:
        seen.setdefault(endpoint, Target(Kind.STATIC, endpoint))
    return list(seen.values())


def kubernetes_targets(
    service: ServiceInfo | None, pods: list[PodInfo], dns_port: int | None
) -> tuple[list[Target], dict[Target, bool]]:
    """Targets for a Service and its pods: every ClusterIP, every IP of every pod (both
    families of a dual-stack pod; a hostNetwork pod's IPs are its node's).

    A pod is probed on `dns_port` when given (--dns-port), else on the port the Service's
    targetPort means on that pod (a number, or a named container port looked up in the
    pod's spec), else on 53. Returns the targets (Service IPs first, then pods by name)
    and, per pod target, the pod's Ready condition. Pods that are not Ready are probed all
    the same (that is when their DNS matters most); pods that have finished (Succeeded,
    Failed) are not, nor Terminating ones (deletionTimestamp set): they are leaving, the
    Service sends them no new clients, and their failures while they shut down are
    expected, not an outage.
    """
    if service is None:
        return [], {}
    targets: list[Target] = []
    if service.port is not None:
        targets += [
            Target(Kind.SERVICE, Endpoint(ip, service.port), service.namespace, service.name)
            for ip in service.cluster_ips
            if valid_ip(ip)
        ]
    ready: dict[Target, bool] = {}
    for pod in sorted(pods, key=lambda p: p.name):
        if (pod.phase in ("Succeeded", "Failed") or pod.deleting
                or not pod.matches(service.selector)):
            continue
        port = dns_port or pod.port(service.target_port) or DNS_PORT
        for ip in pod.ips:
            if not valid_ip(ip):
                continue
            target = Target(
                Kind.POD, Endpoint(ip, port), pod.namespace, service.name, pod.name, pod.node
            )
            targets.append(target)
            ready[target] = pod.ready
    return targets, ready


def exposed_targets(
    coredns: ServiceInfo | None, services: list[ServiceInfo], nodes: list[NodeInfo],
    address_type: str,
) -> list[Target]:
    """Targets for the NodePort and LoadBalancer Services in front of the CoreDNS pods.

    A Service counts when its selector picks the CoreDNS pods (every key=value of it is
    in the CoreDNS Service's selector, which the pods carry) and it has DNS ports. Its
    node ports give one target per node address (of `address_type`) and node port,
    probed over that port's protocol only; a LoadBalancer Service has node ports too
    (the path most load balancers forward to; none when allocateLoadBalancerNodePorts is
    false) and gives one target more per ingress IP and port. Order: by Service name,
    then node, then protocol, then ingress IP.
    """
    if coredns is None or not coredns.selector:
        return []
    wanted = set(coredns.selector)
    targets: list[Target] = []
    for svc in sorted(services, key=lambda s: s.name):
        if svc.type not in ("NodePort", "LoadBalancer"):
            continue
        if not svc.selector or not set(svc.selector) <= wanted:
            continue
        for node in sorted(nodes, key=lambda n: n.name):
            address = node.address(address_type)
            if address is None:
                continue
            targets += [
                Target(Kind.NODEPORT, Endpoint(address, node_port), svc.namespace,
                       svc.name, node=node.name, only=protocol)
                for protocol, _, node_port in svc.dns_ports if node_port
            ]
        if svc.type == "LoadBalancer":
            for ip in svc.ingress:
                if not valid_ip(ip):
                    continue
                ports: dict[int, list[Protocol]] = {}
                for protocol, port, _ in svc.dns_ports:
                    ports.setdefault(port, []).append(protocol)
                for port, protocols in sorted(ports.items()):
                    only = protocols[0] if len(protocols) == 1 else None
                    targets.append(Target(Kind.LOADBALANCER, Endpoint(ip, port),
                                          svc.namespace, svc.name, only=only))
    return targets



