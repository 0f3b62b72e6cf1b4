"""What the benchmark phases share: loopback targets, processes and their CPU and memory,
percentiles, scraping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from exporter.__main__ import event_loop
from exporter.model import Query
from tests.harness import coredns
from tests.harness.cluster import Cluster, free_port
from tests.harness.components import coredns_binary, stop_process
from tests.harness.lab import Lab

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
# What every phase asks, and what the answer must hold (answer validated, for both tools).
QUERY = Query("kubernetes", coredns.KUBERNETES_NAME + ".", "A", (coredns.KUBERNETES_IP,))
DNS_PORT = coredns.DNS_PORT
_TICK = os.sysconf("SC_CLK_TCK")

__all__ = ["DNS_PORT", "QUERY", "RESULTS", "ROOT", "free_port"]


T = TypeVar("T")


def serve_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on the event loop `serve` runs on (uvloop where installed): the phases
    that run the exporter in the bench's own process measure what ships."""
    with asyncio.Runner(loop_factory=event_loop()[1]) as runner:
        return runner.run(main)


def addresses(n: int, prefix: str = "127.54") -> list[str]:
    """n distinct loopback addresses: every target has its own."""
    if not 1 <= n <= 250 * 250:
        raise ValueError(f"between 1 and 62500 addresses, not {n}")
    return [f"{prefix}.{i // 250}.{i % 250 + 2}" for i in range(n)]


@contextlib.contextmanager
def dns_servers(workdir: Path, hosts: Sequence[str]) -> Iterator[coredns.CoreDNS]:
    """One real CoreDNS answering on every one of `hosts`, port DNS_PORT."""
    binary = coredns_binary()
    if binary is None:
        sys.exit("bench: CoreDNS is not installed; run scripts/install-test-tools")
    server = coredns.start(binary, workdir, host=hosts[0], extra_hosts=hosts[1:])
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def process(args: Sequence[str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, its output in `log`, stopped by its PID at the end."""
    with log.open("wb") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        try:
            yield child
        finally:
            stop_process(child)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (exited ones included)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or at its peak (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def fetch(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def await_http(url: str, child: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    """Return once `url` answers 200; exit with the child's log if it dies or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            sys.exit(f"bench: {child.args!r} exited:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            fetch(url, timeout=1)
            return
        time.sleep(0.1)  # polling a process that is starting: there is no event to wait on
    sys.exit(f"bench: {url} did not answer within {timeout:g}s:\n{log.read_text()[-3000:]}")


def sample_sum(body: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (text format)."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in body.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextlib.contextmanager
def lab_cluster(work: Path) -> Iterator[Lab]:
    """The lab's test cluster (Kubernetes without nodes) and a Lab on it, for a bench of
    real CoreDNS pods in network namespaces; both stopped after, by their PIDs."""
    binary = coredns_binary()
    assert binary is not None, "CoreDNS missing: run scripts/install-test-tools"
    cluster = Cluster.for_lab(work / "cluster")
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    lab = Lab(cluster, binary, work)
    try:
        yield lab
    finally:
        lab.close()
        cluster.stop()


def evicted(lab: Lab, name: str) -> bool:
    """Whether the lab's pod `name` was evicted (it has a deletionTimestamp)."""
    obj = lab.core.read_namespaced_pod(name, lab.namespace, _preload_content=False)
    return bool(json.loads(obj.data)["metadata"].get("deletionTimestamp"))


def report(bench: str, figures: dict[str, Any], problems: list[str]) -> NoReturn:
    """Print a bench's `name: value` figures, keep them as JSON in bench/results/, say
    each broken promise, and exit 1 if there is one."""
    for name, value in figures.items():
        print(f"{name}: {value}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime(f"{bench}-%Y%m%dT%H%M%S.json")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)
