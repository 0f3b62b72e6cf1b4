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

from .probe import Protocol, Query

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


def expand_checks(
    targets: list[Target], protocols: tuple[Protocol, ...], queries: tuple[Query, ...]
) -> list[Check]:
    return [Check(t, p, q) for t in targets for p in protocols for q in queries]
