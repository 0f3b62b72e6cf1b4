"""The benchmark, one command (`bench/run`): every figure of docs/performance.md.

Phases, each bounded in time, against one real CoreDNS answering on up to 5,000 loopback
addresses:

  cpu       the exporter and Debian's blackbox_exporter, same targets, same rate (bench/cpu.py)
  latency   reported vs wire round trips, scrape time, event-loop lag (bench/latency.py)
  schedule  5,000 targets: drift and bursts (bench/schedule.py)
  memory    resident memory with 1,000 pods from the real test cluster (bench/memory.py)
  scale     CPU, scrape and memory at 100, 1,000 and 5,000 targets (bench/cpu.py)

The timing phases (cpu, latency, schedule) run `--rounds` times, interleaved: round 1 of
each, then round 2 of each, and so on; within a cpu round the exporter and
blackbox_exporter take turns going first. Each figure printed is the median over the
rounds, with the lowest and highest beside it, so that one noisy second decides nothing.
Memory and scale run once.

Prints `name: value` lines and writes them, with every round's values and the machine,
to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from . import cpu, latency, memory, schedule
from .common import RESULTS, addresses, dns_servers

TIMING = ("cpu", "latency", "schedule")
PHASES = (*TIMING, "memory", "scale")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("phases", nargs="*", metavar="PHASE", default=[],
                        help="phases to run: cpu, latency, schedule, memory, scale "
                             "(default: all)")
    parser.add_argument("--seconds", type=float, default=15,
                        help="measured seconds per phase and round (5..120, default 15)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of each timing phase (1..10, default 3; the targets "
                             "of docs/performance.md are judged on 3 or more)")
    args = parser.parse_args()
    if not 5 <= args.seconds <= 120:
        parser.error("--seconds must be between 5 and 120")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be between 1 and 10")
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if os.geteuid() != 0:
        sys.exit("bench: the latency phase captures loopback packets: run it as root")
    phases = [p for p in PHASES if p in args.phases] if args.phases else list(PHASES)
    rounds: dict[str, list[float]] = defaultdict(list)
    once: dict[str, float] = {}
    started = time.monotonic()
    hosts = addresses(5000)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, dns_servers(Path(tmp), hosts):
        workdir = Path(tmp)
        for r in range(args.rounds):
            for phase in (p for p in phases if p in TIMING):
                print(f"# {phase}, round {r + 1} of {args.rounds} ...", file=sys.stderr,
                      flush=True)
                for name, value in _timing(phase, workdir, hosts, args.seconds, r).items():
                    rounds[name].append(value)
        for phase in (p for p in phases if p not in TIMING):
            print(f"# {phase} ...", file=sys.stderr, flush=True)
            if phase == "memory":
                once |= memory.run(workdir, hosts[:1000], max(30.0, args.seconds))
            else:
                once |= cpu.scale(workdir, hosts, args.seconds)
    figures = {name: statistics.median(values) for name, values in rounds.items()} | once
    figures["bench_seconds"] = time.monotonic() - started
    for name, value in figures.items():
        values = rounds.get(name, [])
        spread = (f"  (min {_text(min(values))}, max {_text(max(values))}, "
                  f"{len(values)} rounds)" if len(values) > 1 else "")
        print(f"{name}: {_text(value)}{spread}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(
        {"machine": {**platform.uname()._asdict(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "load": os.getloadavg()},
         "arguments": {"phases": phases, "seconds": args.seconds, "rounds": args.rounds},
         "figures": figures, "rounds": rounds}, indent=2))
    print(f"raw results: {out}")


def _timing(
    phase: str, workdir: Path, hosts: list[str], seconds: float, r: int
) -> dict[str, float]:
    if phase == "cpu":
        return cpu.run(workdir, hosts[:1000], seconds, exporter_first=r % 2 == 0)
    if phase == "latency":
        return latency.run(workdir, hosts[:1000], seconds)
    return schedule.run(workdir, hosts)


def _text(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
