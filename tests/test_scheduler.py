"""Probe rounds: per-check start offsets leave room for the timeout and are seeded per
process; the concurrency bound holds; rounds against real CoreDNS record results; a
removed target's late result leaves no trace."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from exporter.config import ProbeSettings
from exporter.metrics.store import ResultStore, register
from exporter.model import Endpoint, Kind, Outcome, ProbeResult, Protocol, Query, Target
from exporter.probing.scheduler import Scheduler
from tests.conftest import StartDNS
from tests.harness.coredns import KUBERNETES_NAME, Behaviour, CoreDNS

QUERY = Query("kubernetes", KUBERNETES_NAME + ".")


def targets(n: int, host: str = "127.0.0.1", port: int = 53) -> list[Target]:
    return [Target(Kind.STATIC, Endpoint(host, port + i)) for i in range(n)]


def test_offsets_spread_over_the_interval_minus_the_timeout() -> None:
    settings = ProbeSettings(interval=5.0, timeout=1.0)
    scheduler = Scheduler(settings, ResultStore())
    scheduler.set_targets(targets(500), (QUERY,))
    offsets = [scheduler.offset(c) for c in scheduler.checks]
    assert len(offsets) == 1000
    assert all(0 <= o < 4.0 for o in offsets)
    # spread, not bunched: every 0.5 s slice of the window holds some starts
    assert {int(o / 0.5) for o in offsets} == set(range(8))


def test_offsets_differ_between_processes() -> None:
    a, b = Scheduler(ProbeSettings(), ResultStore()), Scheduler(ProbeSettings(), ResultStore())
    for s in (a, b):
        s.set_targets(targets(20), (QUERY,))
    assert [a.offset(c) for c in a.checks] != [b.offset(c) for c in b.checks]


async def test_concurrency_bound_holds(start_dns: StartDNS) -> None:
    slow = start_dns(Behaviour.SLOW, delay="200ms")
    settings = ProbeSettings(protocols=(Protocol.UDP,), timeout=1.0, concurrency=2)
    scheduler = Scheduler(settings, ResultStore())
    # six checks of one server: distinct queries, so six separate probes
    queries = tuple(Query(f"q{i}", f"q{i}.example.") for i in range(6))
    scheduler.set_targets([Target(Kind.STATIC, Endpoint(slow.host, slow.port))], queries)
    started = time.monotonic()
    results = await scheduler.run_once()
    elapsed = time.monotonic() - started
    assert len(results) == 6 and all(r.ok for _, r in results)
    # two at a time, 200 ms each: at least three waves
    assert elapsed >= 0.6


async def test_rounds_record_results_and_count_rounds(healthy_dns: CoreDNS) -> None:
    registry = CollectorRegistry()
    store = ResultStore()
    metrics = register(registry)
    settings = ProbeSettings(interval=0.2, timeout=0.1)
    scheduler = Scheduler(settings, store, metrics)
    scheduler.set_targets([Target(Kind.STATIC, Endpoint(healthy_dns.host, healthy_dns.port))],
                          (QUERY,))
    task = asyncio.create_task(scheduler.run())
    try:
        async with asyncio.timeout(10):
            while (registry.get_sample_value("dnsprobe_rounds_total") or 0) < 3:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await scheduler.drain()
    latest = store.latest()
    assert len(latest) == 2 and all(r.ok for r in latest.values())
    # A probe that answers in well under the 0.1 s timeout never makes a round late; a
    # busy machine might, once, in the three or more rounds run.
    rounds = registry.get_sample_value("dnsprobe_rounds_total") or 0
    assert (registry.get_sample_value("dnsprobe_round_overruns_total") or 0) <= rounds / 3


def test_a_removed_targets_late_result_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A probe in flight when its target was removed ends later: its result is dropped
    from the store, and so is its `probe outcome changed` line."""
    store = ResultStore()
    scheduler = Scheduler(ProbeSettings(interval=1, timeout=0.5), store)
    [gone, kept] = targets(2)
    scheduler.set_targets([gone, kept], (QUERY,))
    late = next(c for c in scheduler.checks if c.target == gone)
    live = next(c for c in scheduler.checks if c.target == kept)
    scheduler.set_targets([kept], (QUERY,))
    with caplog.at_level(logging.INFO, logger="exporter.probing.scheduler"):
        scheduler.record(late, ProbeResult(Outcome.TIMEOUT, "no response within 0.5s"))
        scheduler.record(live, ProbeResult(Outcome.TIMEOUT, "no response within 0.5s"))
    changed = [r for r in caplog.records if r.getMessage() == "probe outcome changed"]
    assert [getattr(r, "fields", {}).get("address") for r in changed] == [
        kept.endpoint.address]
    assert list(store.latest()) == [live]
