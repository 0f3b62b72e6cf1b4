"""Command line: parse, build settings, run `serve` or `check`.

Exit codes: 0 healthy (check) or clean shutdown (serve); 1 a target unhealthy (check) or a
runtime failure such as a port in use (serve); 2 a usage or configuration error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from . import __version__, logs, root
from .config import ConfigError, Settings, load
from .model import TARGET_LABELS, Check, ProbeResult
from .root import Plan
from .web.access import WebAccess
from .web.webconfig import WebConfigError

log = logging.getLogger("exporter")

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2


def _config_error(exc: ConfigError) -> int:
    print("coredns-health-exporter: configuration error:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        return _config_error(exc)
    logs.setup(settings.log_format)
    try:
        plan = root.plan_targets(settings)
        access = _web_access(settings)
    except ConfigError as exc:
        return _config_error(exc)
    # `check` is a command-line tool: its effective config is there for --log-level debug
    # readers, not printed above every table.
    loop_name, loop_factory = event_loop()
    log.log(
        logging.DEBUG if settings.command == "check" else logging.INFO,
        "starting coredns-health-exporter",
        extra={"fields": {"version": __version__, "event_loop": loop_name,
                          "config": settings.effective()}},
    )
    log.info(
        plan.source,
        extra={"fields": {"targets": [t.endpoint.address for t in plan.targets]}},
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if settings.command == "check":
                return runner.run(check(settings, plan))
            return runner.run(serve(settings, plan, access))
    except KeyboardInterrupt:
        return 130


def event_loop() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """uvloop's event loop where it is installed (a dependency but on Windows), else
    asyncio's own: its name, and its factory (None: asyncio's default)."""
    try:
        import uvloop
    except ImportError:
        return "asyncio", None
    from importlib.metadata import version

    return f"uvloop {version('uvloop')}", uvloop.new_event_loop


def _web_access(settings: Settings) -> WebAccess | None:
    """--web-config-file, read and checked now: a bad one is a configuration error."""
    path = settings.http.web_config_file
    if settings.command != "serve" or not path:
        return None
    try:
        return WebAccess(path)
    except WebConfigError as exc:
        raise ConfigError([f"--web-config-file: {exc}"]) from exc


# --- check ---


def result_record(check: Check, result: ProbeResult) -> dict[str, Any]:
    """One probe result as JSON-ready data; `check --json` prints a list of these."""
    record: dict[str, Any] = dict(zip(TARGET_LABELS, check.label_values(), strict=True))
    record.update(
        outcome=result.outcome.value,
        success=result.ok,
        rcode=result.rcode,
        answers=list(result.answers),
        latency_seconds=result.rtt_seconds,
        reason=result.reason,
        started_at=result.started_at,
    )
    return record


def format_table(rows: list[tuple[Check, ProbeResult]]) -> str:
    header = ("TARGET", "KIND", "PROTOCOL", "QUERY", "OUTCOME", "LATENCY", "REASON")
    lines: list[tuple[str, ...]] = [header]
    for check, result in rows:
        t = check.target
        name = t.endpoint.address
        if t.pod or t.service:
            name = f"{t.namespace}/{t.pod or t.service} ({name})"
        latency = f"{result.rtt_seconds * 1000:.2f}ms" if result.rtt_seconds is not None else "-"
        lines.append(
            (name, t.kind.value, check.protocol.value, check.query.label,
             result.outcome.value, latency, result.reason)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )


async def check(settings: Settings, plan: Plan) -> int:
    try:
        rows = await root.check(settings, plan)
    except root.CannotCheck as exc:
        print(f"coredns-health-exporter: {exc}", file=sys.stderr)
        if settings.json_output:  # a reader of stdout gets the failure as JSON too
            print(json.dumps({"healthy": False, "error": str(exc), "results": []}, indent=2))
        return EXIT_UNHEALTHY
    healthy = bool(rows) and all(result.ok for _, result in rows)
    if settings.json_output:
        data = {"healthy": healthy, "results": [result_record(c, r) for c, r in rows]}
        print(json.dumps(data, indent=2))
    else:
        print(format_table(rows))
        failing = sum(1 for _, r in rows if not r.ok)
        print(f"\n{len(rows) - failing} of {len(rows)} probes passed.")
    return EXIT_OK if healthy else EXIT_UNHEALTHY


# --- serve ---


async def serve(settings: Settings, plan: Plan, access: WebAccess | None = None) -> int:
    app = root.create_app(settings, plan, access)
    # lingering_time: how long an unread request body (a client cut off with 408 or 413) is
    # drained after the answer; aiohttp's 10 s default would hold shutdown that long.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, lingering_time=1.0)
    await runner.setup()
    host = settings.http.host or None
    site = web.TCPSite(runner, host, settings.http.port,
                       ssl_context=access.ssl_context if access else None)
    try:
        await site.start()
    except OSError as exc:
        log.error(
            "cannot listen",
            extra={"fields": {"listen": f"{settings.http.host}:{settings.http.port}",
                              "error": str(exc)}},
        )
        await runner.cleanup()
        return EXIT_UNHEALTHY
    addresses = [
        f"[{a[0]}]:{a[1]}" if ":" in str(a[0]) else f"{a[0]}:{a[1]}" for a in runner.addresses
    ]
    log.info("listening", extra={"fields": {
        "addresses": addresses, "tls": bool(access and access.ssl_context),
        "basic_auth": bool(access and access.config.users)}})
    # Everything made so far (modules, the kubernetes client's hundreds of classes, the
    # app) lives as long as the process: take it out of the cyclic collector's view, so
    # its full passes scan only what came later instead of stalling the event loop (and
    # the probes) for tens of milliseconds each.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight probes")
    await runner.cleanup()
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
