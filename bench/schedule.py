"""Probe rounds at 5,000 targets: on schedule, without drift, without bursts.

The scheduler probes 5,000 loopback targets over UDP every 5 s (timeout 1 s, so each
round's probes are spread over 4 s: 1,250 a second). Every probe's start time is
recorded. Drift: how far the k-th probe of a check starts from its first start plus k
intervals. Bursts: the busiest 100 ms of the run against the even spread's 125 probes.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

from exporter.config import ProbeSettings
from exporter.metrics.store import ResultStore, register
from exporter.model import Check, Endpoint, Kind, ProbeResult, Protocol, Target
from exporter.probing.scheduler import Scheduler

from .common import DNS_PORT, QUERY, percentile, serve_loop

INTERVAL = 5.0
TIMEOUT = 1.0
WINDOW = 0.1


async def _measure(hosts: list[str], rounds: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = register(registry)
    store = ResultStore()
    starts: dict[Check, list[float]] = defaultdict(list)
    record = store.record

    def recorded(check: Check, result: ProbeResult) -> bool:
        starts[check].append(result.started_at)
        return record(check, result)

    store.record = recorded  # type: ignore[method-assign]
    settings = ProbeSettings(protocols=(Protocol.UDP,), interval=INTERVAL, timeout=TIMEOUT)
    scheduler = Scheduler(settings, store, metrics)
    scheduler.set_targets([Target(Kind.STATIC, Endpoint(h, DNS_PORT)) for h in hosts], (QUERY,))
    task = asyncio.create_task(scheduler.run())
    try:
        await asyncio.sleep(INTERVAL * rounds + TIMEOUT)  # bounded: `rounds` rounds
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await scheduler.drain()
    drift = [
        abs(t - (times[0] + k * INTERVAL)) * 1000
        for times in starts.values()
        for k, t in enumerate(times)
    ]
    every = sorted(t for times in starts.values() for t in times)
    windows = Counter(int((t - every[0]) / WINDOW) for t in every)
    even = len(hosts) / (INTERVAL - TIMEOUT) * WINDOW
    results = store.latest().values()
    return {
        "schedule_targets": len(hosts),
        "schedule_probes": len(every),
        "schedule_success_ratio": sum(r.ok for r in results) / max(1, len(hosts)),
        "schedule_drift_ms_p99": percentile(drift, 0.99),
        "schedule_drift_ms_max": max(drift),
        "schedule_burst_ratio": max(windows.values()) / even,
        "schedule_round_overruns": registry.get_sample_value("dnsprobe_round_overruns_total")
        or 0.0,
    }


def run(workdir: Path, hosts: list[str], rounds: int = 5) -> dict[str, float]:
    del workdir  # nothing to write: the scheduler runs in this process
    return serve_loop(_measure(hosts, rounds))
