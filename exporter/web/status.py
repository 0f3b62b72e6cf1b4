"""The HTML status page: targets, last result per protocol, last remediations.
"""

from __future__ import annotations

import html
import time

from aiohttp import web

from .. import __version__
from ..model import Check, Outcome, ProbeResult
from .state import STATE, AppState, Parts


def _cell(result: ProbeResult | None) -> str:
    if result is None:
        return "<td>pending</td>"
    css = "ok" if result.ok else "bad"
    latency = f" {result.rtt_seconds * 1000:.2f}&nbsp;ms" if result.rtt_seconds is not None else ""
    return (
        f'<td class="{css}" title="{html.escape(result.reason)}">'
        f"{html.escape(result.outcome.value)}{latency}</td>"
    )


def _remediations(state: AppState, parts: Parts | None) -> str:
    if parts is None:
        return "<p>None yet: the exporter is deciding how it reaches CoreDNS.</p>"
    if parts.remediator.note is not None:
        return f"<p>None: {html.escape(parts.remediator.note)}.</p>"
    mode = html.escape(state.settings.remediation.mode.value)
    rows = [
        f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(d.at))}</td>"
        f"<td>{html.escape(d.pod)}</td><td>{html.escape(d.alert)}</td>"
        f"<td>{html.escape(d.trigger)}</td>"
        f"<td>{html.escape(d.action.value)}</td><td>{html.escape(d.result)}</td>"
        f"<td>{html.escape(d.message)}</td></tr>"
        for d in reversed(parts.remediator.recent)
    ]
    return (f"<p>Mode: {mode}. Last decisions, newest first (UTC):</p><table><tr><th>time</th>"
            "<th>pod</th><th>alert</th><th>trigger</th><th>action</th><th>result</th>"
            "<th>why</th></tr>"
            + ("".join(rows) or '<tr><td colspan="7">none yet</td></tr>') + "</table>")


async def status_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    parts = state.parts.get()
    latest = state.store.latest()
    protocols = state.settings.probe.protocols
    rows = []
    checks = parts.scheduler.checks if parts is not None else []
    for t, query in dict.fromkeys((c.target, c.query) for c in checks):
        cells = "".join(
            _cell(latest.get(Check(t, p, query))) if t.only in (None, p) else "<td>-</td>"
            for p in protocols
        )
        rows.append(
            f"<tr><td>{html.escape(t.kind.value)}</td><td>{html.escape(t.endpoint.address)}</td>"
            f"<td>{html.escape(t.namespace)}</td><td>{html.escape(t.pod or t.service)}</td>"
            f"<td>{html.escape(t.node)}</td><td>{html.escape(query.label)}</td>{cells}</tr>"
        )
    mode = parts.mode if parts is not None else "being decided"
    head = "".join(f"<th>{p.value}</th>" for p in protocols)
    failing = sum(1 for r in latest.values() if r.outcome is not Outcome.SUCCESS)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>coredns-health-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.ok{{background:#dfd}}.bad{{background:#fdd}}</style></head><body>
<h1>coredns-health-exporter {html.escape(__version__)}</h1>
<p>Targets: {html.escape(state.source)}. Mode: {html.escape(mode)}.
Ready: {"yes" if state.ready else "no"}.
Checks failing now: {failing} of {len(latest)} with a result.</p>
<p><a href="/metrics">Metrics</a> &middot; <a href="/-/ready">Readiness</a></p>
<h2>Targets</h2>
<table><tr><th>kind</th><th>address</th><th>namespace</th><th>pod / service</th><th>node</th>
<th>query</th>{head}</tr>
{"".join(rows) or '<tr><td colspan="9">no targets</td></tr>'}
</table>
<h2>Remediations</h2>
{_remediations(state, parts)}
</body></html>
"""
    return web.Response(text=page, content_type="text/html")

