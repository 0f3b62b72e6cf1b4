"""Discovery against the real test cluster: the exporter, inside a node namespace with no
route out, finds the CoreDNS Service and its pods through a real kube-apiserver, probes
real CoreDNS pods in namespaces of their own, and follows pod churn and API trouble."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import pytest
from prometheus_client.samples import Sample

from tests.conftest import LabExporter
from tests.harness.cluster import ADMIN_TOKEN, KUBERNETES_CLUSTER_IP
from tests.harness.coredns import Behaviour
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab
from tests.harness.scrape import samples, scrape, scrape_until

FAST = ["--interval", "0.5", "--timeout", "0.3"]
Start = Callable[..., Exporter]


@pytest.fixture
def start_exporter(lab_exporter: LabExporter) -> Start:
    """Start `serve` inside the lab's node namespace, against the test cluster."""

    def start(*args: str, token: str = ADMIN_TOKEN) -> Exporter:
        return lab_exporter(token, *FAST, *args)

    return start


def series(body: str, name: str = "dnsprobe_success", **labels: str) -> list[Sample]:
    return [
        s for s in samples(body)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def pods_with(body: str, **labels: str) -> dict[str, float]:
    """{pod/protocol: value} of dnsprobe_success for pod targets."""
    return {
        f"{s.labels['pod']}/{s.labels['protocol']}": s.value
        for s in series(body, kind="pod", **labels)
    }


def probed(*pods: str) -> Callable[[str], bool]:
    """True once every pod has a passing udp and tcp series."""
    def ready(body: str) -> bool:
        seen = pods_with(body)
        return all(seen.get(f"{p}/{proto}") == 1.0 for p in pods for proto in ("udp", "tcp"))
    return ready


async def test_discovers_service_and_pods_and_probes_each(lab: Lab, start_exporter: Start) -> None:
    pods = [lab.add_pod(node=f"node-{i}") for i in range(3)]
    cluster_ip = lab.create_service()
    exporter = start_exporter()

    def every_target_probed(body: str) -> bool:  # the Service's first results included
        return probed(*(p.name for p in pods))(body) and len(series(body, kind="service")) == 2

    body = await scrape_until(exporter.url, every_target_probed)
    assert every_target_probed(body), body
    for pod in pods:
        for proto in ("udp", "tcp"):
            [sample] = series(body, pod=pod.name, protocol=proto)
            assert sample.labels == {
                "kind": "pod", "namespace": lab.namespace, "service": "kube-dns",
                "pod": pod.name, "node": pod.node, "address": f"{pod.ip}:53",
                "protocol": proto, "query": "kubernetes",
            }
        [info] = series(body, "dnsprobe_target_info", pod=pod.name)
        assert info.labels["ready"] == "true" and info.value == 1.0
    service = series(body, kind="service")
    assert {(s.labels["address"], s.labels["protocol"], s.value) for s in service} == {
        (f"{cluster_ip}:53", "udp", 1.0), (f"{cluster_ip}:53", "tcp", 1.0)
    }
    assert all(s.labels["pod"] == "" and s.labels["node"] == "" for s in service)
    status, _, text = await scrape(exporter.url, "/-/ready")
    assert status == 200, text
    status, _, page = await scrape(exporter.url, "/")
    assert status == 200 and all(p.name in page for p in pods)
    # SIGTERM: the watches are shut down and the exporter exits 0, promptly.
    assert exporter.stop(timeout=10) == 0
    assert exporter.messages()[-1] == "stopped"


def gone(*pods: str) -> Callable[[str], bool]:
    def ready(body: str) -> bool:
        return not any(
            s.labels.get("pod") in pods
            for s in samples(body)
            if s.name.startswith("dnsprobe_") and "pod" in s.labels
        )
    return ready


async def test_pods_added_and_deleted_while_running(lab: Lab, start_exporter: Start) -> None:
    first = lab.add_pod()
    lab.create_service()
    exporter = start_exporter()
    await scrape_until(exporter.url, probed(first.name))

    second = lab.add_pod()
    body = await scrape_until(exporter.url, probed(first.name, second.name))
    assert probed(first.name, second.name)(body), body

    lab.delete_pod(first)
    body = await scrape_until(exporter.url, gone(first.name))
    assert gone(first.name)(body), "series of the deleted pod are still exported:\n" + body
    assert probed(second.name)(body)
    assert [s.labels["pod"] for s in series(body, "dnsprobe_target_info")] == [second.name]
    logs = exporter.logs_until(lambda log: any(
        first.name in r.get("removed", "") for r in log if r.get("msg") == "targets updated"))
    updates = [r for r in logs if r.get("msg") == "targets updated"]
    assert any(second.name in r["added"] for r in updates)
    assert any(first.name in r["removed"] for r in updates)


async def test_pod_that_is_not_ready_is_still_probed(lab: Lab, start_exporter: Start) -> None:
    ready, unready = lab.add_pod(), lab.add_pod(ready=False)
    lab.create_service()
    exporter = start_exporter()
    body = await scrape_until(exporter.url, probed(ready.name, unready.name))
    assert probed(ready.name, unready.name)(body), body
    info = {s.labels["pod"]: s.labels["ready"] for s in series(body, "dnsprobe_target_info")}
    assert info == {ready.name: "true", unready.name: "false"}

    lab.set_ready(unready, True)

    def both_ready(text: str) -> bool:
        return {s.labels["ready"] for s in series(text, "dnsprobe_target_info")} == {"true"}

    assert both_ready(await scrape_until(exporter.url, both_ready))


async def test_same_labelled_pods_in_another_namespace_are_ignored(
    lab: Lab, start_exporter: Start
) -> None:
    ours = lab.add_pod()
    lab.create_service()
    other = lab.other_namespace()
    lab.create_service(namespace=other)
    stranger = lab.add_pod(namespace=other)
    exporter = start_exporter()
    body = await scrape_until(exporter.url, probed(ours.name))
    assert probed(ours.name)(body)
    assert not series(body, pod=stranger.name)
    assert {s.labels["namespace"] for s in series(body)} == {lab.namespace}


async def test_pod_with_udp_dropped_fails_udp_only(lab: Lab, start_exporter: Start) -> None:
    sick, healthy = lab.add_pod(), lab.add_pod()
    lab.create_service()
    sick.netns.drop("udp", 53)
    exporter = start_exporter()
    want = {f"{sick.name}/udp": 0.0, f"{sick.name}/tcp": 1.0,
            f"{healthy.name}/udp": 1.0, f"{healthy.name}/tcp": 1.0}

    def settled(body: str) -> bool:
        return pods_with(body) == want and bool(series(body, "dnsprobe_probes_total",
                                                       pod=sick.name, result="timeout"))

    body = await scrape_until(exporter.url, settled)
    assert pods_with(body) == want, body
    [timeouts] = series(body, "dnsprobe_probes_total", pod=sick.name, protocol="udp",
                        result="timeout")
    assert timeouts.value >= 1


async def test_default_query_expects_the_kubernetes_cluster_ip_from_the_api(
    lab: Lab, start_exporter: Start
) -> None:
    good, wrong = lab.add_pod(), lab.add_pod(Behaviour.WRONG_ANSWER)
    lab.create_service()
    exporter = start_exporter()

    def settled(body: str) -> bool:
        return probed(good.name)(body)

    body = await scrape_until(exporter.url, lambda b: settled(b) and bool(
        [s for s in series(b, "dnsprobe_probes_total", pod=wrong.name, protocol="udp",
                           result="wrong_answer") if s.value >= 1]))
    wrong_udp = series(body, "dnsprobe_probes_total", pod=wrong.name, protocol="udp",
                       result="wrong_answer")
    assert wrong_udp and wrong_udp[0].value >= 1, body + "".join(exporter.raw)
    assert pods_with(body)[f"{wrong.name}/udp"] == 0.0
    expected = [r["expect"] for r in exporter.logs if r.get("msg") == "targets updated"]
    assert expected and set(expected) == {KUBERNETES_CLUSTER_IP}


async def test_api_server_restart_keeps_probing_and_discovery_recovers(
    lab: Lab, start_exporter: Start
) -> None:
    first = lab.add_pod()
    lab.create_service()
    exporter = start_exporter()
    await scrape_until(exporter.url, probed(first.name))

    def probes(body: str) -> float:
        return sum(s.value for s in series(body, "dnsprobe_probes_total", pod=first.name))

    def api_down(body: str) -> bool:
        return bool([s for s in series(body, "dnsprobe_kubernetes_errors_total") if s.value])

    lab.cluster.stop_apiserver()
    try:
        body = await scrape_until(exporter.url, api_down)
        assert api_down(body), body
        before = probes(body)
        body = await scrape_until(exporter.url, lambda b: probes(b) >= before + 4)
        assert probes(body) >= before + 4, "probing stopped while the API server was down"
        assert probed(first.name)(body)
    finally:
        lab.cluster.start_apiserver()

    second = lab.add_pod()
    body = await scrape_until(exporter.url, probed(first.name, second.name), deadline=60)
    assert probed(first.name, second.name)(body), body
    logs = exporter.logs_until(lambda log: any(
        r.get("msg") == "Kubernetes API reachable again" and r.get("watch") == "pods"
        for r in log))
    errors = [r for r in logs if r.get("msg", "").startswith("Kubernetes API error")]
    recovered = [r for r in logs if r.get("msg") == "Kubernetes API reachable again"]
    seen = [(r["watch"], r["reason"], r["error"]) for r in errors]
    assert errors and all(r["reason"] in ("unreachable", "timeout") for r in errors), seen
    # Once per watch and change of state, not once per retry.
    assert len(errors) <= 3 * 2, errors
    assert {r["watch"] for r in recovered} >= {"pods"}


async def test_service_account_without_list_permission_says_which(
    lab: Lab, start_exporter: Start
) -> None:
    lab.add_pod()
    lab.create_service()
    token = lab.service_account_token("no-pods", [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
    ])
    exporter = start_exporter(token=token)

    def refused(body: str) -> bool:
        return bool(series(body, "dnsprobe_kubernetes_errors_total", resource="pods",
                           reason="forbidden"))

    body = await scrape_until(exporter.url, refused)
    assert refused(body), body
    logs = exporter.logs_until(lambda log: any(
        r.get("msg", "").startswith("Kubernetes API error") and r.get("watch") == "pods"
        for r in log))
    errors = [r for r in logs if r.get("msg", "").startswith("Kubernetes API error")
              and r.get("watch") == "pods"]
    assert errors, exporter.raw
    assert errors[0]["reason"] == "forbidden"
    assert f"may not list pods in namespace {lab.namespace}" in errors[0]["error"]
    assert "system:serviceaccount:" in errors[0]["error"]
    status, _, text = await scrape(exporter.url, "/-/ready")
    assert status == 503, text
    assert not any(r.get("level") == "raw" for r in exporter.logs), "a traceback was printed"


def test_check_discovers_and_probes_once(lab: Lab) -> None:
    pods = [lab.add_pod(), lab.add_pod()]
    cluster_ip = lab.create_service()
    kubeconfig = lab.admin_kubeconfig()
    done = lab.node.run([sys.executable, "-m", "exporter", "check", "--json",
                         "--kubeconfig", str(kubeconfig), "--namespace", lab.namespace])
    assert done.returncode == 0, done.stderr + done.stdout
    results = json.loads(done.stdout)["results"]
    assert {(r["kind"], r["pod"], r["protocol"]) for r in results} == {
        *(("pod", p.name, proto) for p in pods for proto in ("udp", "tcp")),
        ("service", "", "udp"), ("service", "", "tcp"),
    }
    assert {r["address"] for r in results if r["kind"] == "service"} == {f"{cluster_ip}:53"}
    assert all(r["outcome"] == "success" for r in results)


def test_check_names_a_missing_service(lab: Lab) -> None:
    kubeconfig = lab.admin_kubeconfig()
    done = lab.node.run([sys.executable, "-m", "exporter", "check",
                         "--kubeconfig", str(kubeconfig), "--namespace", lab.namespace])
    assert done.returncode == 1
    assert f"Service {lab.namespace}/kube-dns not found" in done.stderr
    assert "Traceback" not in done.stderr


async def test_removed_service_drops_targets_and_says_so(lab: Lab, start_exporter: Start) -> None:
    pod = lab.add_pod()
    lab.create_service()
    exporter = start_exporter()
    await scrape_until(exporter.url, probed(pod.name))
    lab.core.delete_namespaced_service("kube-dns", lab.namespace, _preload_content=False)

    def empty(body: str) -> bool:
        return not series(body)

    assert empty(await scrape_until(exporter.url, empty))
    assert any("not found" in str(r.get("msg")) for r in exporter.logs)


async def test_rejected_token_is_reported_and_not_ready(lab: Lab, start_exporter: Start) -> None:
    lab.add_pod()
    lab.create_service()
    exporter = start_exporter(token="not-a-valid-token")

    def rejected(body: str) -> bool:
        return bool(series(body, "dnsprobe_kubernetes_errors_total", reason="unauthorized"))

    assert rejected(await scrape_until(exporter.url, rejected))
    logs = exporter.logs_until(lambda log: any(
        r.get("msg", "").startswith("Kubernetes API error") for r in log))
    errors = [r for r in logs if r.get("msg", "").startswith("Kubernetes API error")]
    assert errors and all(r["reason"] == "unauthorized" for r in errors)
    assert "token is invalid or expired" in errors[0]["error"]
    status, _, _ = await scrape(exporter.url, "/-/ready")
    assert status == 503
    _, _, body = await scrape(exporter.url)
    assert not series(body)
