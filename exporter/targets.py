"""The target model: what gets probed, with the labels it carries into every series.

A `Target` is one DNS server address; a `Check` is a target asked one query over one
protocol, the unit the scheduler runs and the collector exports. Static targets come from
`--server` or from the resolver configuration; Kubernetes targets come from discovery.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from .model import Protocol, Query

# Labels on every per-target series, in exposition order; DESIGN.md fixes the set.
TARGET_LABELS = ("kind", "namespace", "service", "pod", "node", "address", "protocol", "query")


class Kind(enum.StrEnum):
    SERVICE = "service"
    POD = "pod"
    NODEPORT = "nodeport"
    LOADBALANCER = "loadbalancer"
    STATIC = "static"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        """`ip:port`, with brackets around IPv6 addresses."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    endpoint: Endpoint
    namespace: str = ""
    service: str = ""
    pod: str = ""
    node: str = ""
    # Set when the target can be probed over this transport alone: a NodePort (UDP and
    # TCP get a node port each), a pod reached through the API server's port-forward
    # (TCP only). None: every protocol configured.
    only: Protocol | None = None

    def label_values(self) -> tuple[str, ...]:
        """Values for `TARGET_LABELS` up to `address` (without protocol and query)."""
        return (self.kind.value, self.namespace, self.service, self.pod, self.node,
                self.endpoint.address)


@dataclass(frozen=True, slots=True)
class Check:
    target: Target
    protocol: Protocol
    query: Query
    # A check is a dict key on every probe (the result store): its hash is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.target, self.protocol, self.query)))

    def __hash__(self) -> int:
        return self._hash

    def label_values(self) -> tuple[str, ...]:
        """Values for `TARGET_LABELS`, in that order."""
        return (*self.target.label_values(), self.protocol.value, self.query.label)


def parse_endpoint(text: str, default_port: int) -> Endpoint:
    """Parse `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`; raise ValueError with the reason.

    Host names are refused on purpose: a DNS prober that needs DNS to find the servers it
    checks fails exactly when it is needed.
    """
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (host names are not resolved: "
            "a DNS prober must not need DNS to find its targets)"
        ) from None
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    return Endpoint(str(ip), port)


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


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What discovery needs of the CoreDNS Service."""

    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    port: int | None  # the DNS port; None when the Service lists none
    selector: tuple[tuple[str, str], ...]
    type: str = "ClusterIP"
    # The DNS ports (see kube.dns_ports) as (protocol, port, nodePort or 0).
    dns_ports: tuple[tuple[Protocol, int, int], ...] = ()
    # status.loadBalancer.ingress IPs of a LoadBalancer Service.
    ingress: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What NodePort discovery needs of a node: its addresses by type."""

    name: str
    addresses: tuple[tuple[str, str], ...]  # (type, address): ("InternalIP", "10.0.0.5")

    def address(self, kind: str) -> str | None:
        return next((a for t, a in self.addresses if t == kind and _valid_ip(a)), None)


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What discovery needs of a CoreDNS pod."""

    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    node: str
    ready: bool
    phase: str
    labels: tuple[tuple[str, str], ...] = ()
    deleting: bool = False
    created: str = ""  # metadata.creationTimestamp, RFC 3339
    # The first container's state, for messages: "waiting: ErrImagePull: ...", "running",
    # "terminated: exit code 1 (Error)"; empty when there is no status yet.
    state: str = ""

    def matches(self, selector: tuple[tuple[str, str], ...]) -> bool:
        """True if every key=value of a (non-empty) Service selector is among the labels."""
        labels = dict(self.labels)
        return bool(selector) and all(labels.get(k) == v for k, v in selector)


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def kubernetes_targets(
    service: ServiceInfo | None, pods: list[PodInfo], dns_port: int
) -> tuple[list[Target], dict[Target, bool]]:
    """Targets for a Service and its pods: every ClusterIP, every IP of every pod.

    Returns the targets (Service IPs first, then pods by name) and, per pod target, the
    pod's Ready condition. Pods that are not Ready are probed all the same (that is when
    their DNS matters most); pods that have finished (Succeeded, Failed) are not.
    """
    if service is None:
        return [], {}
    targets: list[Target] = []
    if service.port is not None:
        targets += [
            Target(Kind.SERVICE, Endpoint(ip, service.port), service.namespace, service.name)
            for ip in service.cluster_ips
            if _valid_ip(ip)
        ]
    ready: dict[Target, bool] = {}
    for pod in sorted(pods, key=lambda p: p.name):
        if pod.phase in ("Succeeded", "Failed") or not pod.matches(service.selector):
            continue
        for ip in pod.ips:
            if not _valid_ip(ip):
                continue
            target = Target(
                Kind.POD, Endpoint(ip, dns_port), pod.namespace, service.name, pod.name, pod.node
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
                if not _valid_ip(ip):
                    continue
                ports: dict[int, list[Protocol]] = {}
                for protocol, port, _ in svc.dns_ports:
                    ports.setdefault(port, []).append(protocol)
                for port, protocols in sorted(ports.items()):
                    only = protocols[0] if len(protocols) == 1 else None
                    targets.append(Target(Kind.LOADBALANCER, Endpoint(ip, port),
                                          svc.namespace, svc.name, only=only))
    return targets


def expand_checks(
    targets: list[Target], protocols: tuple[Protocol, ...], queries: tuple[Query, ...]
) -> list[Check]:
    return [Check(t, p, q) for t in targets for p in protocols for q in queries
            if t.only is None or t.only is p]
