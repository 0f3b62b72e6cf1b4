"""`/probe`: one probe now, blackbox-exporter style: a fresh registry with this probe's
metrics, or with debug=true its log lines, metrics and effective settings as text.

Bounded: `--probe-endpoint` says who may be probed (any address, only those the exporter
probes already, or none: 404), and at most web.state.MAX_PROBE_INFLIGHT run at once; beyond,
503 with Retry-After, as the webhook does, so a flood costs neither sockets nor memory
without end.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from ..config import ProbeEndpoint, Settings, parse_query
from ..dns.engine import probe
from ..metrics.exposition import DURATION_HELP
from ..metrics.store import BUCKETS
from ..model import Endpoint, Protocol, Query, parse_endpoint
from .state import STATE, AppState

# Upper bound for /probe?timeout=: a scrape that waits longer is a misconfiguration.
MAX_PROBE_TIMEOUT = 30.0


class _BadRequest(Exception):
    pass


def _probe_params(
    request: web.Request, settings: Settings
) -> tuple[str, int, Protocol, Query, float]:
    params = request.query
    problems: list[str] = []
    target = params.get("target", "")
    host, port = "", 0
    if not target:
        problems.append("target: required, as IP or IP:PORT")
    else:
        try:
            endpoint = parse_endpoint(target, 53)
            host, port = endpoint.host, endpoint.port
        except ValueError as exc:
            problems.append(f"target: {exc}")
    name = params.get("query", settings.default_query_name())
    rdtype = params.get("type", "A")
    query = Query(label=name, qname=name, rdtype=rdtype)
    try:
        query = parse_query(f"{name}/{rdtype}", tuple(params.getall("expect", [])))
    except ValueError as exc:
        problems.append(f"query: {exc}")
    protocol = Protocol.UDP
    try:
        protocol = Protocol(params.get("protocol", "udp").lower())
    except ValueError:
        problems.append(f"protocol: expected udp or tcp, got {params.get('protocol')!r}")
    timeout = settings.probe.timeout
    if "timeout" in params:
        try:
            timeout = float(params["timeout"])
            if not 0 < timeout <= MAX_PROBE_TIMEOUT:
                raise ValueError
        except ValueError:
            problems.append(f"timeout: expected seconds, above 0 and at most {MAX_PROBE_TIMEOUT:g}")
    if problems:
        raise _BadRequest("\n".join(problems))
    return host, port, protocol, query, timeout


async def probe_handler(request: web.Request) -> web.Response:
    """One probe now, blackbox-exporter style: a fresh registry with this probe's metrics.
    404 when --probe-endpoint is off, 400 for bad parameters, 403 for an address this
    exporter does not probe (known), 503 with Retry-After when too many are in flight."""
    state = request.app[STATE]
    settings = state.settings
    allowed = settings.http.probe_endpoint
    if allowed is ProbeEndpoint.OFF:
        return web.Response(status=404, text="not found: /probe is off (--probe-endpoint off)\n")
    try:
        host, port, protocol, query, timeout = _probe_params(request, settings)
    except _BadRequest as exc:
        return web.Response(status=400, text=f"bad /probe request:\n{exc}\n")
    if allowed is ProbeEndpoint.KNOWN:
        refused = _unknown(state, host, port)
        if refused is not None:
            return refused
    busy = state.probe.refuse()
    if busy is not None:
        return busy
    with state.probe.held():
        return await _probe(request, host, port, protocol, query, timeout)


def _unknown(state: AppState, host: str, port: int) -> web.Response | None:
    """With --probe-endpoint known: None when host:port is one of the exporter's targets,
    else the answer that refuses it."""
    parts = state.parts.get()
    if parts is None:  # the mode is being decided: no target is known yet
        return web.Response(status=503, text="not ready: the targets are not known yet\n",
                            headers={"Retry-After": "5"})
    wanted = Endpoint(host, port)
    if any(_same(t.endpoint, wanted) for t in parts.scheduler.targets):
        return None
    return web.Response(status=403, text=(
        f"forbidden: {wanted.address} is not among the addresses this exporter probes "
        "(--probe-endpoint known)\n"))


def _same(a: Endpoint, b: Endpoint) -> bool:
    """The same address and port, whatever the spelling of an IPv6 address."""
    return a.port == b.port and ipaddress.ip_address(a.host) == ipaddress.ip_address(b.host)


async def _probe(request: web.Request, host: str, port: int, protocol: Protocol,
                 query: Query, timeout: float) -> web.Response:
    trace: list[str] = []
    result = await probe(host, port, protocol, query, timeout, trace=trace)
    registry = CollectorRegistry()
    Gauge("dnsprobe_success", "1 if the probe passed, else 0.", registry=registry).set(
        1 if result.ok else 0
    )
    # The same type as on /metrics: a histogram, here of this one probe.
    duration = Histogram("dnsprobe_duration_seconds", DURATION_HELP, buckets=BUCKETS,
                         registry=registry)
    if result.rtt_seconds is not None:
        duration.observe(result.rtt_seconds)
    Gauge(
        "dnsprobe_outcome",
        "The probe's outcome and rcode; always 1.",
        ["result", "rcode"],
        registry=registry,
    ).labels(result=result.outcome.value, rcode=result.rcode or "").set(1)
    body = generate_latest(registry).decode()
    if request.query.get("debug", "").lower() != "true":
        return web.Response(text=body, content_type="text/plain", charset="utf-8")
    lines = [
        "Logs for the probe:",
        *trace,
        "",
        "Metrics that would have been returned:",
        body.rstrip("\n"),
        "",
        "Settings:",
        f"target: {parse_endpoint(request.query['target'], 53).address}",
        f"query: {query.qname} {query.rdtype}",
        f"expect: {', '.join(query.expect) or '(any answer of the asked type)'}",
        f"protocol: {protocol}",
        f"timeout: {timeout:g}s",
        f"outcome: {result.outcome} ({result.reason})",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


