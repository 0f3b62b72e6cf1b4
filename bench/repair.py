"""Time to repair and false evictions (`bench/repair`): self-remediation against the
Alertmanager path with the shipped rules, in one run, on the same pods.

Real processes throughout: the lab's test cluster (Kubernetes v1.37.2 without nodes,
tests/harness/cluster.py), three CoreDNS pods in network namespaces, and two exporters
at the defaults (`--interval 5`, `--timeout 1`, remediation `evict`, a 10 s cooldown so
that the two repairs do not wait for each other):

- `self`: `--self-remediate`, no webhook;
- `webhook`: no self-remediation; Prometheus and Alertmanager (tests/harness/monitoring.py)
  with the shipped rules as they are (2 m rate, `for: 3m`) post to its webhook.

1. false evictions: every pod loses LOSS (30 %) of the UDP queries it receives, at random
   (iptables statistic), for `--minutes` (default 10); evictions are counted by trigger
   (`dnsprobe_remediations_total{action="evict", result="success"}` of each exporter).
2. time to repair, self: the loss ends, one pod goes UDP-dead; seconds to its eviction.
3. time to repair, webhook: the self exporter stops; another pod goes UDP-dead; seconds
   to its eviction through Prometheus, Alertmanager and the webhook.

Prints `name: value` figures and the ratio of the two repairs, writes them as JSON to
bench/results/, and exits 1 if self-remediation broke a promise (a false eviction, or a
repair slower than 30 s).
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

from alerts.generate import rules
from tests.harness.cluster import binaries_missing
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab, Pod
from tests.harness.monitoring import Monitoring
from tests.harness.monitoring import binaries_missing as monitoring_missing
from tests.harness.scrape import samples

from .common import evicted, lab_cluster, report

ROOT = Path(__file__).resolve().parents[1]
RBAC = ROOT / "deploy" / "base" / "rbac.yaml"
LISTEN = {"self": "127.0.0.1:9953", "webhook": "127.0.0.1:9954"}  # in the node namespace
LOSS = 0.3
PODS = 3
TOKEN = "repair-webhook-token"
SELF_REPAIR_LIMIT = 30.0  # seconds: the promise of --self-remediate at the defaults
REPAIR_DEADLINE = {"self": 120.0, "webhook": 900.0}  # then the figure is "none"


def _evictions(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    return sum(s.value for s in samples(body) if s.name == "dnsprobe_remediations_total"
               and s.labels["action"] in ("evict", "delete") and s.labels["result"] == "success")


def _repair(lab: Lab, pod: Pod, deadline: float) -> float | None:
    """Seconds from `pod` going UDP-dead to its eviction; None past `deadline`."""
    pod.netns.drop("udp", 53)
    dead_at = time.monotonic()
    while time.monotonic() < dead_at + deadline:
        if evicted(lab, pod.name):
            return round(time.monotonic() - dead_at, 1)
        time.sleep(0.5)
    return None


def repair(work: Path, minutes: float) -> dict[str, Any]:
    with lab_cluster(work) as lab:
        stopping: list[Any] = []
        try:
            pods = [lab.add_pod() for _ in range(PODS)]
            lab.create_service()
            loss = ["INPUT", "-p", "udp", "--dport", "53", "-m", "statistic", "--mode", "random",
                    "--probability", str(LOSS), "-j", "DROP"]
            for pod in pods:
                pod.netns.exec(["iptables", "-A", *loss])
            token_file = work / "webhook-token"
            token_file.write_text(TOKEN)
            kubeconfig = lab.kubeconfig(lab.apply_deploy_rbac(RBAC), "repair")
            common = ["--kubeconfig", str(kubeconfig), "--namespace", lab.namespace, "--mode",
                      "in-cluster", "--remediation", "evict", "--cooldown", "10s"]
            exporters = {
                "self": Exporter([*common, "--self-remediate", "--listen", LISTEN["self"]],
                                 netns=lab.node),
                "webhook": Exporter([*common, "--webhook-token-file", str(token_file),
                                     "--listen", LISTEN["webhook"]], netns=lab.node),
            }
            stopping += exporters.values()
            monitoring = Monitoring(lab, work / "monitoring", LISTEN["webhook"], token_file,
                                    rules())
            stopping.append(monitoring)

            print(f"# repair: {PODS} pods losing {LOSS:.0%} of UDP for {minutes:g} min",
                  file=sys.stderr, flush=True)
            end = time.monotonic() + minutes * 60
            next_report = time.monotonic() + 60
            while time.monotonic() < end:
                if time.monotonic() >= next_report:
                    done = {k: _evictions(e.url) for k, e in exporters.items()}
                    print(f"# repair: {minutes - (end - time.monotonic()) / 60:.0f} min, "
                          f"evictions {done}", file=sys.stderr, flush=True)
                    next_report += 60
                time.sleep(max(0.0, min(10.0, end - time.monotonic())))
            figures: dict[str, Any] = {"loss": LOSS, "loss_minutes": minutes, "pods": PODS}
            for trigger, exporter in exporters.items():
                figures[f"false_evictions_{trigger}"] = _evictions(exporter.url)
            # Suspicions the escalation cleared (docs/performance.md bounds them by 32).
            figures["suspicions_cleared_self"] = len(exporters["self"].logged(
                "self-remediation: a suspect pod answered when probed again", timeout=0))
            for pod in pods:
                pod.netns.exec(["iptables", "-D", *loss])

            print("# repair: one pod UDP-dead, self-remediation", file=sys.stderr, flush=True)
            figures["time_to_repair_self_s"] = _repair(lab, pods[0], REPAIR_DEADLINE["self"])
            exporters["self"].stop()
            print("# repair: another pod UDP-dead, the Alertmanager path (minutes)",
                  file=sys.stderr, flush=True)
            figures["time_to_repair_webhook_s"] = _repair(lab, pods[1], REPAIR_DEADLINE["webhook"])
            mine, theirs = figures["time_to_repair_self_s"], figures["time_to_repair_webhook_s"]
            figures["repair_ratio_webhook_vs_self"] = (
                round(theirs / mine, 1) if mine and theirs else None)
            return figures
        finally:
            for thing in reversed(stopping):
                thing.stop()


def broken(figures: dict[str, Any]) -> list[str]:
    problems = []
    if figures["false_evictions_self"]:
        problems.append(f"self-remediation evicted {figures['false_evictions_self']:g} pod(s) "
                        f"of {LOSS:.0%} random loss")
    took = figures["time_to_repair_self_s"]
    if took is None or took > SELF_REPAIR_LIMIT:
        problems.append(f"self-remediation took {took}s to evict a UDP-dead pod "
                        f"(promise: {SELF_REPAIR_LIMIT:g}s)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/repair", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="minutes of random loss before the repairs (1..120, default 10)")
    args = parser.parse_args()
    if not 1 <= args.minutes <= 120:
        parser.error("--minutes must be between 1 and 120")
    if os.geteuid() != 0:
        sys.exit("bench/repair: the CoreDNS pods live in network namespaces: run it as root")
    reason = binaries_missing() or monitoring_missing()
    if reason:
        sys.exit(f"bench/repair: {reason}")
    with tempfile.TemporaryDirectory(prefix="repair-") as tmp:
        figures = repair(Path(tmp), args.minutes)
    report("repair", figures, broken(figures))


if __name__ == "__main__":
    main()
