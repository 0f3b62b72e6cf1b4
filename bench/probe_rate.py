"""Probe throughput and CPU per probe against N loopback CoreDNS targets.

One CoreDNS process answers on N loopback addresses; the exporter's scheduler probes all
of them for a fixed number of rounds, per protocol, and the same targets are then probed
with dnspython's own async query functions (the peer), in the same run, so the ratio is
measured on the same machine under the same load. CPU is this process's CPU time:
CoreDNS runs in its own process and is not counted.

    bench/run [--targets N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dns.asyncquery
import dns.message

from exporter.collector import ResultStore
from exporter.config import ProbeSettings
from exporter.probe import Protocol, Query
from exporter.scheduler import Scheduler
from exporter.targets import Endpoint, Kind, Target
from tests.harness import coredns
from tests.harness.components import coredns_binary

RESULTS = Path(__file__).parent / "results"
QUERY = Query("kubernetes", coredns.KUBERNETES_NAME + ".", "A", (coredns.KUBERNETES_IP,))
# Hard cap on any one measured phase, whatever --rounds says.
PHASE_LIMIT_SECONDS = 60.0


def addresses(n: int) -> list[str]:
    return [f"127.54.{i // 250}.{i % 250 + 2}" for i in range(n)]


async def measure(
    label: str, probes_per_round: int, rounds: int, one_round: Callable[[], Awaitable[int]]
) -> dict[str, float]:
    await one_round()  # warm-up: imports, caches, first sockets
    failures = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    done = 0
    for _ in range(rounds):
        failures += await one_round()
        done += 1
        if time.perf_counter() - wall0 > PHASE_LIMIT_SECONDS:
            break
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    probes = probes_per_round * done
    return {
        f"{label}_probes": probes,
        f"{label}_failures": failures,
        f"{label}_probes_per_second": probes / wall,
        f"{label}_cpu_per_probe_us": cpu / probes * 1e6,
    }


async def main_async(n: int, rounds: int, concurrency: int) -> dict[str, float]:
    binary = coredns_binary()
    if binary is None:
        sys.exit("bench: CoreDNS is not installed; run scripts/install-test-tools")
    hosts = addresses(n)
    with tempfile.TemporaryDirectory() as tmp:
        server = coredns.start(binary, Path(tmp), host=hosts[0], extra_hosts=hosts[1:])
        try:
            targets = [Target(Kind.STATIC, Endpoint(h, server.port)) for h in hosts]
            figures: dict[str, float] = {"targets": n, "rounds": rounds}
            for protocol in Protocol:
                settings = ProbeSettings(
                    protocols=(protocol,), timeout=2.0, concurrency=concurrency
                )
                scheduler = Scheduler(settings, ResultStore())
                scheduler.set_targets(targets, (QUERY,))

                async def ours(s: Scheduler = scheduler) -> int:
                    return sum(1 for _, r in await s.run_once() if not r.ok)

                figures |= await measure(protocol.value, n, rounds, ours)

            semaphore = asyncio.Semaphore(concurrency)

            async def peer_one(host: str) -> int:
                async with semaphore:
                    query = dns.message.make_query(QUERY.qname, "A")
                    try:
                        response = await dns.asyncquery.udp(query, host, 2.0, server.port)
                    except Exception:
                        return 1
                    return 0 if response.answer else 1

            async def peer() -> int:
                return sum(await asyncio.gather(*(peer_one(h) for h in hosts)))

            figures |= await measure("dnspython_udp", n, rounds, peer)
            figures["udp_cpu_ratio_vs_dnspython"] = (
                figures["dnspython_udp_cpu_per_probe_us"] / figures["udp_cpu_per_probe_us"]
            )
            return figures
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    if not 1 <= args.targets <= 5000 or not 1 <= args.rounds <= 1000:
        parser.error("--targets must be 1..5000 and --rounds 1..1000")
    figures = asyncio.run(main_async(args.targets, args.rounds, args.concurrency))
    for name, value in figures.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"probe_rate-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"machine": platform.uname()._asdict(), "figures": figures},
                              indent=2))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
