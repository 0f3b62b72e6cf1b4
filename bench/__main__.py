"""The benchmark, one command (`bench/run`): every figure of docs/performance.md.

Phases, each bounded in time, against one real CoreDNS answering on up to 5,000 loopback
addresses:

  cpu       the exporter and Debian's blackbox_exporter, same targets, same rate (bench/cpu.py)
  latency   reported vs wire round trips, scrape time, event-loop lag (bench/latency.py)
  memory    resident memory with 1,000 pods from the real test cluster (bench/memory.py)
  schedule  5,000 targets: drift and bursts (bench/schedule.py)

Prints `name: value` lines and writes them, with the machine, to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from . import cpu, latency, memory, schedule
from .common import RESULTS, addresses, dns_servers

PHASES = ("cpu", "latency", "memory", "schedule")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("phases", nargs="*", metavar="PHASE", default=[],
                        help="phases to run: cpu, latency, memory, schedule (default: all)")
    parser.add_argument("--seconds", type=float, default=20,
                        help="measured seconds per phase (5..120, default 20)")
    args = parser.parse_args()
    if not 5 <= args.seconds <= 120:
        parser.error("--seconds must be between 5 and 120")
    if os.geteuid() != 0:
        sys.exit("bench: the latency phase captures loopback packets: run it as root")
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    phases = args.phases or list(PHASES)
    figures: dict[str, float] = {}
    started = time.monotonic()
    hosts = addresses(5000)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, dns_servers(Path(tmp), hosts):
        workdir = Path(tmp)
        for phase in phases:
            print(f"# {phase} ...", file=sys.stderr, flush=True)
            if phase == "cpu":
                figures |= cpu.run(workdir, hosts[:1000], args.seconds)
            elif phase == "latency":
                figures |= latency.run(workdir, hosts[:1000], args.seconds)
            elif phase == "memory":
                figures |= memory.run(workdir, hosts[:1000], max(30.0, args.seconds))
            elif phase == "schedule":
                figures |= schedule.run(workdir, hosts)
    figures["bench_seconds"] = time.monotonic() - started
    for name, value in figures.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(
        {"machine": {**platform.uname()._asdict(), "cpus": os.cpu_count(),
                     "python": platform.python_version()},
         "figures": figures}, indent=2))
    print(f"raw results: {out}")


if __name__ == "__main__":
    main()
