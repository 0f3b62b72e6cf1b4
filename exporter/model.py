"""The shared vocabulary: what a probe asks (`Query`), over what (`Protocol`), and what
became of it (`Outcome`, `ProbeResult`). Plain data that imports nothing of the project:
the parts that speak of probes import these from here, not from the DNS engine
(dns/), so a module that only names a result does not depend on the sockets.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

DNS_PORT = 53


class Outcome(enum.StrEnum):
    """What became of a probe; the values are the `result` label of `dnsprobe_probes_total`."""

    SUCCESS = "success"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    RCODE = "rcode"
    WRONG_ANSWER = "wrong_answer"
    TRUNCATED = "truncated"
    ERROR = "error"


class Protocol(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Query:
    """One question to ask, and what its answer must contain.

    `label` is the value of the `query` metric label: `kubernetes` for the default query,
    otherwise the name as the user wrote it (with `/TYPE` when the type is not A).
    """

    label: str
    qname: str
    rdtype: str = "A"
    expect: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: Outcome
    reason: str
    # Seconds from sending the query (for TCP: from starting to connect) to the arrival
    # of a matching response; None when no response arrived.
    rtt_seconds: float | None = None
    rcode: str | None = None
    answers: tuple[str, ...] = ()
    # Wall-clock time the probe started, seconds since the epoch.
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS


# -- targets: what gets probed, with the labels it carries into every series ---------

TARGET_LABELS = ("kind", "namespace", "service", "pod", "node", "address", "protocol", "query")


class Kind(enum.StrEnum):
    SERVICE = "service"
    POD = "pod"
    NODEPORT = "nodeport"
    NODELOCAL = "nodelocal"  # the NodeLocal DNSCache of the exporter's own node
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


def valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


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
    # The targetPort of the DNS port: a number, or the name of a container port of the
    # pods (resolved per pod, PodInfo.port); None when the Service lists no DNS port.
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What NodePort discovery needs of a node: its addresses by type."""

    name: str
    addresses: tuple[tuple[str, str], ...]  # (type, address): ("InternalIP", "10.0.0.5")

    def address(self, kind: str) -> str | None:
        return next((a for t, a in self.addresses if t == kind and valid_ip(a)), None)


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
    # Named container ports of every container: (name, protocol, containerPort).
    ports: tuple[tuple[str, str, int], ...] = ()

    def port(self, target_port: int | str | None, protocol: str = "UDP") -> int | None:
        """The port a Service's `target_port` means on this pod: a number as it is, a name
        looked up among the pod's container ports (that protocol's first), else None."""
        if isinstance(target_port, int):
            return target_port
        named = [(p, port) for n, p, port in self.ports if n == target_port]
        return next((port for p, port in named if p == protocol), None) or next(
            (port for _, port in named), None)

    def matches(self, selector: tuple[tuple[str, str], ...]) -> bool:
        """True if every key=value of a (non-empty) Service selector is among the labels."""
        labels = dict(self.labels)
        return bool(selector) and all(labels.get(k) == v for k, v in selector)




def expand_checks(
    targets: list[Target], protocols: tuple[Protocol, ...], queries: tuple[Query, ...]
) -> list[Check]:
    return [Check(t, p, q) for t in targets for p in protocols for q in queries
            if t.only is None or t.only is p]

