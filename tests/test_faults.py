"""The fault matrix (docs/reliability.md): every fault a real cluster shows, with real
processes, and for each what the metrics show and what remediation does. What the alerts
do with those series is proven by the rules' promtool unit tests (alerts/tests/) and the
end-to-end loop (tests/test_e2e.py); here the alert's condition is read off the same
counters where a row is about it (random loss).

CoreDNS faults: one lab, one CoreDNS pod per fault beside healthy ones, one exporter
(remediation dry-run, so that every pod stays to be looked at), one webhook payload with an
alert for every pod. Kubernetes API faults go through tests/harness/apiproxy.py, a proxy in
front of the real API server that can be made slow, throttling (429) or down.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from alerts.generate import Config
from tests.conftest import LabExporter
from tests.harness.coredns import Behaviour
from tests.harness.lab import Lab, Pod
from tests.harness.scrape import samples, scrape_until
from tests.test_remediation import RBAC, TOKEN, alert, payload, post, results

TIMEOUT, INTERVAL = 0.3, 0.4
FAST = ["--interval", str(INTERVAL), "--timeout", str(TIMEOUT)]


def outcomes(body: str, pod: str, protocol: str) -> dict[str, float]:
    """dnsprobe_probes_total of one pod and protocol, by result."""
    return {s.labels["result"]: s.value for s in samples(body)
            if s.name == "dnsprobe_probes_total" and s.labels["pod"] == pod
            and s.labels["protocol"] == protocol}


def last_success(body: str, pod: str, protocol: str) -> float | None:
    for s in samples(body):
        if (s.name == "dnsprobe_success" and s.labels["pod"] == pod
                and s.labels["protocol"] == protocol):
            return s.value
    return None


def mostly(body: str, pod: str, protocol: str, result: str, at_least: int = 3) -> bool:
    """At least `at_least` probes with `result`, and every probe so far had it; `a|b`: at
    least that many with a, and every probe a or b."""
    counts = outcomes(body, pod, protocol)
    wanted, *also = result.split("|")
    return counts.get(wanted, 0) >= at_least and sum(counts.values()) == sum(
        counts.get(r, 0) for r in (wanted, *also))


def drop(pod: Pod, protocol: str, probability: float) -> None:
    pod.netns.exec(["iptables", "-A", "INPUT", "-p", protocol, "--dport", "53", "-m",
                    "statistic", "--mode", "random", "--probability", str(probability),
                    "-j", "DROP"])


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-token"
    path.write_text(TOKEN)
    return path


# (fault, UDP result, TCP result, what the webhook decides for an alert on that pod).
# ICMP port-unreachable is rate-limited by the sending kernel (net.ipv4.icmp_ratelimit):
# some probes of a closed port get no ICMP back and time out, as in any real network.
ROWS: list[tuple[str, str, str, str]] = [
    ("udp dropped", "timeout", "success", "dry_run/success"),
    ("tcp dropped", "success", "timeout", "skip/healthy"),
    ("udp and tcp dropped", "timeout", "timeout", "dry_run/success"),
    ("icmp unreachable", "unreachable|timeout", "unreachable", "dry_run/success"),
    ("slower than the timeout", "timeout", "timeout", "dry_run/success"),
    # The delaying server (CoreDNS' erratic) answers with an address of its own: an answer
    # in time, judged on its content (test_probe.py's just-under test passes it).
    ("just under the timeout", "wrong_answer", "wrong_answer", "dry_run/success"),
    ("servfail", "rcode", "rcode", "dry_run/success"),
    ("refused", "rcode", "rcode", "dry_run/success"),
    ("nxdomain for the cluster name", "rcode", "rcode", "dry_run/success"),
    ("wrong answer", "wrong_answer", "wrong_answer", "dry_run/success"),
    # Over TCP the same server's whole answer is its own address: judged on content.
    ("truncated udp", "truncated", "wrong_answer", "dry_run/success"),
]


def make_faulty(lab: Lab, fault: str) -> Pod:
    behaviour = {"servfail": Behaviour.SERVFAIL, "refused": Behaviour.REFUSED,
                 "nxdomain for the cluster name": Behaviour.NXDOMAIN,
                 "wrong answer": Behaviour.WRONG_ANSWER, "truncated udp": Behaviour.TRUNCATE,
                 "slower than the timeout": Behaviour.SLOW,
                 "just under the timeout": Behaviour.SLOW}.get(fault, Behaviour.HEALTHY)
    delay = {"slower than the timeout": "500ms", "just under the timeout": "150ms"}
    pod = lab.add_pod(behaviour, delay=delay.get(fault, "1500ms"))
    if fault in ("udp dropped", "udp and tcp dropped"):
        pod.netns.drop("udp", 53)
    if fault in ("tcp dropped", "udp and tcp dropped"):
        pod.netns.drop("tcp", 53)
    if fault == "icmp unreachable":  # what a host without the port answers
        pod.netns.exec(["iptables", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j",
                        "REJECT", "--reject-with", "icmp-port-unreachable"])
        pod.netns.exec(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "53", "-j",
                        "REJECT", "--reject-with", "tcp-reset"])
    return pod


async def test_coredns_fault_matrix_metrics_and_remediation(
    lab: Lab, lab_exporter: LabExporter, token_file: Path
) -> None:
    healthy = [lab.add_pod(), lab.add_pod()]
    faulty = {fault: make_faulty(lab, fault) for fault, *_ in ROWS}
    lab.create_service()
    exporter = lab_exporter(lab.apply_deploy_rbac(RBAC), *FAST, "--remediation", "dry-run",
                            "--cooldown", "0", "--webhook-token-file", str(token_file))

    def shown(body: str) -> bool:
        return all(mostly(body, faulty[f].name, "udp", udp)
                   and mostly(body, faulty[f].name, "tcp", tcp) for f, udp, tcp, _ in ROWS)

    body = await scrape_until(exporter.url, shown, deadline=60)
    for fault, udp, tcp, _ in ROWS:
        name = faulty[fault].name
        assert mostly(body, name, "udp", udp), f"{fault}: {outcomes(body, name, 'udp')}"
        assert mostly(body, name, "tcp", tcp), f"{fault}: {outcomes(body, name, 'tcp')}"
        assert last_success(body, name, "udp") == (1.0 if udp == "success" else 0.0), fault
    for pod in healthy:
        assert mostly(body, pod.name, "udp", "success")

    # Alertmanager posts an alert for every pod: the faulty ones whose UDP fails now are
    # restarted (dry run here), the rest are confirmed healthy and left alone.
    alerts = [alert(faulty[fault], lab.namespace) for fault, *_ in ROWS]
    alerts += [alert(pod, lab.namespace) for pod in healthy]
    status, answer = await post(exporter, payload(*alerts))
    assert status == 200, answer
    decided = {pod: f"{action}/{result}" for pod, action, result in results(answer)}
    for fault, _, _, expected in ROWS:
        assert decided[faulty[fault].name] == expected, (fault, answer)
    assert all(decided[pod.name] == "skip/healthy" for pod in healthy)


@pytest.mark.parametrize("loss", [0.01, 0.05, 0.30])
async def test_random_udp_loss_shows_in_the_counters_and_alerts_nothing(
    lab: Lab, lab_exporter: LabExporter, loss: float
) -> None:
    """Random loss on every pod: the failure ratio follows the loss, and stays under the
    ratio at which the rules call a pod failing (Config.failing), so no alert and no
    restart; the exporter keeps every pod's series."""
    pods = [lab.add_pod() for _ in range(3)]
    lab.create_service()
    for pod in pods:
        drop(pod, "udp", loss)
    exporter = lab_exporter(lab.apply_deploy_rbac(RBAC), "--interval", "0.1", "--timeout",
                            "0.08", "--remediation", "evict")
    wanted = 300  # UDP probes per pod: enough that 30% loss cannot look like 50%

    def enough(body: str) -> bool:
        return all(sum(outcomes(body, p.name, "udp").values()) >= wanted for p in pods)

    body = await scrape_until(exporter.url, enough, deadline=90)
    threshold = Config().failing
    for pod in pods:
        counts = outcomes(body, pod.name, "udp")
        total = sum(counts.values())
        failed = total - counts.get("success", 0)
        assert total >= wanted, counts
        assert all(n == 0 for r, n in counts.items() if r not in ("success", "timeout")), counts
        ratio = failed / total
        assert ratio < threshold, (loss, counts)
        if loss >= 0.05:
            assert ratio > 0, (loss, counts)  # the loss is seen, not hidden
        tcp = outcomes(body, pod.name, "tcp")  # only UDP is dropped
        assert tcp.get("success", 0) / sum(tcp.values()) > 1 - threshold, tcp
    assert exporter.process.poll() is None


async def test_a_pod_in_lameduck_keeps_answering_then_its_series_go(
    lab: Lab, lab_exporter: LabExporter
) -> None:
    """A CoreDNS pod being deleted: SIGTERM, lameduck (still answering), exit, then the
    Pod object goes. The exporter sees it answer through lameduck, then unreachable (the
    port is closed, the namespace still there), then drops its series with the pod."""
    stays = lab.add_pod()
    leaving = lab.add_pod(lameduck="2s")
    lab.create_service()
    exporter = lab_exporter(lab.apply_deploy_rbac(RBAC), *FAST)
    body = await scrape_until(exporter.url, lambda b: mostly(b, leaving.name, "udp",
                                                             "success"))
    before = outcomes(body, leaving.name, "udp").get("success", 0)
    leaving.server.process.send_signal(signal.SIGTERM)
    terminated = time.monotonic()
    await asyncio.to_thread(leaving.server.process.wait, 20)
    lameduck = time.monotonic() - terminated
    body = await scrape_until(exporter.url, lambda b: True)
    during = outcomes(body, leaving.name, "udp").get("success", 0) - before
    assert lameduck >= 1.5, lameduck  # it did wait
    assert during >= 2, during  # and answered meanwhile, as probed
    body = await scrape_until(exporter.url, lambda b: mostly(
        b, leaving.name, "udp", "unreachable", at_least=2) or outcomes(
        b, leaving.name, "udp").get("unreachable", 0) >= 2)
    assert outcomes(body, leaving.name, "udp").get("unreachable", 0) >= 2
    assert last_success(body, leaving.name, "udp") == 0.0
    lab.delete_pod(leaving)
    body = await scrape_until(exporter.url,
                              lambda b: last_success(b, leaving.name, "udp") is None)
    assert last_success(body, leaving.name, "udp") is None
    assert last_success(body, stays.name, "udp") == 1.0

