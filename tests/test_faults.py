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
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from alerts.generate import Config
from exporter.remediation.remediator import MAX_PODS_PER_PAYLOAD
from tests.conftest import LabExporter
from tests.harness.apiproxy import ApiProxy
from tests.harness.cluster import Cluster
from tests.harness.coredns import Behaviour, CoreDNS
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab, Pod
from tests.harness.scrape import samples, scrape_until, wait_until
from tests.test_remediation import (
    RBAC,
    TOKEN,
    alert,
    evicted,
    payload,
    post,
    results,
    sick_and_healthy,
)

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
    least that many with a, and every probe a or b. Where success is expected, a busy
    2-core machine may read an answer after the 0.3 s timeout now and then: one timeout
    in ten probes is tolerated, nothing else (a fault fails every probe, far above it)."""
    counts = outcomes(body, pod, protocol)
    wanted, *also = result.split("|")
    allowed = {wanted, *also}
    total = sum(counts.values())
    late = counts.get("timeout", 0) if wanted == "success" and "timeout" not in allowed else 0
    other = total - late - sum(counts.get(r, 0) for r in allowed)
    return counts.get(wanted, 0) >= at_least and other == 0 and late <= total / 10


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
    # erratic truncates every other UDP answer; the others, and every whole answer over
    # TCP, carry its own address: judged on content.
    ("truncated udp", "truncated|wrong_answer", "wrong_answer", "dry_run/success"),
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



# -- the Kubernetes API: slow, throttling, down (a partitioned replica) ------------------


@pytest.fixture
def api_proxy(kube_cluster: Cluster) -> Iterator[ApiProxy]:
    proxy = ApiProxy(kube_cluster)
    yield proxy
    proxy.stop()


def acting(token_file: Path) -> list[str]:
    """Flags of an exporter that evicts on the webhook's say."""
    return ["--remediation", "evict", "--webhook-token-file", str(token_file)]


def through(lab: Lab, proxy: ApiProxy, token: str, name: str) -> list[str]:
    """Flags that point an exporter in the node namespace at the API through `proxy`."""
    port = 6450 + len(list(lab.workdir.glob("proxied-*.kubeconfig")))
    lab.relay_in(f"127.0.0.1:{port}", proxy.address)
    path = lab.cluster.write_kubeconfig(lab.workdir / f"proxied-{name}.kubeconfig", token,
                                        server=f"https://127.0.0.1:{port}")
    return ["--kubeconfig", str(path)]


def counter(body: str, name: str, **labels: str) -> float:
    return sum(s.value for s in samples(body) if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_a_slow_api_server_slows_neither_probing_nor_scrapes(
    lab: Lab, lab_exporter: LabExporter, api_proxy: ApiProxy, token_file: Path
) -> None:
    first = lab.add_pod()
    lab.create_service()
    token = lab.apply_deploy_rbac(RBAC)
    exporter = lab_exporter(token, *FAST, *through(lab, api_proxy, token, "slow"),
                            "--remediation", "dry-run", "--webhook-token-file",
                            str(token_file))
    body = await scrape_until(exporter.url, lambda b: mostly(b, first.name, "udp", "success"))
    api_proxy.delay = 3.0  # every API answer 3 s late from now on
    api_proxy.set_down(True)  # and the open watches cut: they resume through the delay
    api_proxy.set_down(False)
    rounds, started = counter(body, "dnsprobe_rounds_total"), time.monotonic()
    later = lab.add_pod()  # discovery still follows, late
    body = await scrape_until(exporter.url, lambda b: mostly(b, later.name, "udp", "success",
                                                             at_least=1), deadline=40)
    elapsed = time.monotonic() - started
    assert mostly(body, later.name, "udp", "success", at_least=1)
    assert elapsed >= 3.0  # it did go through the slow API
    # Rounds never waited for it: one per interval all along (half, for a busy machine).
    ran = counter(body, "dnsprobe_rounds_total") - rounds
    assert ran >= elapsed / INTERVAL / 2
    # A round waiting on the API would overrun every time; a busy 2-core machine makes one
    # overrun now and then: at most one round in ten.
    assert counter(body, "dnsprobe_round_overruns_total") <= max(1, ran / 10)
    assert mostly(body, first.name, "udp", "success")
    # The webhook waits for the API (it must read before it acts), and then decides right.
    status, answer = await post(exporter, payload(alert(first, lab.namespace)))
    assert status == 200 and results(answer) == [(first.name, "skip", "healthy")], answer


async def test_a_throttling_api_server_is_counted_and_never_acted_through(
    lab: Lab, lab_exporter: LabExporter, api_proxy: ApiProxy, token_file: Path
) -> None:
    sick, healthy = sick_and_healthy(lab)
    token = lab.apply_deploy_rbac(RBAC)
    exporter = lab_exporter(token, *FAST, *through(lab, api_proxy, token, "429"),
                            *acting(token_file))
    await scrape_until(exporter.url, lambda b: mostly(b, healthy.name, "udp", "success"))
    api_proxy.throttle = lambda method, path: True
    api_proxy.set_down(True)  # cut the open watches: they come back to a 429
    api_proxy.set_down(False)

    def throttled(body: str) -> bool:
        return counter(body, "dnsprobe_kubernetes_errors_total", reason="throttled") >= 2

    body = await scrape_until(exporter.url, throttled, deadline=30)
    assert throttled(body)
    before = outcomes(body, healthy.name, "udp").get("success", 0)
    # Knowledge that cannot be confirmed is not acted on: 503, Alertmanager retries.
    status, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert status == 503 and "throttling" in answer, answer
    assert not evicted(lab, sick)
    body = await scrape_until(exporter.url, lambda b: outcomes(b, healthy.name, "udp").get(
        "success", 0) > before + 3)  # probing the targets already known goes on
    api_proxy.throttle = None
    assert exporter.logged("Kubernetes API reachable again", timeout=40)
    status, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert status == 200 and results(answer) == [(sick.name, "evict", "success")], answer


async def test_sigkill_mid_eviction_then_restart_acts_once(
    lab: Lab, lab_exporter: LabExporter, api_proxy: ApiProxy, token_file: Path
) -> None:
    sick, healthy = sick_and_healthy(lab)
    token = lab.apply_deploy_rbac(RBAC)
    flags = [*FAST, *through(lab, api_proxy, token, "kill"), *acting(token_file)]
    first = lab_exporter(token, *flags)
    notification = payload(alert(sick, lab.namespace))
    api_proxy.hold = lambda method, path: method == "POST" and path.endswith("/eviction")
    posting = asyncio.create_task(post(first, notification))
    assert await asyncio.to_thread(api_proxy.held.wait, 30)
    first.stop(signal.SIGKILL)  # the lease says "acting", the eviction is in flight
    with contextlib.suppress(aiohttp.ClientError):
        await posting
    api_proxy.hold = None
    api_proxy.release()  # the eviction the dead process sent lands after all
    assert await wait_until(lambda: evicted(lab, sick), 30)

    second = lab_exporter(token, *flags)
    status, answer = await post(second, notification)  # Alertmanager repeats it
    assert status == 200, answer
    [(pod, action, result)] = results(answer)
    assert (pod, action) == (sick.name, "skip") and result in ("duplicate", "cooldown")
    evictions = [r for r in api_proxy.requests if r[0] == "POST" and r[1].endswith(
        "/eviction")]
    assert len(evictions) == 1 and not evicted(lab, healthy)


async def test_a_replica_partitioned_from_the_api_probes_on_and_never_acts(
    lab: Lab, lab_exporter: LabExporter, api_proxy: ApiProxy, token_file: Path
) -> None:
    sick, healthy = sick_and_healthy(lab)
    token = lab.apply_deploy_rbac(RBAC)
    flags = [*FAST, *acting(token_file)]
    connected = lab_exporter(token, *flags)
    cut_off = lab_exporter(token, *flags, *through(lab, api_proxy, token, "partitioned"))
    await scrape_until(cut_off.url, lambda b: mostly(b, healthy.name, "udp", "success"))
    api_proxy.set_down(True)
    body = await scrape_until(cut_off.url, lambda b: True)
    before = outcomes(body, healthy.name, "udp").get("success", 0)
    notification = payload(alert(sick, lab.namespace))
    status, answer = await post(cut_off, notification)
    assert status == 503, answer  # cannot read the Lease or the pod: does nothing
    assert not evicted(lab, sick)
    body = await scrape_until(cut_off.url, lambda b: outcomes(b, healthy.name, "udp").get(
        "success", 0) > before + 3)
    assert mostly(body, sick.name, "udp", "timeout")  # and still sees what it saw
    status, answer = await post(connected, notification)
    assert results(answer) == [(sick.name, "evict", "success")], answer
    api_proxy.set_down(False)  # the partition heals: the same episode is not acted on again
    status, answer = await post(cut_off, notification)
    assert status == 200 and results(answer)[0][2] in ("duplicate", "cooldown"), answer
    assert not evicted(lab, healthy)


# -- webhook abuse ----------------------------------------------------------------------


@pytest.fixture
def static_exporter(healthy_dns: CoreDNS, token_file: Path) -> Iterator[Exporter]:
    """`serve` on one static target with the webhook on: abuse without a cluster."""
    exporter = Exporter(["--server", healthy_dns.address, *FAST, "--webhook-token-file",
                         str(token_file)])
    yield exporter
    exporter.stop()


async def open_body(exporter: Exporter, length: int = 100) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A webhook request whose body has only begun (headers and one byte)."""
    host, port = exporter.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /webhook/alertmanager HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 f"{TOKEN}\r\nContent-Length: {length}\r\n\r\n{{".encode())
    await writer.drain()
    return reader, writer


async def test_a_body_sent_one_byte_a_second_is_cut_off(static_exporter: Exporter) -> None:
    reader, writer = await open_body(static_exporter)
    sent = 1
    started = time.monotonic()
    answer = asyncio.create_task(reader.readline())
    while not answer.done() and sent < 60:  # bounded: 60 bytes, a minute
        done, _ = await asyncio.wait({answer}, timeout=1.0)
        if not done:
            writer.write(b" ")
            await writer.drain()
            sent += 1
    status = await answer
    writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert sent < 100 and time.monotonic() - started < 30  # cut off, not read to the end


@pytest.mark.parametrize("body", [
    b"[" * 900_000,  # deeper than any parser's recursion
    b'{"a":' * 150_000 + b"1" + b"}" * 150_000,
], ids=["nested-arrays", "nested-objects"])
async def test_deeply_nested_json_is_400_not_a_crash(static_exporter: Exporter,
                                                     body: bytes) -> None:
    status, text = await post(static_exporter, None, raw=body)
    assert status == 400 and "not JSON" in text, text
    status, _ = await post(static_exporter, payload(alert("p", "kube-system")))
    assert status == 200  # and the next request is served as ever


async def test_a_payload_just_under_a_mebibyte_is_read(static_exporter: Exporter) -> None:
    big = alert("p", "kube-system")
    big["annotations"]["description"] = "x" * (1024 * 1024 - 8192)
    body = json.dumps(payload(big)).encode()
    assert 1024 * 1024 - 16384 < len(body) <= 1024 * 1024
    status, answer = await post(static_exporter, None, raw=body)
    assert status == 200 and len(answer["decisions"]) == 1, answer


async def test_a_flood_is_bounded_and_slows_nothing_else(static_exporter: Exporter) -> None:
    """Forty requests at once, each holding its body back: eight are taken in, the rest
    get 503 with Retry-After at once; scrapes and probes go on meanwhile."""
    held = [await open_body(static_exporter) for _ in range(8)]
    status, text = await post(static_exporter, payload(alert("p", "kube-system")))
    assert status == 503 and "busy" in text, text
    answers = await asyncio.gather(*(post(static_exporter, payload(alert("p", "ns")))
                                     for _ in range(32)))
    assert {s for s, _ in answers} == {503}
    body = await scrape_until(static_exporter.url, lambda b: True)
    probes, rounds = counter(body, "dnsprobe_probes_total"), counter(body, "dnsprobe_rounds_total")
    body = await scrape_until(static_exporter.url,
                              lambda b: counter(b, "dnsprobe_probes_total") > probes + 4)
    assert counter(body, "dnsprobe_probes_total") > probes + 4
    # Held requests would stall every round; a busy machine may make one round in ten late.
    ran = counter(body, "dnsprobe_rounds_total") - rounds
    assert counter(body, "dnsprobe_round_overruns_total") <= max(1, ran / 10)
    for _, writer in held:
        writer.close()
    assert static_exporter.logged("webhook: too many requests at once; answering 503 until "
                                  "some end")
    async def served() -> bool:
        status, _ = await post(static_exporter, payload(alert("p", "kube-system")))
        return status == 200
    deadline = time.monotonic() + 20  # the held requests end as their sockets close
    while not await served():
        assert time.monotonic() < deadline, "the webhook stayed busy"
        await asyncio.sleep(0.1)


async def test_thousands_of_alerts_in_one_payload_cost_few_api_calls_and_act_once(
    lab: Lab, lab_exporter: LabExporter, api_proxy: ApiProxy, token_file: Path
) -> None:
    sick, healthy = sick_and_healthy(lab)
    token = lab.apply_deploy_rbac(RBAC)
    exporter = lab_exporter(token, *FAST, *through(lab, api_proxy, token, "many"),
                            *acting(token_file))
    alerts = [alert(sick, lab.namespace) for _ in range(1200)]
    alerts += [alert(f"coredns-gone-{i}", lab.namespace) for i in range(600)]
    alerts += [alert(f"web-{i}", "default") for i in range(600)]
    assert len(json.dumps(payload(*alerts))) < 1024 * 1024  # what the webhook takes
    await scrape_until(exporter.url, lambda b: mostly(b, healthy.name, "udp", "success"))
    before = len(api_proxy.requests)
    status, answer = await post(exporter, payload(*alerts))
    assert status == 200, answer
    decided = results(answer)
    assert len(decided) == 2400
    counts: dict[str, int] = {}
    for _, action, result in decided:
        counts[f"{action}/{result}"] = counts.get(f"{action}/{result}", 0) + 1
    assert counts.pop("evict/success") == 1
    assert counts.pop("skip/not_coredns") == 600
    # The sick pod's other 1199 alerts are the same pod; of the 600 other CoreDNS pods the
    # first MAX_PODS_PER_PAYLOAD - 1 are judged (the cooldown of the eviction holds them),
    # the rest are beyond the limit: each limit triggers, exactly as often as it should.
    judged = MAX_PODS_PER_PAYLOAD - 1
    assert counts == {"skip/same_pod": 1199, "skip/cooldown": judged,
                      "skip/too_many_pods": 600 - judged}, counts
    assert evicted(lab, sick) and not evicted(lab, healthy)
    # Per judged pod a handful of reads; 20 pods at most: not thousands of calls.
    assert len(api_proxy.requests) - before < 200, len(api_proxy.requests) - before
    assert exporter.process.poll() is None


# -- configuration ----------------------------------------------------------------------

BAD_SETTINGS = {
    "server": "not-an-ip", "kubeconfig": "/nonexistent/kubeconfig", "namespace": "Bad_NS",
    "service": "-svc", "dns-port": "0", "cluster-domain": "bad_domain",
    "resolv-conf": "/nonexistent/resolv.conf", "protocol": "sctp", "timeout": "-1",
    "interval": "0", "concurrency": "0", "listen": "nope", "remediation": "always",
    "min-ready": "-1", "cooldown": "soon", "allow-delete": "maybe", "self-remediate": "yes!",
    "log-format": "xml",
    "mode": "tunnel", "node-address-type": "Hostname", "probe-pod-namespace": "Bad_NS",
    "probe-pod-image": "bad image", "query": "bad..name", "node-name": "Bad_Node",
    "node-local-dns": "nodelocal.example", "probe-endpoint": "everyone",
    "web-config-file": "/nonexistent/web.yml",
}
# A missing token file is not a configuration error: a Secret volume may fill it later;
# the webhook answers 503 and says why until it can be read (tests/test_remediation.py).
NOT_AT_START = {"webhook-token-file"}


def test_every_setting_has_a_bad_value_here() -> None:
    from exporter.config import KEYS

    assert set(KEYS) == set(BAD_SETTINGS) | NOT_AT_START


@pytest.mark.parametrize("key", sorted(BAD_SETTINGS))
def test_every_invalid_setting_is_a_clear_error_with_exit_2(key: str, tmp_path: Path) -> None:
    value = BAD_SETTINGS[key]
    command = [sys.executable, "-m", "exporter", "serve"]
    env = dict(os.environ)
    if key in ("query", "resolv-conf"):
        command += [f"--{key}", value]
    else:
        env["DNSPROBE_" + key.upper().replace("-", "_")] = value
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path, check=False)
    assert done.returncode == 2, (key, done.stderr)
    assert "Traceback" not in done.stderr
    assert "configuration error" in done.stderr, done.stderr
    assert key in done.stderr or key.replace("-", "_").upper() in done.stderr, done.stderr
