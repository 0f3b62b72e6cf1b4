"""The settings: frozen dataclasses with their defaults, the enums of the choices, and the
one configuration error that reports every problem at once.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__
from ..model import Endpoint, Protocol, Query

# The default listen port. Prometheus' default port allocations list (9100-9999) was
# reported full in 2023; 9953 ("DNS" + 53) is ours, documented in the README.
DEFAULT_PORT = 9953
DEFAULT_QUERY_LABEL = "kubernetes"
ENV_PREFIX = "DNSPROBE_"


class ConfigError(Exception):
    """One or more configuration problems; `problems` lists each, naming its source."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class Remediation(enum.StrEnum):
    OFF = "off"
    DRY_RUN = "dry-run"
    EVICT = "evict"


class Mode(enum.StrEnum):
    """How the exporter reaches CoreDNS (docs/modes.md); `auto` picks the first that works
    in the order listed."""

    AUTO = "auto"
    IN_CLUSTER = "in-cluster"
    NODEPORT = "nodeport"
    PROBE_POD = "probe-pod"
    PORT_FORWARD = "port-forward"


class NodeAddressType(enum.StrEnum):
    INTERNAL_IP = "InternalIP"
    EXTERNAL_IP = "ExternalIP"


class ProbeEndpoint(enum.StrEnum):
    """Who `/probe` may probe: any address (blackbox_exporter's contract), only those this
    exporter probes already, or nothing (404)."""

    ANY = "any"
    KNOWN = "known"
    OFF = "off"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True)
class DiscoverySettings:
    # `--server` targets; when any is given, Kubernetes is not used.
    servers: tuple[Endpoint, ...] = ()
    kubeconfig: str | None = None
    namespace: str = "kube-system"
    service: str = "kube-dns"
    # Port probed on pod IPs (`--dns-port`). None: the port the Service's targetPort
    # names on each pod (a number, or a named container port), else 53, where CoreDNS
    # listens in the stock manifests.
    dns_port: int | None = None
    cluster_domain: str = "cluster.local"
    # Where the embedded default reads nameservers from when nothing else is configured.
    resolv_conf: str = "/etc/resolv.conf"
    mode: Mode = Mode.AUTO
    # Which node address NodePort targets use: outside the cluster network the nodes'
    # InternalIP is what on-premises clusters route; clouds give ExternalIP.
    node_address_type: NodeAddressType = NodeAddressType.INTERNAL_IP
    # The node this exporter runs on (the DaemonSet sets DNSPROBE_NODE_NAME from
    # spec.nodeName): the source node of its probes, named in its log lines.
    node_name: str = ""
    # `--node-local-dns`: the NodeLocal DNSCache address probed on this node as a
    # `nodelocal` target (in-cluster mode; needs node_name).
    node_local_dns: Endpoint | None = None


@dataclass(frozen=True)
class ProbePodSettings:
    # Where probe pods are created; `default` exists in every cluster. A namespace of its
    # own, with a quota, is better (docs/modes.md).
    namespace: str = "default"
    image: str = f"ghcr.io/coredns-health-exporter/coredns-health-exporter:{__version__}"


@dataclass(frozen=True)
class ProbeSettings:
    # Extra queries from `--query`. With Kubernetes the default `kubernetes` query is
    # probed before them (by discovery, which reads its expectation from the API); static
    # targets probe these instead of it.
    queries: tuple[Query, ...] = ()
    protocols: tuple[Protocol, ...] = (Protocol.UDP, Protocol.TCP)
    # Seconds. 1 s: glibc's resolver waits 5 s, but a cluster DNS that takes over a
    # second is already an outage for most clients.
    timeout: float = 1.0
    # Seconds between the starts of two probe rounds. 5 s keeps detection within the
    # 15-30 s scrape intervals most Prometheus setups use.
    interval: float = 5.0
    # Probes in flight at once: bounds sockets and CPU when many targets time out.
    concurrency: int = 256
    # `--expect` before any `--query`: the default query's expected answers, instead of
    # the ClusterIP of default/kubernetes read from the API.
    default_expect: tuple[str, ...] = ()

    @property
    def expects_kubernetes_ip(self) -> bool:
        """The default query (probed whenever Kubernetes is) expects the ClusterIP of
        default/kubernetes, read from the API: no --expect of its own."""
        return not self.default_expect


@dataclass(frozen=True)
class HttpSettings:
    host: str = ""
    port: int = DEFAULT_PORT
    probe_endpoint: ProbeEndpoint = ProbeEndpoint.ANY
    # --web-config-file: TLS, client certificates, basic auth (exporter-toolkit format).
    web_config_file: str | None = None


@dataclass(frozen=True)
class RemediationSettings:
    # dry-run by default: a new install shows what it would do before it does anything.
    mode: Remediation = Remediation.DRY_RUN
    webhook_token_file: str | None = None
    # Other Ready CoreDNS pods that must remain after an eviction.
    min_ready: int = 1
    # Seconds between two restarts cluster-wide.
    cooldown: float = 300.0
    allow_delete: bool = False
    # The exporter's own probes as a trigger, beside the webhook (remediation/self.py).
    self_remediate: bool = False


@dataclass(frozen=True)
class Settings:
    command: str = "serve"
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    remediation: RemediationSettings = field(default_factory=RemediationSettings)
    probe_pod: ProbePodSettings = field(default_factory=ProbePodSettings)
    log_format: LogFormat = LogFormat.TEXT
    json_output: bool = False
    config_file: str | None = None

    def default_query_name(self) -> str:
        return f"kubernetes.default.svc.{self.discovery.cluster_domain}"

    def effective(self) -> dict[str, Any]:
        """The settings as plain data for the start-up log line (no secrets are held here:
        the webhook token is read from its file when needed, never stored in settings)."""

        def plain(value: Any) -> Any:
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        data = plain(asdict(self))
        data["discovery"]["servers"] = [e.address for e in self.discovery.servers]
        local = self.discovery.node_local_dns
        data["discovery"]["node_local_dns"] = local.address if local else None
        return dict(data)





# The embedded default's query: the root zone's name servers, which any resolver answers
# (a cluster name would be an NXDOMAIN on a laptop).
RESOLVER_QUERY = Query(label="./NS", qname=".", rdtype="NS")


def default_query(settings: Settings, expect: tuple[str, ...] = ()) -> Query:
    """The default query (`kubernetes`): kubernetes.default.svc.<cluster-domain> A, with
    the expected answers `--expect` gave before any `--query`, else `expect` (the
    ClusterIP of default/kubernetes, once read)."""
    return Query(
        label=DEFAULT_QUERY_LABEL,
        qname=settings.default_query_name() + ".",
        rdtype="A",
        expect=settings.probe.default_expect or expect,
    )

