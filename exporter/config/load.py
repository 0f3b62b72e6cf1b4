"""Loading: flags, then `DNSPROBE_*` environment variables, then the `--config` file, then
the defaults; every problem collected before failing, each naming where it came from.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from .settings import (
    DEFAULT_PORT,
    DEFAULT_QUERY_LABEL,
    ENV_PREFIX,
    ConfigError,
    DiscoverySettings,
    HttpSettings,
    LogFormat,
    ProbePodSettings,
    ProbeSettings,
    RemediationSettings,
    Settings,
)
from .values import _NO_ENV, KEYS, parse_query

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
        elif not queries:  # before any --query: the default query's expected answer
            default: list[str] = getattr(namespace, "default_expect", None) or []
            default.append(values)
            namespace.default_expect = default
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
    g.add_argument("--node-name", metavar="NAME",
                   help="the node this exporter runs on, named in its logs as the source "
                        "of its probes (the DaemonSet sets DNSPROBE_NODE_NAME from "
                        "spec.nodeName)")
    g.add_argument("--node-local-dns", metavar="ADDRESS",
                   help="also probe the NodeLocal DNSCache of this node at ADDRESS[:PORT] "
                        "(169.254.20.10, say) as kind=\"nodelocal\"; in-cluster mode, "
                        "needs --node-name (default off)")
    q = p.add_argument_group("probing")
    q.add_argument("--query", action=_QueryAction, dest="query", metavar="NAME[/TYPE]",
                   help="extra query to ask every target (repeatable; TYPE defaults to A)")
    q.add_argument("--expect", action=_QueryAction, dest="expect", metavar="VALUE",
                   help="answer value that must be present (repeatable; applies to the "
                        "last --query)")
    q.add_argument("--protocol", metavar="udp|tcp|both", help="transports to probe (default both)")
    q.add_argument("--timeout", metavar="SECONDS",
                   help="per-probe timeout (default 1, or half a shorter --interval)")
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
    g.add_argument("--web-config-file", "--web.config.file", dest="web_config_file",
                   metavar="PATH",
                   help="exporter-toolkit web configuration: TLS, client certificates, "
                        "basic auth, response headers (default: plain HTTP, no auth)")
    g.add_argument("--probe-endpoint", metavar="any|known|off",
                   help="who /probe may probe: any address, only the addresses this "
                        "exporter probes already, or nothing (404) (default any)")
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
    r.add_argument("--self-remediate", action="store_const", const=True, default=None,
                   help="judge pods sick from the exporter's own probes, without "
                        "Alertmanager, through the same guards (default off)")


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

    default_expect = tuple(getattr(args, "default_expect", None) or ())
    for value in default_expect:
        try:
            parse_query(f"{DEFAULT_QUERY_LABEL}.invalid/A", (value,))
        except ValueError as exc:
            problems.append(f"--expect {value}: {exc}")
    if default_expect and parsed.get("query") and parsed.get("server"):
        problems.append(
            f"--expect {default_expect[0]}: given before any --query, it applies to the "
            "default query, which --server targets with --query do not probe: put it "
            "after the --query it is for")
    interval = parsed.get("interval", ProbeSettings.interval)
    # Left at its default, the timeout makes room for a short interval: half of it.
    timeout = parsed.get("timeout", min(ProbeSettings.timeout, interval / 2))
    probe = ProbeSettings(
        queries=parsed.get("query", ()),
        protocols=parsed.get("protocol", ProbeSettings.protocols),
        timeout=timeout,
        interval=interval,
        concurrency=parsed.get("concurrency", ProbeSettings.concurrency),
        default_expect=default_expect,
    )
    if parsed.get("node-local-dns") and not parsed.get("node-name"):
        problems.append(
            "--node-local-dns needs the node this exporter runs on: --node-name, or "
            "DNSPROBE_NODE_NAME from the downward API (spec.nodeName), as "
            "deploy/overlays/daemonset sets it")
    if parsed.get("node-local-dns") and parsed.get("server"):
        problems.append("--node-local-dns is for a replica on a node (in-cluster mode); "
                        "with --server, give the cache as one more --server")
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
            node_name=parsed.get("node-name", DiscoverySettings.node_name),
            node_local_dns=parsed.get("node-local-dns"),
        ),
        probe_pod=ProbePodSettings(
            namespace=parsed.get("probe-pod-namespace", ProbePodSettings.namespace),
            image=parsed.get("probe-pod-image", ProbePodSettings.image),
        ),
        probe=probe,
        http=HttpSettings(host=listen_host, port=listen_port,
                          probe_endpoint=parsed.get("probe-endpoint", HttpSettings.probe_endpoint),
                          web_config_file=parsed.get("web-config-file")),
        remediation=RemediationSettings(
            mode=parsed.get("remediation", RemediationSettings.mode),
            webhook_token_file=parsed.get("webhook-token-file"),
            min_ready=parsed.get("min-ready", RemediationSettings.min_ready),
            cooldown=parsed.get("cooldown", RemediationSettings.cooldown),
            allow_delete=parsed.get("allow-delete", RemediationSettings.allow_delete),
            self_remediate=parsed.get("self-remediate", RemediationSettings.self_remediate),
        ),
        log_format=parsed.get("log-format", LogFormat.TEXT),
        json_output=bool(getattr(args, "json", False)),
        config_file=config_file,
    )


