"""The aiohttp application: routes, the probe loop as a cleanup context, and target planning.

`create_app(settings, plan)` is used alike by `serve` and by the tests (`aiohttp_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest

from . import __version__, kube, modes
from .collector import ProcessMetrics, ResultStore, register
from .config import DEFAULT_QUERY_LABEL, ConfigError, Settings, parse_query
from .discovery import Discovery
from .exposition import Exposition
from .model import Outcome, ProbeResult, Protocol, Query
from .probe import probe
from .remediate import NO_KUBERNETES, Action, ApiUnavailable, Decision, Remediator
from .scheduler import Scheduler
from .targets import Check, Target, parse_endpoint, read_resolv_conf, static_targets
from .webhook import MAX_BODY, PayloadError, TokenFile, authorized, parse_payload

log = logging.getLogger(__name__)

# Seconds a webhook client has to send its whole body (Alertmanager sends it at once).
BODY_TIMEOUT = 10.0
# Webhook requests handled at once (bodies read, or waiting for the remediator); beyond,
# 503 with Retry-After: a flood neither fills memory with bodies nor queues without end.
MAX_WEBHOOK_INFLIGHT = 8
# Upper bound for /probe?timeout=: a scrape that waits longer is a misconfiguration.
MAX_PROBE_TIMEOUT = 30.0


@dataclass
class Plan:
    """What to probe, and a sentence on why, for the log and the status page."""

    targets: list[Target]
    queries: tuple[Query, ...]
    source: str
    # Set when the targets come from Kubernetes discovery (then `targets` starts empty).
    client: kube.Client | None = None


@dataclass
class AppState:
    settings: Settings
    plan: Plan
    registry: CollectorRegistry
    exposition: Exposition
    store: ResultStore
    scheduler: Scheduler
    metrics: ProcessMetrics
    discovery: Discovery | None = None
    remediator: Remediator | None = None
    token: TokenFile = field(default_factory=lambda: TokenFile(None))
    started_at: float = field(default_factory=time.time)
    webhook_inflight: int = 0
    webhook_busy_told: bool = False

    @property
    def ready(self) -> bool:
        """Static targets are ready at once; discovered ones once discovery has synced."""
        return self.discovery is None or self.discovery.synced


STATE = web.AppKey("state", AppState)


def default_query(settings: Settings, expect: tuple[str, ...] = ()) -> Query:
    return Query(
        label=DEFAULT_QUERY_LABEL,
        qname=settings.default_query_name() + ".",
        rdtype="A",
        expect=expect,
    )


def plan_targets(settings: Settings) -> Plan:
    """Decide what to probe: `--server`, else Kubernetes, else the resolver's nameservers.

    Raises ConfigError when the choice cannot be made (nothing to probe, a named
    kubeconfig that does not exist).
    """
    d = settings.discovery
    queries = settings.probe.queries or (default_query(settings),)
    if d.servers:
        return Plan(static_targets(d.servers), queries, "static targets from --server")
    try:
        found = kube.find_config(d.kubeconfig)
    except kube.KubeConfigError as exc:
        raise ConfigError([str(exc)]) from exc
    if found is not None:
        try:
            client = kube.Client.connect(found)
        except kube.KubeConfigError as exc:
            raise ConfigError([str(exc)]) from exc
        return Plan(
            [],
            queries,
            f"Kubernetes discovery of Service {d.namespace}/{d.service} and its pods "
            f"(config: {found}, API server: {client.server})",
            client,
        )
    path = Path(d.resolv_conf)
    try:
        endpoints = read_resolv_conf(path)
    except OSError as exc:
        raise ConfigError(
            [f"no --server and no Kubernetes config, and the resolver file {path} "
             f"(--resolv-conf) cannot be read: {exc.strerror}"]
        ) from exc
    if not endpoints:
        raise ConfigError(
            [f"no --server, no Kubernetes config, and the resolver file {path} "
             "(--resolv-conf) lists no nameserver to probe"]
        )
    return Plan(
        static_targets(endpoints),
        queries,
        f"embedded default: no --server and no Kubernetes config found, probing the "
        f"nameservers of {path}",
    )


def create_app(settings: Settings, plan: Plan) -> web.Application:
    registry = CollectorRegistry()
    store = ResultStore()
    pod_ready: dict[Target, bool] = {}  # discovery keeps it current; the collector reads it
    metrics = register(registry)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    scheduler = Scheduler(settings.probe, store, metrics)
    scheduler.set_targets(plan.targets, plan.queries)
    discovery = remediator = None
    if plan.client is not None:
        discovery = Discovery(
            settings, plan.client, scheduler, metrics,
            lambda expect: default_query(settings, expect), pod_ready,
        )
        remediator = Remediator(settings, plan.client, metrics, lambda: discovery.queries)
    else:
        metrics.discovery_synced.set(1)
        # The one decision a webhook can get here, exported from 0 like every other.
        metrics.remediations.labels(action=Action.SKIP.value, result=NO_KUBERNETES)

    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = AppState(
        settings, plan, registry, Exposition(store, pod_ready, registry), store, scheduler,
        metrics, discovery, remediator,
        TokenFile(settings.remediation.webhook_token_file),
    )
    app.cleanup_ctx.append(_probe_loop)
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/probe", probe_handler)
    app.router.add_post("/webhook/alertmanager", webhook_handler)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app


async def _probe_loop(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    loop = asyncio.get_running_loop()
    state.metrics.tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
    if state.discovery is None or state.plan.client is None:
        state.metrics.mode.labels(mode="static").set(1)
        tasks = [asyncio.create_task(state.scheduler.run(), name="probe-rounds")]
    else:
        tasks = [asyncio.create_task(modes.run(
            state.settings, state.plan.client, state.discovery, state.scheduler,
            state.metrics, state.remediator, default_query(state.settings),
        ), name="kubernetes")]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await state.scheduler.drain()
    if state.plan.client is not None:
        state.plan.client.close()


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """Streamed: the body of a large cluster is megabytes, rendered between probes."""
    exposition = request.app[STATE].exposition
    accept = request.headers.get("Accept", "")
    response = web.StreamResponse(headers={"Content-Type": exposition.content_type(accept)})
    await response.prepare(request)
    async for chunk in exposition.stream(accept):
        await response.write(chunk)
    await response.write_eof()
    return response


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[STATE].ready:
        return web.Response(text="Ready.\n")
    return web.Response(status=503, text="Not ready: target discovery has not synced yet.\n")


async def webhook_handler(request: web.Request) -> web.Response:
    """Alertmanager's webhook: 503 (no token), 401, 413, 400, then a decision per alert."""
    state = request.app[STATE]
    token = state.token.current()
    if token is None:
        state.token.tell_once()
        return web.Response(status=503, text=f"webhook disabled: {state.token.problem}\n")
    if not authorized(request.headers.get("Authorization", ""), token):
        return web.Response(status=401, text="unauthorized: a valid bearer token is required\n",
                            headers={"WWW-Authenticate": 'Bearer realm="webhook"'})
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _too_large()
    if state.webhook_inflight >= MAX_WEBHOOK_INFLIGHT:
        if not state.webhook_busy_told:
            state.webhook_busy_told = True
            log.warning("webhook: too many requests at once; answering 503 until some end",
                        extra={"fields": {"in_flight": state.webhook_inflight}})
        return web.Response(status=503, text="busy: too many webhook requests at once\n",
                            headers={"Retry-After": "10", "Connection": "close"})
    state.webhook_inflight += 1
    try:
        return await _webhook(request, state)
    finally:
        state.webhook_inflight -= 1
        if state.webhook_inflight == 0:
            state.webhook_busy_told = False


def _too_large() -> web.Response:
    return web.Response(status=413, text=f"body larger than {MAX_BODY} bytes\n")


async def _webhook(request: web.Request, state: AppState) -> web.Response:
    try:
        # A client that trickles its body must not hold a handler (and its memory) open.
        body = await asyncio.wait_for(request.read(), timeout=BODY_TIMEOUT)
    except web.HTTPRequestEntityTooLarge:
        return _too_large()
    except TimeoutError:
        log.warning("webhook: body not received in time", extra={"fields": {
            "remote": request.remote, "timeout_seconds": BODY_TIMEOUT}})
        return web.Response(status=408, text=f"body not received within {BODY_TIMEOUT:g}s\n",
                            headers={"Connection": "close"})
    try:
        payload = parse_payload(body)
    except PayloadError as exc:
        log.warning("webhook: bad payload", extra={"fields": {"error": str(exc)}})
        return web.Response(status=400, text=f"bad Alertmanager payload: {exc}\n")
    if state.remediator is None:
        decisions = [Decision(Action.SKIP, NO_KUBERNETES, "remediation needs Kubernetes "
                              "discovery; this exporter probes static targets")
                     for _ in payload.alerts]
        for d in decisions:
            state.metrics.remediations.labels(action=d.action.value, result=d.result).inc()
        log.info("remediation skipped: no Kubernetes", extra={"fields": {
            "alerts": len(decisions)}})
    else:
        try:
            decisions = await state.remediator.handle(payload)
        except ApiUnavailable as exc:
            log.warning("webhook: Kubernetes API unavailable; answering 503 so that "
                        "Alertmanager retries", extra={"fields": {"error": str(exc)}})
            return web.Response(status=503, text=f"Kubernetes API unavailable: {exc}\n")
        except Exception as exc:  # a bug must not take the exporter down; say it plainly
            log.exception("webhook: internal error")
            return web.Response(status=500, text=f"internal error: {exc!r}\n")
    return web.json_response({"decisions": [
        {"pod": d.pod, "namespace": d.namespace, "alert": d.alert, "action": d.action.value,
         "result": d.result, "message": d.message} for d in decisions
    ]})


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
    """One probe now, blackbox-exporter style: a fresh registry with this probe's metrics."""
    settings = request.app[STATE].settings
    try:
        host, port, protocol, query, timeout = _probe_params(request, settings)
    except _BadRequest as exc:
        return web.Response(status=400, text=f"bad /probe request:\n{exc}\n")
    trace: list[str] = []
    result = await probe(host, port, protocol, query, timeout, trace=trace)
    registry = CollectorRegistry()
    Gauge("dnsprobe_success", "1 if the probe passed, else 0.", registry=registry).set(
        1 if result.ok else 0
    )
    if result.rtt_seconds is not None:
        Gauge(
            "dnsprobe_duration_seconds", "Round-trip time of the probe.", registry=registry
        ).set(result.rtt_seconds)
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


def _cell(result: ProbeResult | None) -> str:
    if result is None:
        return "<td>pending</td>"
    css = "ok" if result.ok else "bad"
    latency = f" {result.rtt_seconds * 1000:.2f}&nbsp;ms" if result.rtt_seconds is not None else ""
    return (
        f'<td class="{css}" title="{html.escape(result.reason)}">'
        f"{html.escape(result.outcome.value)}{latency}</td>"
    )


def _remediations(state: AppState) -> str:
    if state.remediator is None:
        return "<p>None: remediation needs Kubernetes; this exporter probes static targets.</p>"
    mode = html.escape(state.settings.remediation.mode.value)
    rows = [
        f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(d.at))}</td>"
        f"<td>{html.escape(d.pod)}</td><td>{html.escape(d.alert)}</td>"
        f"<td>{html.escape(d.action.value)}</td><td>{html.escape(d.result)}</td>"
        f"<td>{html.escape(d.message)}</td></tr>"
        for d in reversed(state.remediator.recent)
    ]
    return (f"<p>Mode: {mode}. Last decisions, newest first (UTC):</p><table><tr><th>time</th>"
            "<th>pod</th><th>alert</th><th>action</th><th>result</th><th>why</th></tr>"
            + ("".join(rows) or '<tr><td colspan="6">none yet</td></tr>') + "</table>")


async def status_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    latest = state.store.latest()
    protocols = state.settings.probe.protocols
    rows = []
    for t, query in dict.fromkeys((c.target, c.query) for c in state.scheduler.checks):
        cells = "".join(
            _cell(latest.get(Check(t, p, query))) if t.only in (None, p) else "<td>-</td>"
            for p in protocols
        )
        rows.append(
            f"<tr><td>{html.escape(t.kind.value)}</td><td>{html.escape(t.endpoint.address)}</td>"
            f"<td>{html.escape(t.namespace)}</td><td>{html.escape(t.pod or t.service)}</td>"
            f"<td>{html.escape(t.node)}</td><td>{html.escape(query.label)}</td>{cells}</tr>"
        )
    mode = ("static" if state.discovery is None else
            state.discovery.mode.value if state.ready else "being decided")
    head = "".join(f"<th>{p.value}</th>" for p in protocols)
    failing = sum(1 for _, r in state.scheduler.history if r.outcome is not Outcome.SUCCESS)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coredns-health-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.ok{{background:#dfd}}.bad{{background:#fdd}}</style></head><body>
<h1>coredns-health-exporter {html.escape(__version__)}</h1>
<p>Targets: {html.escape(state.plan.source)}. Mode: {html.escape(mode)}.
Ready: {"yes" if state.ready else "no"}.
Failing results among the last {len(state.scheduler.history)}: {failing}.</p>
<p><a href="/metrics">Metrics</a> &middot; <a href="/-/ready">Readiness</a></p>
<h2>Targets</h2>
<table><tr><th>kind</th><th>address</th><th>namespace</th><th>pod / service</th><th>node</th>
<th>query</th>{head}</tr>
{"".join(rows) or '<tr><td colspan="9">no targets</td></tr>'}
</table>
<h2>Remediations</h2>
{_remediations(state)}
</body></html>
"""
    return web.Response(text=page, content_type="text/html")
