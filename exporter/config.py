"""Settings: frozen dataclasses, loaded from flags, environment and a YAML file.

Precedence is flags, then `DNSPROBE_*` environment variables, then the `--config` file,
then the defaults below. Validation is strict (unknown keys are errors) and collects
every problem before failing, so an operator fixes a bad config in one go; each message
names where the bad value came from.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .model import Protocol, Query
from .targets import Endpoint, parse_endpoint

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
    # Port probed on pod IPs: CoreDNS listens on 53 in the stock manifests.
    dns_port: int = 53
    cluster_domain: str = "cluster.local"
    # Where the embedded default reads nameservers from when nothing else is configured.
    resolv_conf: str = "/etc/resolv.conf"
    mode: Mode = Mode.AUTO
    # Which node address NodePort targets use: outside the cluster network the nodes'
    # InternalIP is what on-premises clusters route; clouds give ExternalIP.
    node_address_type: NodeAddressType = NodeAddressType.INTERNAL_IP


@dataclass(frozen=True)
class ProbePodSettings:
    # Where probe pods are created; `default` exists in every cluster. A namespace of its
    # own, with a quota, is better (docs/modes.md).
    namespace: str = "default"
    image: str = f"ghcr.io/coredns-health-exporter/coredns-health-exporter:{__version__}"


@dataclass(frozen=True)
class ProbeSettings:
    # Extra queries from `--query`; the default `kubernetes` query is added by the caller
    # that knows whether an expectation can be read from the API.
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


@dataclass(frozen=True)
class HttpSettings:
    host: str = ""
    port: int = DEFAULT_PORT


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
        return dict(data)


# --- value parsers: each returns the value or raises ValueError with a short reason ---

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def parse_duration(value: object) -> float:
    """Seconds from a number (`1.5`) or a Go-style duration (`500ms`, `5m`, `1h30m`)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"expected a duration such as 1.5, 500ms, 30s or 5m, got {value!r}"
                ) from None
    else:
        raise ValueError(f"expected a duration, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a non-negative duration, got {value!r}")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return seconds


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}, got {value!r}")
        return value

    return parse


def _choice(enum_type: type[enum.StrEnum]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        try:
            return enum_type(str(value))
        except ValueError:
            allowed = ", ".join(e.value for e in enum_type)
            raise ValueError(f"expected one of {allowed}, got {value!r}") from None

    return parse


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _dns_label(value: object) -> str:
    text = _string(value)
    if len(text) > 63 or not _DNS_LABEL_RE.match(text):
        raise ValueError(f"{text!r} is not a valid Kubernetes name (RFC 1123 label)")
    return text


def _domain(value: object) -> str:
    text = _string(value).rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{value!r} is not a valid domain name")
    return text


def _protocols(value: object) -> tuple[Protocol, ...]:
    text = str(value).strip().lower()
    if text == "both":
        return (Protocol.UDP, Protocol.TCP)
    if text in ("udp", "tcp"):
        return (Protocol(text),)
    raise ValueError(f"expected udp, tcp or both, got {value!r}")


def _listen(value: object) -> tuple[str, int]:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT or :PORT, got {value!r}")
    host = host.strip("[]")
    return host, _int_in(0, 65535)(port)


def _servers(value: object) -> tuple[Endpoint, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected a list of HOST[:PORT], got {value!r}")
    problems, endpoints = [], []
    for item in items:
        try:
            endpoints.append(parse_endpoint(str(item), 53))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(endpoints)


_RDTYPES = ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "HTTPS", "SVCB")


def parse_query(text: str, expect: Sequence[str] = ()) -> Query:
    """A `NAME[/TYPE]` query; the metric label is the text as given (type omitted if A)."""
    name, _, rdtype = text.strip().partition("/")
    rdtype = (rdtype or "A").upper()
    if rdtype not in _RDTYPES:
        raise ValueError(f"query {text!r}: type must be one of {', '.join(_RDTYPES)}")
    qname = name.strip().rstrip(".").lower()
    labels = qname.split(".")
    if not qname or len(qname) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        raise ValueError(f"query {text!r}: {name!r} is not a valid domain name")
    label = qname if rdtype == "A" else f"{qname}/{rdtype}"
    return Query(label=label, qname=qname + ".", rdtype=rdtype, expect=tuple(expect))


def _queries(value: object) -> tuple[Query, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of queries (NAME[/TYPE] or {name, type, expect})")
    problems: list[str] = []
    queries: list[Query] = []
    for i, item in enumerate(value):
        try:
            if isinstance(item, str):
                queries.append(parse_query(item))
            elif isinstance(item, dict):
                unknown = set(item) - {"name", "type", "expect"}
                if unknown:
                    raise ValueError(
                        f"item {i}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                        "(allowed: name, type, expect)"
                    )
                name = _string(item.get("name"))
                rdtype = str(item.get("type", "A"))
                expect = item.get("expect", [])
                if isinstance(expect, str):
                    expect = [expect]
                if not isinstance(expect, list) or not all(isinstance(e, str) for e in expect):
                    raise ValueError(f"item {i}: expect must be a list of strings")
                queries.append(parse_query(f"{name}/{rdtype}", expect))
            else:
                raise ValueError(f"item {i}: expected NAME[/TYPE] or a mapping, got {item!r}")
        except ValueError as exc:
            problems.append(str(exc))
    labels = [q.label for q in queries]
    if DEFAULT_QUERY_LABEL in labels:
        problems.append(f"the query label {DEFAULT_QUERY_LABEL!r} is taken by the default query")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        problems.append(f"duplicate queries: {', '.join(duplicates)}")
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(queries)


def _path(value: object) -> str:
    return _string(value)


_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*$", re.IGNORECASE)


def _image(value: object) -> str:
    text = _string(value)
    if not _IMAGE_RE.match(text) or len(text) > 512:
        raise ValueError(f"expected a container image reference, got {value!r}")
    return text


# Every key the config file, the environment and the flags share: name -> parser.
KEYS: dict[str, Callable[[object], Any]] = {
    "server": _servers,
    "kubeconfig": _path,
    "namespace": _dns_label,
    "service": _dns_label,
    "dns-port": _int_in(1, 65535),
    "cluster-domain": _domain,
    "resolv-conf": _path,
    "query": _queries,
    "protocol": _protocols,
    "timeout": _positive_duration,
    "interval": _positive_duration,
    "concurrency": _int_in(1, 10000),
    "listen": _listen,
    "remediation": _choice(Remediation),
    "webhook-token-file": _path,
    "min-ready": _int_in(0, 1000),
    "cooldown": parse_duration,
    "allow-delete": _bool,
    "log-format": _choice(LogFormat),
    "mode": _choice(Mode),
    "node-address-type": _choice(NodeAddressType),
    "probe-pod-namespace": _dns_label,
    "probe-pod-image": _image,
}
# Keys that only make sense from the command line or a file, not the environment.
_NO_ENV = {"query"}


# --- command line ---


class _QueryAction(argparse.Action):
    """`--query` starts a query; `--expect` adds to the last one, keeping their order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        queries: list[dict[str, Any]] = getattr(namespace, "query_items", None) or []
        if self.dest == "query":
            queries.append({"text": values, "expect": []})
        elif not queries:
            errors: list[str] = getattr(namespace, "order_errors", None) or []
            errors.append(f"--expect {values}: there is no --query before it to apply to")
            namespace.order_errors = errors
        else:
            queries[-1]["expect"].append(values)
        namespace.query_items = queries


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("targets")
    g.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags")
    g.add_argument("--server", action="append", metavar="HOST[:PORT]",
                   help="probe this DNS server as a static target (repeatable); "
                        "disables Kubernetes discovery")
    g.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file to use")
    g.add_argument("--namespace", metavar="NS", help="namespace of the CoreDNS Service "
                   "(default kube-system)")
    g.add_argument("--service", metavar="NAME", help="the CoreDNS Service (default kube-dns)")
    g.add_argument("--dns-port", metavar="N", help="port probed on pod IPs (default 53)")
    g.add_argument("--cluster-domain", metavar="D", help="cluster domain (default cluster.local)")
    g.add_argument("--resolv-conf", metavar="PATH", help="resolver file read by the embedded "
                   "default when neither --server nor Kubernetes is available "
                   "(default /etc/resolv.conf)")
    q = p.add_argument_group("probing")
    q.add_argument("--query", action=_QueryAction, dest="query", metavar="NAME[/TYPE]",
                   help="extra query to ask every target (repeatable; TYPE defaults to A)")
    q.add_argument("--expect", action=_QueryAction, dest="expect", metavar="VALUE",
                   help="answer value that must be present (repeatable; applies to the "
                        "last --query)")
    q.add_argument("--protocol", metavar="udp|tcp|both", help="transports to probe (default both)")
    q.add_argument("--timeout", metavar="SECONDS", help="per-probe timeout (default 1)")
    q.add_argument("--concurrency", metavar="N", help="probes in flight at once (default 256)")
    q.add_argument("--log-format", metavar="text|json", help="log format (default text)")
    m = p.add_argument_group("modes (docs/modes.md)")
    m.add_argument("--mode", metavar="MODE",
                   help="how CoreDNS is reached: auto, in-cluster, nodeport, probe-pod or "
                        "port-forward (default auto: the first of those the credentials "
                        "and the network allow)")
    m.add_argument("--node-address-type", metavar="InternalIP|ExternalIP",
                   help="node address probed in nodeport mode (default InternalIP)")
    m.add_argument("--probe-pod-namespace", metavar="NS",
                   help="namespace of probe pods in probe-pod mode (default default)")
    m.add_argument("--probe-pod-image", metavar="IMAGE",
                   help="image of probe pods (default this version's published image)")
    return p


def _serve_only(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serve")
    g.add_argument("--interval", metavar="SECONDS", help="probe round interval (default 5)")
    g.add_argument("--listen", metavar="HOST:PORT",
                   help=f"HTTP listen address (default :{DEFAULT_PORT})")
    r = p.add_argument_group("remediation")
    r.add_argument("--remediation", metavar="off|dry-run|evict",
                   help="what the webhook may do (default dry-run)")
    r.add_argument("--webhook-token-file", metavar="PATH",
                   help="bearer token Alertmanager must send; without it the webhook "
                        "answers 503")
    r.add_argument("--min-ready", metavar="N",
                   help="other Ready CoreDNS pods that must remain (default 1)")
    r.add_argument("--cooldown", metavar="DURATION",
                   help="at most one restart per this long, cluster-wide (default 5m)")
    r.add_argument("--allow-delete", action="store_const", const=True, default=None,
                   help="allow a forced delete when eviction is refused (default off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coredns-health-exporter",
        description="Probe CoreDNS over UDP and TCP DNS and export what it sees to Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{serve,check}")
    common = _common_parser()
    serve = sub.add_parser("serve", parents=[common], help="run the exporter (default)",
                           description="Run the exporter: probe rounds, /metrics, /probe, "
                                       "the webhook and the status page.")
    _serve_only(serve)
    check = sub.add_parser("check", parents=[common], help="probe once and print a table",
                           description="Probe every target once; exit 0 when all are healthy, "
                                       "1 when any is not, 2 on a usage or config error.")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _flag_values(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """Flag values that were given, as key -> (origin, raw value)."""
    values: dict[str, tuple[str, object]] = {}
    for key in KEYS:
        if key == "query":
            continue
        raw = getattr(args, key.replace("-", "_"), None)
        if raw is not None:
            values[key] = (f"--{key}", raw)
    items = getattr(args, "query_items", None)
    if items:
        values["query"] = (
            "--query",
            [{"name": i["text"].partition("/")[0], "type": i["text"].partition("/")[2] or "A",
              "expect": i["expect"]} for i in items],
        )
    return values


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[str, object]]:
    values: dict[str, tuple[str, object]] = {}
    for key in KEYS:
        if key in _NO_ENV:
            continue
        name = ENV_PREFIX + key.upper().replace("-", "_")
        if name in env and env[name] != "":
            values[key] = (f"${name}", env[name])
    return values


def _file_values(path: str, problems: list[str]) -> dict[str, tuple[str, object]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"--config {path}: cannot read: {exc.strerror or exc}")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problems.append(f"--config {path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config {path}: expected a mapping of keys, got {type(data).__name__}")
        return {}
    values: dict[str, tuple[str, object]] = {}
    for key, raw in data.items():
        if key not in KEYS:
            hint = difflib.get_close_matches(str(key).replace("_", "-"), list(KEYS), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: unknown key {key!r}{suggestion}")
            continue
        values[key] = (f"{path}: {key}", raw)
    return values


def load(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    """Parse argv (without the program name) into Settings, or raise ConfigError.

    argparse itself exits with status 2 on an unknown flag or a missing flag value.
    """
    env = os.environ if env is None else env
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    problems: list[str] = list(getattr(args, "order_errors", None) or [])

    config_file = args.config or env.get(ENV_PREFIX + "CONFIG") or None
    merged: dict[str, tuple[str, object]] = {}
    if config_file:
        merged.update(_file_values(config_file, problems))
    merged.update(_env_values(env))
    merged.update(_flag_values(args))

    parsed: dict[str, Any] = {}
    for key, (origin, raw) in merged.items():
        try:
            parsed[key] = KEYS[key](raw)
        except ValueError as exc:
            problems.append(f"{origin}: {exc}")

    probe = ProbeSettings(
        queries=parsed.get("query", ()),
        protocols=parsed.get("protocol", ProbeSettings.protocols),
        timeout=parsed.get("timeout", ProbeSettings.timeout),
        interval=parsed.get("interval", ProbeSettings.interval),
        concurrency=parsed.get("concurrency", ProbeSettings.concurrency),
    )
    if args.command == "serve" and probe.timeout >= probe.interval:
        problems.append(
            f"timeout ({probe.timeout:g}s) must be shorter than interval ({probe.interval:g}s), "
            "or probes of one round would overlap the next"
        )
    if problems:
        raise ConfigError(problems)

    listen_host, listen_port = parsed.get("listen", (HttpSettings.host, HttpSettings.port))
    return Settings(
        command=args.command,
        discovery=DiscoverySettings(
            servers=parsed.get("server", ()),
            kubeconfig=parsed.get("kubeconfig"),
            namespace=parsed.get("namespace", DiscoverySettings.namespace),
            service=parsed.get("service", DiscoverySettings.service),
            dns_port=parsed.get("dns-port", DiscoverySettings.dns_port),
            cluster_domain=parsed.get("cluster-domain", DiscoverySettings.cluster_domain),
            resolv_conf=parsed.get("resolv-conf", DiscoverySettings.resolv_conf),
            mode=parsed.get("mode", DiscoverySettings.mode),
            node_address_type=parsed.get("node-address-type",
                                         DiscoverySettings.node_address_type),
        ),
        probe_pod=ProbePodSettings(
            namespace=parsed.get("probe-pod-namespace", ProbePodSettings.namespace),
            image=parsed.get("probe-pod-image", ProbePodSettings.image),
        ),
        probe=probe,
        http=HttpSettings(host=listen_host, port=listen_port),
        remediation=RemediationSettings(
            mode=parsed.get("remediation", RemediationSettings.mode),
            webhook_token_file=parsed.get("webhook-token-file"),
            min_ready=parsed.get("min-ready", RemediationSettings.min_ready),
            cooldown=parsed.get("cooldown", RemediationSettings.cooldown),
            allow_delete=parsed.get("allow-delete", RemediationSettings.allow_delete),
        ),
        log_format=parsed.get("log-format", LogFormat.TEXT),
        json_output=bool(getattr(args, "json", False)),
        config_file=config_file,
    )
