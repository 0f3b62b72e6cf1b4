"""CPU per probe: the exporter and Debian's blackbox_exporter on the same targets.

Both run as their own processes against one CoreDNS answering on N loopback addresses,
asking the same question and validating the answer (rcode NOERROR, the expected A
record), over UDP, at the same rate. The exporter probes on its own schedule and is
scraped once a second; blackbox_exporter probes once per HTTP request to /probe, which is
how Prometheus drives it, so its figure includes that request, as it does in production.
CPU is read from /proc for each process over the same length of time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import aiohttp

from .common import (
    DNS_PORT,
    QUERY,
    await_http,
    cpu_seconds,
    cpu_split,
    fetch,
    free_port,
    percentile,
    process,
    rss_mb,
    sample_sum,
)

WARMUP = 3.0


def exporter_phase(workdir: Path, hosts: list[str], seconds: float) -> dict[str, float]:
    """The exporter probing every host once a second over UDP, scraped every second."""
    figures = serve_and_scrape(workdir, hosts, seconds, interval=1, protocol="udp", every=1.0)
    return {
        "exporter_probes": figures["probes"],
        "exporter_probes_per_second": figures["probes_per_second"],
        "exporter_success_ratio": figures["success_ratio"],
        "exporter_scrapes": figures["scrapes"],
        "cpu_per_probe_us": figures["cpu_per_probe_us"],
        "system_cpu_per_probe_us": figures["system_cpu_per_probe_us"],
    }


def serve_and_scrape(
    workdir: Path, hosts: list[str], seconds: float, *, interval: float, protocol: str,
    every: float,
) -> dict[str, float]:
    """`serve` (its own process) probing `hosts` every `interval` seconds over `protocol`
    with the answer validated, scraped every `every` seconds for `seconds`: its CPU per
    probe, the scrapes' time and size, its resident memory at the end."""
    port = free_port()
    config = workdir / "exporter.yaml"
    config.write_text(json.dumps({
        "server": [f"{h}:{DNS_PORT}" for h in hosts],
        "query": [{"name": QUERY.qname, "expect": list(QUERY.expect)}],
        "protocol": protocol,
        "interval": interval,
        "timeout": min(1.0, interval / 2),
        "listen": f"127.0.0.1:{port}",
    }))
    log = workdir / "exporter.log"
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "exporter", "serve", "--config", str(config)]
    with process(args, log) as child:
        await_http(url + "/-/ready", child, log)
        time.sleep(WARMUP + interval)  # a whole round first: the window starts in steady state
        before = after = fetch(url + "/metrics").decode()
        (user0, system0), t0 = cpu_split(child.pid), time.monotonic()
        timings: list[float] = []
        while time.monotonic() - t0 < seconds:  # bounded: `seconds` of scrapes
            time.sleep(every)  # Prometheus' pace
            t = time.perf_counter()
            after = fetch(url + "/metrics").decode()
            timings.append((time.perf_counter() - t) * 1000)
        user, system = cpu_split(child.pid)
        wall = time.monotonic() - t0
        rss = rss_mb(child.pid)
    cpu, system = user + system - user0 - system0, system - system0
    name = "dnsprobe_probes_total"
    probes = sample_sum(after, name) - sample_sum(before, name)
    ok = sample_sum(after, name, result="success") - sample_sum(before, name, result="success")
    return {
        "probes": probes,
        "probes_per_second": probes / wall,
        "success_ratio": ok / probes if probes else 0.0,
        "scrapes": len(timings),
        "cpu_per_probe_us": cpu / probes * 1e6 if probes else float("nan"),
        "system_cpu_per_probe_us": system / probes * 1e6 if probes else float("nan"),
        "scrape_ms": percentile(timings, 0.5),
        "scrape_bytes": len(after),
        "rss_mb": rss,
    }


BLACKBOX_CONFIG = """modules:
  dns_udp:
    prober: dns
    timeout: 2s
    dns:
      transport_protocol: udp
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      recursion_desired: true
      query_name: {qname}
      query_type: A
      valid_rcodes: [NOERROR]
      validate_answer_rrs:
        fail_if_not_matches_regexp: ['.*\\tIN\\tA\\t{ip}$']
"""


async def _drive(url: str, hosts: list[str], rate: float, seconds: float) -> tuple[int, int]:
    """GET /probe for each host in turn at `rate` per second; (requests, successes)."""
    done = ok = 0
    semaphore = asyncio.Semaphore(64)

    async def one(session: aiohttp.ClientSession, host: str) -> None:
        nonlocal done, ok
        try:
            params = {"module": "dns_udp", "target": f"{host}:{DNS_PORT}"}
            async with session.get(url, params=params) as response:
                body = await response.text()
            done += 1
            ok += "\nprobe_success 1\n" in body
        finally:
            semaphore.release()

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        start = loop.time()
        total = int(rate * seconds)
        for i in range(total):  # bounded: rate x seconds requests
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await semaphore.acquire()
            task = asyncio.create_task(one(session, hosts[i % len(hosts)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=10)
    return done, ok


def blackbox_phase(
    workdir: Path, hosts: list[str], rate: float, seconds: float
) -> dict[str, float]:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        sys.exit("bench: prometheus-blackbox-exporter is not installed; run "
                 "scripts/install-test-tools")
    port = free_port()
    config = workdir / "blackbox.yml"
    ip = QUERY.expect[0].replace(".", "\\.")
    config.write_text(BLACKBOX_CONFIG.format(qname=QUERY.qname, ip=ip))
    log = workdir / "blackbox.log"
    args = [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}/probe"
    with process(args, log) as child:
        await_http(f"http://127.0.0.1:{port}/-/healthy", child, log)
        asyncio.run(_drive(url, hosts, rate, WARMUP))
        cpu0, t0 = cpu_seconds(child.pid), time.monotonic()
        done, ok = asyncio.run(_drive(url, hosts, rate, seconds))
        cpu = cpu_seconds(child.pid) - cpu0
        wall = time.monotonic() - t0
    return {
        "blackbox_probes": done,
        "blackbox_probes_per_second": done / wall,
        "blackbox_success_ratio": ok / done if done else 0.0,
        "blackbox_cpu_per_probe_us": cpu / done * 1e6 if done else float("nan"),
    }


def run(
    workdir: Path, hosts: list[str], seconds: float, exporter_first: bool = True
) -> dict[str, float]:
    """One round: the exporter and blackbox_exporter one after the other (in the order
    given: rounds alternate it, so a machine getting busier or quieter favours neither)."""
    figures: dict[str, float] = {}
    for ours in (exporter_first, not exporter_first):
        if ours:
            figures |= exporter_phase(workdir, hosts, seconds)
        else:
            figures |= blackbox_phase(workdir, hosts, rate=len(hosts), seconds=seconds)
    figures["cpu_ratio_vs_blackbox"] = (
        figures["blackbox_cpu_per_probe_us"] / figures["cpu_per_probe_us"]
    )
    return figures


def scale(workdir: Path, hosts: list[str], seconds: float) -> dict[str, float]:
    """How the figures move with the number of targets: 100, 1,000 and 5,000 static
    targets at the defaults (UDP and TCP, every 5 s), scraped every 5 s."""
    figures: dict[str, float] = {}
    for n in (100, 1000, 5000):
        print(f"#   {n} targets ...", file=sys.stderr, flush=True)
        got = serve_and_scrape(workdir, hosts[:n], max(15.0, seconds), interval=5,
                               protocol="both", every=5.0)
        for name in ("probes_per_second", "success_ratio", "cpu_per_probe_us", "scrape_ms",
                     "scrape_bytes", "rss_mb"):
            figures[f"scale_{n}_{name}"] = got[name]
    return figures
