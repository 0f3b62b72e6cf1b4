"""Latency truth and scrape cost: 1,000 pod targets x UDP and TCP, probed every 5 s (the
default) and then every second (2,000 probes a second), scraped once a second.

The exporter's own application (`create_app`, its scheduler, its /metrics) runs in this
process with 1,000 targets labelled as pods; one CoreDNS answers on their 1,000 loopback
addresses. Two helper processes do what the outside world does: `bench.scraper` scrapes
/metrics every second and times it (2,000 checks: 48,000 samples with the histograms),
and `bench.capture` records every UDP query and response on the loopback interface with
kernel timestamps, the true round trips. Each UDP result the exporter records is paired
with its query on the wire (same server, first query after the probe started), and its
reported latency compared with the wire's. A 5 ms ticker measures how late the event
loop runs while all this happens: that is how long a probe can wait to be sent.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from exporter.config import load
from exporter.model import Check, Endpoint, Kind, ProbeResult, Protocol, Target
from exporter.root import Plan, create_app
from exporter.web.state import STATE

from .capture import start as start_capture
from .common import DNS_PORT, QUERY, free_port, percentile, serve_loop
from .common import process as child_process

WARMUP = 3.0
TICK = 0.005


def pod_targets(hosts: list[str]) -> list[Target]:
    """Targets labelled as a real cluster's CoreDNS pods would be."""
    return [
        Target(Kind.POD, Endpoint(h, DNS_PORT), "kube-system", "kube-dns",
               f"coredns-5d78c9869d-{i:05d}", f"node-{i % 100:03d}")
        for i, h in enumerate(hosts)
    ]


class Recorder:
    """Every UDP result the store records: (server, started_at, reported rtt)."""

    def __init__(self) -> None:
        self.results: list[tuple[str, float, float]] = []
        self.recording = False

    def wrap(
        self, record: Callable[[Check, ProbeResult], bool]
    ) -> Callable[[Check, ProbeResult], bool]:
        def recorded(check: Check, result: ProbeResult) -> bool:
            if (self.recording and check.protocol is Protocol.UDP
                    and result.rtt_seconds is not None):
                self.results.append(
                    (check.target.endpoint.host, result.started_at, result.rtt_seconds)
                )
            return record(check, result)

        return recorded


def match(
    results: list[tuple[str, float, float]], pairs: list[list[object]]
) -> list[float]:
    """Reported minus true round trip, in microseconds, for every result found on the wire."""
    wire: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for server, sent, received in pairs:
        wire[str(server)].append((int(str(sent)), int(str(received))))
    for trips in wire.values():
        trips.sort()
    errors = []
    for server, started_at, rtt in results:
        trips = wire.get(server, [])
        i = bisect.bisect_left(trips, (int(started_at * 1e9), 0))
        if i < len(trips) and trips[i][0] - started_at * 1e9 < 50e6:  # sent within 50 ms
            sent, received = trips[i]
            errors.append(rtt * 1e6 - (received - sent) / 1e3)
    return errors


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    expected = loop.time() + TICK
    while not stop.is_set():
        await asyncio.sleep(max(0.0, expected - loop.time()))
        lags.append((loop.time() - expected) * 1000)
        expected = max(expected + TICK, loop.time())


async def _measure(
    workdir: Path, hosts: list[str], seconds: float, interval: float = 1.0
) -> dict[str, float]:
    port = free_port()
    settings = load(["serve", "--server", hosts[0], "--interval", str(interval),
                     "--timeout", "0.5", "--protocol", "both", "--listen", f"127.0.0.1:{port}"])
    app = create_app(settings, Plan(pod_targets(hosts), (QUERY,), "bench: 1,000 pod targets"))
    store = app[STATE].store
    recorder = Recorder()
    store.record = recorder.wrap(store.record)  # type: ignore[method-assign,assignment]
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    gc.freeze()  # as `serve` does once it listens
    lags: list[float] = []
    stop = asyncio.Event()
    try:
        await asyncio.sleep(WARMUP)  # rounds settle before anything is measured
        capture_out, scrape_out = workdir / "capture.json", workdir / "scrapes.json"
        capture = await asyncio.to_thread(start_capture, DNS_PORT, seconds + 1, capture_out)
        scraper_args = [sys.executable, "-m", "bench.scraper",
                        f"http://127.0.0.1:{port}/metrics", str(int(seconds)), str(scrape_out)]
        with child_process(scraper_args, workdir / "scraper.log") as scraper:
            recorder.recording = True
            ticker = asyncio.create_task(_ticker(lags, stop))
            await asyncio.to_thread(scraper.wait, seconds + 30)
            recorder.recording = False
            stop.set()
            await ticker
        await asyncio.to_thread(capture.wait, 30)
    finally:
        await runner.cleanup()
    wire = json.loads(capture_out.read_text())
    scrapes = json.loads(scrape_out.read_text())
    errors = match(recorder.results, wire["pairs"])
    absolute = [abs(e) for e in errors]
    return {
        "latency_probes_matched": len(errors),
        "latency_probes_recorded": len(recorder.results),
        "latency_error_p50_us": percentile(absolute, 0.5),
        "latency_error_p99_us": percentile(absolute, 0.99),
        "latency_error_signed_p50_us": percentile(errors, 0.5),
        "scrape_ms_2000_series": percentile(scrapes["ms"], 0.5),
        "scrape_ms_2000_series_max": max(scrapes["ms"]),
        "scrape_bytes": scrapes["bytes"][-1],
        "loop_lag_p99_ms": percentile(lags, 0.99),
        "loop_lag_max_ms": max(lags),
    }


def run(workdir: Path, hosts: list[str], seconds: float) -> dict[str, float]:
    """Twice: at the default interval (5 s: 400 probes a second) for the scrape figures,
    then at 1 s (2,000 probes a second) for latency truth under load."""
    started = time.monotonic()
    normal = serve_loop(_measure(workdir, hosts, seconds, interval=5.0))
    loaded = serve_loop(_measure(workdir, hosts, seconds, interval=1.0))
    figures = {k: v for k, v in loaded.items() if k.startswith("latency_")}
    figures |= {k: v for k, v in normal.items() if not k.startswith("latency_")}
    figures |= {f"{k}_at_2000_probes_per_s": v for k, v in loaded.items()
                if k.startswith(("scrape_ms", "loop_lag"))}
    figures["latency_error_p50_us_at_400_probes_per_s"] = normal["latency_error_p50_us"]
    figures["latency_phase_seconds"] = time.monotonic() - started
    return figures
