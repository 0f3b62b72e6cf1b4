"""The soak (`bench/soak`): hours of a bad network in minutes, and no false restart.

Real processes throughout: the lab's test cluster (Kubernetes v1.37.2 without nodes,
tests/harness/cluster.py), three CoreDNS pods in network namespaces each dropping 5% of
the UDP queries it receives at random, the exporter (`serve`, remediation `evict`,
probing every 0.5 s) with deploy/base/rbac.yaml's ServiceAccount, and Prometheus with
Alertmanager running the shipped rules with windows for minutes (as tests/test_e2e.py
does), posting to the webhook. For `--minutes` it samples the exporter every 10 s:
resident memory, open file descriptors, event-loop tasks, probes and remediations,
evicted pods. Then one pod is made UDP-dead: exactly one eviction must follow, and no
other.

Prints `name: value` figures (docs/reliability.md records them) and writes them as JSON to
bench/results/. Exits 1 if a promise is broken: an eviction during the soak, memory
growing faster than MAX_SLOPE_KB_PER_MIN, descriptors or tasks growing, or anything but
exactly one eviction of the UDP-dead pod.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from alerts.generate import Config, rules
from tests.harness.cluster import binaries_missing
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab
from tests.harness.monitoring import Monitoring
from tests.harness.scrape import samples

from .common import evicted, lab_cluster, report

ROOT = Path(__file__).resolve().parents[1]
RBAC = ROOT / "deploy" / "base" / "rbac.yaml"
LISTEN = "127.0.0.1:9953"  # inside the node namespace
LOSS = 0.05
PODS = 3
SAMPLE_SECONDS = 10.0
# Beyond this, resident memory is growing, not settling (about 90 MB a day).
MAX_SLOPE_KB_PER_MIN = 64.0
# The shipped rules with windows for a run of minutes, as tests/test_e2e.py uses them.
SOAK_RULES = Config(window="10s", for_pod="5s", for_service="5s", latency_window="10s",
                    for_latency="30s", for_wrong_answer="10s", for_exporter="10s",
                    for_no_targets="20s", for_discovery="30s", interval="1s")
TOKEN = "soak-webhook-token"


def _metrics(url: str) -> dict[str, float]:
    """The figures sampled from one scrape of the exporter."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    figures = {"rss_bytes": 0.0, "open_fds": 0.0, "tasks": 0.0, "probes": 0.0,
               "udp_pod_failures": 0.0, "udp_pod_probes": 0.0, "remediation_acts": 0.0}
    for s in samples(body):
        if s.name == "process_resident_memory_bytes":
            figures["rss_bytes"] = s.value
        elif s.name == "process_open_fds":
            figures["open_fds"] = s.value
        elif s.name == "dnsprobe_event_loop_tasks":
            figures["tasks"] = s.value
        elif s.name == "dnsprobe_probes_total":
            figures["probes"] += s.value
            if s.labels["kind"] == "pod" and s.labels["protocol"] == "udp":
                figures["udp_pod_probes"] += s.value
                if s.labels["result"] != "success":
                    figures["udp_pod_failures"] += s.value
        elif s.name == "dnsprobe_remediations_total" and s.labels["action"] != "skip":
            figures["remediation_acts"] += s.value
    return figures


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value)."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


def _evicted(lab: Lab) -> list[str]:
    return [pod.name for pod in lab.pods.values() if evicted(lab, pod.name)]


def soak(work: Path, minutes: float) -> dict[str, Any]:
    with lab_cluster(work) as lab:
        stopping: list[Any] = []
        try:
            pods = [lab.add_pod() for _ in range(PODS)]
            lab.create_service()
            for pod in pods:
                pod.netns.exec(["iptables", "-A", "INPUT", "-p", "udp", "--dport", "53", "-m",
                                "statistic", "--mode", "random", "--probability", str(LOSS),
                                "-j", "DROP"])
            token_file = work / "webhook-token"
            token_file.write_text(TOKEN)
            kubeconfig = lab.kubeconfig(lab.apply_deploy_rbac(RBAC), "soak")
            exporter = Exporter(
                ["--kubeconfig", str(kubeconfig), "--namespace", lab.namespace, "--mode",
                 "in-cluster", "--interval", "0.5", "--timeout", "0.3", "--remediation", "evict",
                 "--webhook-token-file", str(token_file), "--listen", LISTEN],
                netns=lab.node)
            stopping.append(exporter)
            monitoring = Monitoring(lab, work / "monitoring", LISTEN, token_file,
                                    rules(SOAK_RULES))
            stopping.append(monitoring)

            start = time.monotonic()
            end = start + minutes * 60
            points: list[tuple[float, dict[str, float]]] = []
            evicted_during: list[str] = []
            next_report = start + 60
            while time.monotonic() < end:
                now = time.monotonic()
                points.append((now - start, _metrics(exporter.url)))
                evicted_during = _evicted(lab)
                if now >= next_report:
                    last = points[-1][1]
                    print(f"# soak {int((now - start) / 60)} min: rss "
                          f"{last['rss_bytes'] / 2**20:.1f} MB, fds {last['open_fds']:.0f}, "
                          f"tasks {last['tasks']:.0f}, probes {last['probes']:.0f}, "
                          f"evicted {len(evicted_during)}", file=sys.stderr, flush=True)
                    next_report += 60
                time.sleep(max(0.0, min(SAMPLE_SECONDS, end - time.monotonic())))
            fired = monitoring.query(f'max_over_time(ALERTS{{alertstate="firing"}}'
                                     f'[{int(minutes * 60)}s])')

            # Warm-up (imports, first lists, caches) is not a leak: the slope is taken over
            # the samples after the first minute.
            steady = [(t, m) for t, m in points if t >= 60] or points
            first, last = points[0][1], points[-1][1]
            figures: dict[str, Any] = {
                "soak_minutes": round(minutes, 1),
                "soak_probes": last["probes"] - first["probes"],
                "soak_udp_pod_loss_observed": round(
                    (last["udp_pod_failures"] - first["udp_pod_failures"])
                    / max(1.0, last["udp_pod_probes"] - first["udp_pod_probes"]), 4),
                "soak_alerts_fired": len(fired),
                "soak_evictions": len(evicted_during),
                "soak_remediation_acts": last["remediation_acts"],
                "soak_rss_mb_start": round(first["rss_bytes"] / 2**20, 1),
                "soak_rss_mb_end": round(last["rss_bytes"] / 2**20, 1),
                "soak_rss_slope_kb_per_min": round(
                    _slope([(t, m["rss_bytes"]) for t, m in steady]) * 60 / 1024, 2),
                "soak_fds_min": min(m["open_fds"] for _, m in steady),
                "soak_fds_max": max(m["open_fds"] for _, m in steady),
                "soak_tasks_min": min(m["tasks"] for _, m in steady),
                "soak_tasks_max": max(m["tasks"] for _, m in steady),
            }

            # Then one pod goes UDP-dead: exactly one eviction, of that pod, and no other.
            sick = pods[0]
            sick.netns.drop("udp", 53)
            dead_at = time.monotonic()
            deadline = dead_at + 180
            while time.monotonic() < deadline and not _evicted(lab):
                time.sleep(1)
            figures["soak_udp_dead_eviction_seconds"] = round(time.monotonic() - dead_at, 1)
            quiet_until = time.monotonic() + 60  # and nothing more for a minute
            while time.monotonic() < quiet_until:
                time.sleep(5)
            evicted = _evicted(lab)
            figures["soak_udp_dead_evictions"] = len(evicted)
            figures["soak_udp_dead_evicted_the_sick_pod"] = int(evicted == [sick.name])
            return figures
        finally:
            for thing in reversed(stopping):
                thing.stop()


def broken(figures: dict[str, Any]) -> list[str]:
    problems = []
    if figures["soak_evictions"] or figures["soak_remediation_acts"]:
        problems.append("a pod was restarted during the soak")
    if figures["soak_rss_slope_kb_per_min"] > MAX_SLOPE_KB_PER_MIN:
        problems.append("resident memory keeps growing")
    if figures["soak_fds_max"] > figures["soak_fds_min"] + 8:
        problems.append("file descriptors grow")
    if figures["soak_tasks_max"] > figures["soak_tasks_min"] + 16:
        problems.append("event-loop tasks grow")
    if figures["soak_udp_dead_evictions"] != 1 or not figures[
            "soak_udp_dead_evicted_the_sick_pod"]:
        problems.append("the UDP-dead pod was not evicted exactly once, alone")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="soak length before the UDP-dead phase (1..240, default 10)")
    args = parser.parse_args()
    if not 1 <= args.minutes <= 240:
        parser.error("--minutes must be between 1 and 240")
    if os.geteuid() != 0:
        sys.exit("bench/soak: the CoreDNS pods live in network namespaces: run it as root")
    reason = binaries_missing()
    if reason:
        sys.exit(f"bench/soak: {reason}")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        figures = soak(Path(tmp), args.minutes)
    report("soak", figures, broken(figures))


if __name__ == "__main__":
    main()
