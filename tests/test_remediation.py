"""The Alertmanager webhook against the real test cluster: the exporter runs in the node
namespace as deploy/'s ServiceAccount (its RBAC applied for real), receives version 4
payloads, and evicts only a UDP-dead CoreDNS pod, once, under every guard."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest

from tests.conftest import LabExporter
from tests.harness import coredns
from tests.harness.cluster import ADMIN_TOKEN
from tests.harness.exporter import Exporter
from tests.harness.lab import Lab, Pod
from tests.harness.node import EXPORTER_IMAGE
from tests.harness.scrape import samples, scrape_until, wait_until

RBAC = Path(__file__).resolve().parents[1] / "deploy" / "base" / "rbac.yaml"
TOKEN = "s3cret-webhook-token"
FAST = ["--interval", "0.5", "--timeout", "0.3"]
ALERT = "CoreDNSPodUDPFailing"


def alert(pod: Pod | str, namespace: str, *, status: str = "firing",
          starts_at: datetime | None = None, fingerprint: str | None = None,
          **labels: str) -> dict[str, Any]:
    name = pod if isinstance(pod, str) else pod.name
    return {
        "status": status,
        "labels": {"alertname": ALERT, "namespace": namespace, "pod": name, **labels},
        "annotations": {"summary": "UDP DNS failing"},
        # By default now: after the pods were made, as a real alert starts after its pod.
        "startsAt": (starts_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint or uuid.uuid4().hex[:16],
    }


def payload(*alerts: dict[str, Any], version: str = "4") -> dict[str, Any]:
    return {
        "version": version, "groupKey": "{}:{pod}", "truncatedAlerts": 0,
        "status": "firing", "receiver": "coredns-health-exporter",
        "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
        "externalURL": "http://alertmanager", "alerts": list(alerts),
        "someFutureField": {"ignored": True},
    }


async def post(exporter: Exporter, body: Any, token: str | None = TOKEN,
               raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.post(
        exporter.url + "/webhook/alertmanager", headers=headers,
        data=raw if raw is not None else None, json=None if raw is not None else body,
    ) as resp:
        text = await resp.text()
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, text


def results(answer: Any) -> list[tuple[str, str, str]]:
    return [(d["pod"], d["action"], d["result"]) for d in answer["decisions"]]


Start = Callable[..., Exporter]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def sa_token(lab: Lab) -> str:
    return lab.apply_deploy_rbac(RBAC)


@pytest.fixture
def start(lab_exporter: LabExporter, sa_token: str, token_file: Path) -> Start:
    """`serve` in the node namespace as deploy/'s ServiceAccount, remediation on."""

    def run(*args: str, mode: str = "evict", webhook: bool = True,
            token: str | None = None) -> Exporter:
        extra = ["--webhook-token-file", str(token_file)] if webhook else []
        return lab_exporter(token or sa_token, *FAST, "--remediation", mode, *extra, *args)

    return run


def evicted(lab: Lab, pod: Pod) -> bool:
    obj = lab.core.read_namespaced_pod(pod.name, lab.namespace, _preload_content=False)
    return bool(json.loads(obj.data)["metadata"].get("deletionTimestamp"))


def events(lab: Lab, pod: Pod) -> list[dict[str, Any]]:
    resp = lab.core.list_namespaced_event(
        lab.namespace, field_selector=f"involvedObject.name={pod.name}", _preload_content=False)
    items: list[dict[str, Any]] = json.loads(resp.data)["items"]
    return items


def counter(body: str, action: str, result: str, trigger: str = "webhook") -> float:
    return sum(s.value for s in samples(body) if s.name == "dnsprobe_remediations_total"
               and s.labels == {"action": action, "result": result, "trigger": trigger})


async def metrics(exporter: Exporter) -> str:
    async with aiohttp.ClientSession() as session, session.get(exporter.url + "/metrics") as r:
        return await r.text()


def sick_and_healthy(lab: Lab) -> tuple[Pod, Pod]:
    sick, healthy = lab.add_pod(), lab.add_pod()
    lab.create_service()
    sick.netns.drop("udp", 53)
    return sick, healthy


# -- the act ------------------------------------------------------------------------------


async def test_udp_dead_pod_is_evicted_once_with_event_and_metric(
    lab: Lab, start: Start
) -> None:
    sick, healthy = sick_and_healthy(lab)
    exporter = start()
    body = payload(alert(sick, lab.namespace))
    status, answer = await post(exporter, body)
    assert status == 200, answer
    assert results(answer) == [(sick.name, "evict", "success")]
    assert evicted(lab, sick) and not evicted(lab, healthy)
    [event] = events(lab, sick)
    assert event["reason"] == "CoreDNSPodEvicted" and event["type"] == "Warning"
    assert ALERT in event["message"] and "udp" in event["message"].lower()
    assert event["involvedObject"]["uid"]
    assert counter(await metrics(exporter), "evict", "success") == 1

    # Alertmanager repeats the same notification: the episode is acted on once.
    status, answer = await post(exporter, body)
    assert status == 200 and results(answer) == [(sick.name, "skip", "duplicate")]
    assert len(events(lab, sick)) == 1
    logs = exporter.logged("evicted pod")
    assert len(logs) == 1 and logs[0]["pod"] == sick.name and logs[0]["alert"] == ALERT
    async with aiohttp.ClientSession() as session, session.get(exporter.url + "/") as page:
        text = await page.text()
    assert sick.name in text and "duplicate" in text and "success" in text


async def test_dry_run_writes_the_event_but_evicts_nothing(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    exporter = start(mode="dry-run")
    status, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert status == 200 and results(answer) == [(sick.name, "dry_run", "success")]
    assert not evicted(lab, sick)
    [event] = events(lab, sick)
    assert event["reason"] == "CoreDNSPodEvictionDryRun"
    assert "would evict" in event["message"]
    assert exporter.logged("would evict (dry run)")


async def test_two_replicas_at_once_evict_one_pod(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    first, second = start(), start()
    body = payload(alert(sick, lab.namespace))
    answers = await asyncio.gather(post(first, body), post(second, body))
    decisions = [r for status, answer in answers for r in results(answer)]
    assert all(status == 200 for status, _ in answers)
    assert sorted(a for _, a, _ in decisions) == ["evict", "skip"], decisions
    assert len(events(lab, sick)) == 1


async def test_cooldown_holds_across_pods_and_exporter_restarts(lab: Lab, start: Start) -> None:
    sick, other_sick, _ = lab.add_pod(), lab.add_pod(), lab.add_pod()
    lab.create_service()
    sick.netns.drop("udp", 53)
    other_sick.netns.drop("udp", 53)
    exporter = start("--cooldown", "5m")
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "evict", "success")]
    exporter.stop()
    restarted = start("--cooldown", "5m")  # a new process: the Lease remembers
    _, answer = await post(restarted, payload(alert(other_sick, lab.namespace)))
    assert results(answer) == [(other_sick.name, "skip", "cooldown")]
    assert not evicted(lab, other_sick)


# -- guards -------------------------------------------------------------------------------


async def test_healthy_pod_is_not_restarted(lab: Lab, start: Start) -> None:
    _, healthy = sick_and_healthy(lab)
    exporter = start()
    status, answer = await post(exporter, payload(alert(healthy, lab.namespace)))
    assert status == 200 and results(answer) == [(healthy.name, "skip", "healthy")]
    assert not evicted(lab, healthy) and not events(lab, healthy)


async def test_resolved_alert_is_not_acted_on(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    exporter = start()
    body = payload(alert(sick, lab.namespace, status="resolved"))
    body["truncatedAlerts"] = 7
    _, answer = await post(exporter, body)
    assert results(answer) == [(sick.name, "skip", "not_firing")]
    [truncated] = exporter.logged("Alertmanager truncated the payload")
    assert truncated["truncated_alerts"] == 7
    assert not evicted(lab, sick)
    assert counter(await metrics(exporter), "skip", "not_firing") == 1


async def test_pod_outside_the_selector_is_not_acted_on(lab: Lab, start: Start) -> None:
    sick_and_healthy(lab)
    stranger = lab.add_pod(labels={"app": "something-else"})
    stranger.netns.drop("udp", 53)
    exporter = start()
    _, answer = await post(exporter, payload(
        alert(stranger, lab.namespace), alert("kube-proxy-x", "other-namespace")))
    assert results(answer) == [(stranger.name, "skip", "not_coredns"),
                               ("kube-proxy-x", "skip", "not_coredns")]
    assert not evicted(lab, stranger)


async def test_min_ready_keeps_the_last_ready_pod(lab: Lab, start: Start) -> None:
    sick, other = sick_and_healthy(lab)
    lab.set_ready(other, False)
    exporter = start()
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "skip", "min_ready")]
    assert not evicted(lab, sick)


async def test_no_restart_while_the_deployment_rolls_out(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    lab.create_deployment(rolled_out=False)
    exporter = start()
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "skip", "rollout")]
    assert not evicted(lab, sick)


async def test_rolled_out_deployment_does_not_block(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    lab.create_deployment(rolled_out=True)
    exporter = start()
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "evict", "success")]


async def test_pdb_that_blocks_is_recorded_and_not_forced(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    lab.create_pdb(min_available=2)
    exporter = start()
    body = payload(alert(sick, lab.namespace))
    _, answer = await post(exporter, body)
    assert results(answer) == [(sick.name, "evict", "blocked")]
    assert not evicted(lab, sick)
    [event] = events(lab, sick)
    assert event["reason"] == "CoreDNSPodEvictionBlocked"
    # Given back: the same episode is tried again when Alertmanager repeats it.
    _, answer = await post(exporter, body)
    assert results(answer) == [(sick.name, "evict", "blocked")]
    assert counter(await metrics(exporter), "evict", "blocked") == 2


async def test_pod_replaced_after_the_alert_started_is_left_alone(
    lab: Lab, start: Start
) -> None:
    sick, _ = sick_and_healthy(lab)
    exporter = start()
    started = datetime.now(UTC) - timedelta(seconds=30)
    # The pod is deleted and a new one of the same name takes its place.
    lab.core.delete_namespaced_pod(sick.name, lab.namespace, grace_period_seconds=0,
                                   _preload_content=False)
    lab.core.create_namespaced_pod(lab.namespace, {
        "metadata": {"name": sick.name, "labels": {"k8s-app": "kube-dns"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "coredns"}]},
    }, _preload_content=False)
    lab.set_ready(sick, True)
    _, answer = await post(exporter, payload(alert(sick, lab.namespace, starts_at=started)))
    assert results(answer) == [(sick.name, "skip", "replaced")]
    assert not evicted(lab, sick)


# -- the endpoint -------------------------------------------------------------------------


async def test_wrong_or_missing_token_is_401_before_any_api_call(
    lab: Lab, token_file: Path, tmp_path: Path
) -> None:
    lab.add_pod()
    lab.create_service()
    # An API server that does not answer: any API call would turn into 503.
    dead = lab.cluster.write_kubeconfig(tmp_path / "dead.kubeconfig", "x",
                                        server="https://127.0.0.1:1")
    exporter = Exporter(["--kubeconfig", str(dead), "--namespace", lab.namespace, *FAST,
                         "--remediation", "evict", "--webhook-token-file", str(token_file)],
                        netns=lab.node)
    try:
        body = payload(alert("coredns-x", lab.namespace))
        assert (await post(exporter, body, token=None))[0] == 401
        assert (await post(exporter, body, token="wrong"))[0] == 401
        status, text = await post(exporter, body)
        assert status == 503 and "Kubernetes API unavailable" in text
    finally:
        exporter.stop()


async def test_body_over_1_mib_is_413(lab: Lab, start: Start) -> None:
    lab.add_pod()
    lab.create_service()
    exporter = start()
    status, _ = await post(exporter, None, raw=b"{" + b" " * (1024 * 1024 + 10) + b"}")
    assert status == 413


@pytest.mark.parametrize("raw", [b"{not json", b'{"version": "3", "alerts": []}', b"[]",
                                 b'{"version": "4", "alerts": [{"status": "maybe"}]}',
                                 b"[" * 100000])
async def test_malformed_or_not_version_4_is_400(lab: Lab, start: Start, raw: bytes) -> None:
    lab.add_pod()
    lab.create_service()
    exporter = start()
    status, text = await post(exporter, None, raw=raw)
    assert status == 400, text
    assert "bad Alertmanager payload" in text
    assert exporter.process.poll() is None


async def test_no_token_configured_is_503_and_says_why(lab: Lab, start: Start) -> None:
    lab.add_pod()
    lab.create_service()
    exporter = start(webhook=False)
    for _ in range(2):
        status, text = await post(exporter, payload(), token="anything")
        assert status == 503 and "no --webhook-token-file" in text
    told = exporter.logged("webhook answering 503")
    assert len(told) == 1


async def test_rotated_token_file_is_picked_up(lab: Lab, start: Start, token_file: Path) -> None:
    lab.add_pod()
    lab.create_service()
    exporter = start()
    assert (await post(exporter, payload()))[0] == 200
    await asyncio.to_thread(token_file.write_text, "rotated-token\n")
    assert (await post(exporter, payload()))[0] == 401
    assert (await post(exporter, payload(), token="rotated-token"))[0] == 200


def test_shipped_rbac_cannot_delete_pods_or_reach_other_namespaces(
    lab: Lab, sa_token: str
) -> None:
    pod = lab.add_pod()
    other = lab.other_namespace()
    stranger = lab.add_pod(namespace=other)
    config = kubernetes.client.Configuration()
    config.host = lab.cluster.server
    config.ssl_ca_cert = str(lab.cluster.ca_file)
    config.api_key = {"BearerToken": sa_token}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    api: Any = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))
    for name, ns in ((pod.name, lab.namespace), (stranger.name, other)):
        with pytest.raises(kubernetes.client.ApiException) as refused:
            api.delete_namespaced_pod(name, ns, _preload_content=False)
        assert refused.value.status == 403
    with pytest.raises(kubernetes.client.ApiException) as refused:
        api.list_namespaced_pod(other, _preload_content=False)
    assert refused.value.status == 403
    with pytest.raises(kubernetes.client.ApiException) as refused:
        api.list_namespaced_secret(lab.namespace, _preload_content=False)
    assert refused.value.status == 403
    assert api.list_namespaced_pod(lab.namespace, _preload_content=False).status == 200


async def test_allow_delete_forces_past_a_blocking_pdb(lab: Lab, start: Start) -> None:
    sick, _ = sick_and_healthy(lab)
    lab.create_pdb(min_available=2)
    exporter = start("--allow-delete")
    # Without the extra grant (deploy/ gives no delete), the delete is refused and said so.
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "delete", "error")]
    assert "may not delete pods" in answer["decisions"][0]["message"]
    assert not evicted(lab, sick)
    # With it, as the docs say to grant alongside --allow-delete:
    lab.grant("coredns-health-exporter", "delete-pods",
              [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}])
    await asyncio.to_thread(lab.await_allowed, "system:serviceaccount:"
                            f"{lab.namespace}:coredns-health-exporter", "delete", "pods")
    _, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert results(answer) == [(sick.name, "delete", "success")]
    assert evicted(lab, sick)
    assert [e["reason"] for e in events(lab, sick)].count("CoreDNSPodDeleted") == 1
    assert [r["pod"] for r in exporter.logged("deleted pod")] == [sick.name]


async def test_outside_the_cluster_nothing_is_restarted_unconfirmed(
    lab: Lab, lab_exporter: LabExporter, token_file: Path
) -> None:
    """From outside, a pod cannot be probed over UDP to confirm the alert: even with every
    permission, the exporter skips (cannot_confirm)."""
    sick, _ = sick_and_healthy(lab)
    exporter = lab_exporter(ADMIN_TOKEN, *FAST, "--remediation", "evict", "--mode",
                            "port-forward", "--webhook-token-file", str(token_file),
                            netns=lab.outside())
    for _ in range(2):  # the first waits for the mode to be chosen
        status, answer = await post(exporter, payload(alert(sick, lab.namespace)))
        assert status == 200, answer
        assert results(answer) == [(sick.name, "skip", "cannot_confirm")]
        assert "port-forward mode" in answer["decisions"][0]["message"]
    assert not evicted(lab, sick)
    assert counter(await metrics(exporter), "skip", "cannot_confirm") == 2


OUTSIDE = RBAC.parents[1] / "outside"
PROBE_POD_RBAC = (OUTSIDE / "probe-pod.yaml", OUTSIDE / "probe-pod-remediation.yaml")


def outside_probe_pod(lab: Lab, lab_exporter: LabExporter, token_file: Path,
                      probe_pod_namespace: str) -> Exporter:
    """`serve --mode probe-pod` outside the cluster network, remediation on, with the
    credentials of deploy/outside/probe-pod.yaml and its remediation add-on."""
    token = lab.apply_deploy_rbac(*PROBE_POD_RBAC)
    return lab_exporter(token, *FAST, "--mode", "probe-pod", "--remediation", "evict",
                        "--probe-pod-namespace", probe_pod_namespace,
                        "--probe-pod-image", EXPORTER_IMAGE,
                        "--webhook-token-file", str(token_file), netns=lab.outside())


async def test_in_probe_pod_mode_a_confirming_pod_that_cannot_run_restarts_nothing(
    lab: Lab, lab_exporter: LabExporter, token_file: Path
) -> None:
    """The confirming probe pod fails (here: no right to create pods in the namespace
    given): that says nothing about the CoreDNS pod, so nothing is restarted."""
    sick, _ = sick_and_healthy(lab)
    exporter = outside_probe_pod(lab, lab_exporter, token_file, "default")
    status, answer = await post(exporter, payload(alert(sick, lab.namespace)))
    assert status == 200, answer
    assert results(answer) == [(sick.name, "skip", "cannot_confirm")]
    message = answer["decisions"][0]["message"]
    assert "probe pod that was to confirm it failed" in message, message
    assert "default" in message, message
    assert not evicted(lab, sick)
    assert counter(await metrics(exporter), "skip", "cannot_confirm") == 1


# -- self-remediation: the exporter's own probes as the trigger ------------------------------


async def test_self_remediation_evicts_a_udp_dead_pod_within_30s_at_the_defaults(
    lab: Lab, lab_exporter: LabExporter, sa_token: str
) -> None:
    """No Alertmanager: at the default --interval 5 and --timeout 1, a pod whose UDP/53
    goes dead is evicted within 30 s, through the same guards and acts (trigger self)."""
    sick, healthy = lab.add_pod(), lab.add_pod()
    lab.create_service()
    exporter = lab_exporter(sa_token, "--remediation", "evict", "--self-remediate")
    assert exporter.logged("self-remediation on", timeout=30)

    def both_answer(body: str) -> bool:
        return all(s.value == 1 for s in samples(body) if s.name == "dnsprobe_success"
                   and s.labels["kind"] == "pod") and sum(
            1 for s in samples(body) if s.name == "dnsprobe_success"
            and s.labels["kind"] == "pod" and s.labels["protocol"] == "udp") == 2

    assert both_answer(await scrape_until(exporter.url, both_answer, deadline=30))
    sick.netns.drop("udp", 53)
    began = time.monotonic()
    assert await wait_until(lambda: evicted(lab, sick), 45), exporter.messages()[-20:]
    took = time.monotonic() - began
    assert took <= 30, f"evicted {took:.1f}s after its UDP died"
    assert not evicted(lab, healthy)
    [line] = exporter.logged("evicted pod")
    assert line["pod"] == sick.name and line["trigger"] == "self"
    [event] = events(lab, sick)
    assert event["reason"] == "CoreDNSPodEvicted" and "trigger: self" in event["message"]
    body = await metrics(exporter)
    assert counter(body, "evict", "success", "self") == 1
    assert counter(body, "evict", "success", "webhook") == 0


async def test_self_remediation_restarts_nothing_when_every_pod_fails(
    lab: Lab, start: Start
) -> None:
    """Every pod's UDP dead is a shared cause (upstreams, the network): said once, and
    nothing is restarted however many rounds it lasts."""
    pods = [lab.add_pod(), lab.add_pod(), lab.add_pod()]
    lab.create_service()
    for pod in pods:
        pod.netns.drop("udp", 53)
    exporter = start("--self-remediate", webhook=False)
    assert exporter.logged("self-remediation: every CoreDNS pod fails over UDP, a shared "
                           "cause (upstreams, the network): nothing is restarted for it",
                           timeout=30)
    rounds_then = rounds(await metrics(exporter))
    body = await scrape_until(exporter.url, lambda b: rounds(b) >= rounds_then + 20,
                              deadline=60)
    assert rounds(body) >= rounds_then + 20
    assert not [p for p in pods if evicted(lab, p)]
    assert not [s for s in samples(body) if s.name == "dnsprobe_remediations_total"
                and s.labels["trigger"] == "self" and s.value > 0]


async def test_self_remediation_leaves_a_slow_pod_that_answers_alone(
    lab: Lab, start: Start
) -> None:
    """A pod that answers slowly, within the timeout, passes every probe: never suspect.
    (erratic answers every A query with 192.0.2.53, the other pod too, 1 ms late: the
    default query expects that address.)"""
    slow = lab.add_pod(coredns.Behaviour.SLOW, delay="150ms")
    other = lab.add_pod(coredns.Behaviour.SLOW, delay="1ms")
    lab.create_service()
    exporter = start("--self-remediate", "--timeout", "0.4", "--expect", coredns.ERRATIC_IP,
                     webhook=False)

    def slow_and_answering(body: str) -> bool:
        latency = [s.value for s in samples(body) if s.name == "dnsprobe_duration_seconds_sum"
                   and s.labels["pod"] == slow.name and s.labels["protocol"] == "udp"]
        counts = [s.value for s in samples(body) if s.name == "dnsprobe_duration_seconds_count"
                  and s.labels["pod"] == slow.name and s.labels["protocol"] == "udp"]
        return bool(counts) and counts[0] >= 20 and latency[0] / counts[0] > 0.1

    body = await scrape_until(exporter.url, slow_and_answering, deadline=60)
    assert slow_and_answering(body)  # twenty answers, each over 100 ms
    assert not evicted(lab, slow) and not evicted(lab, other)
    assert not [s for s in samples(body) if s.name == "dnsprobe_remediations_total"
                and s.labels["trigger"] == "self" and s.value > 0]


def rounds(body: str) -> float:
    return sum(s.value for s in samples(body) if s.name == "dnsprobe_rounds_total")


async def test_two_self_remediating_replicas_evict_one_pod_once(lab: Lab, start: Start) -> None:
    """Two replicas judge the same UDP-dead pod from their own probes: the Lease they
    share lets one evict it, once; the other's decision is a skip."""
    sick, healthy = sick_and_healthy(lab)
    replicas = [start("--self-remediate", webhook=False) for _ in range(2)]
    assert await wait_until(lambda: evicted(lab, sick), 30)

    def decided(exporter: Exporter) -> list[dict[str, Any]]:
        return [r for r in exporter.logs if r.get("pod") == sick.name
                and r.get("trigger") == "self" and "result" in r]

    def left(exporter: Exporter) -> bool:
        """The evicted pod, Terminating, has left this replica's targets."""
        return any(r.get("msg") == "targets updated" and sick.name in str(r.get("removed"))
                   for r in exporter.logs)

    def evictions() -> list[dict[str, Any]]:
        return [d for r in replicas for d in decided(r) if d["action"] == "evict"]

    # Each replica decides on the pod once it has failed twice in its own rounds, unless
    # the pod left its targets first (a Terminating pod is not probed). The one that
    # evicted logs its decision after the eviction, its Event and the Lease: both
    # replicas may see the pod leave before that line is written.
    assert await wait_until(
        lambda: bool(evictions()) and all(decided(r) or left(r) for r in replicas), 30), [
        decided(r) for r in replicas]
    acts = evictions()
    assert [d["result"] for d in acts] == ["success"], acts
    skips = {d["result"] for r in replicas for d in decided(r) if d["action"] == "skip"}
    assert skips <= {"cooldown", "terminating", "duplicate", "not_found"}, skips
    assert all(left(r) for r in replicas) or skips
    assert len(events(lab, sick)) == 1 and not evicted(lab, healthy)


# -- dual-stack -----------------------------------------------------------------------------


async def test_dual_stack_is_probed_on_every_address_and_confirmed_on_each(
    lab: Lab, start: Start
) -> None:
    """A dual-stack Service (both ClusterIPs) and pods with IPv4 and IPv6 podIPs, real
    addresses in the lab's namespaces: every address is a target, IPv6 as [v6]:port; a pod
    whose UDP fails over IPv6 alone is confirmed sick on that address and evicted."""
    sick, healthy = lab.add_pod(dual_stack=True), lab.add_pod(dual_stack=True)
    lab.create_service(dual_stack=True)
    assert len(lab.cluster_ips) == 2 and ":" in lab.cluster_ips[1]
    exporter = start()
    want = {(f"[{ip}]:53" if ":" in ip else f"{ip}:53", protocol)
            for ip in [*lab.cluster_ips, *sick.ips, *healthy.ips] for protocol in ("udp", "tcp")}

    def passing(body: str) -> set[tuple[str, str]]:
        return {(s.labels["address"], s.labels["protocol"]) for s in samples(body)
                if s.name == "dnsprobe_success" and s.value == 1}

    body = await scrape_until(exporter.url, lambda b: passing(b) >= want, deadline=30)
    assert passing(body) == want
    pods = {s.labels["address"]: s.labels["pod"] for s in samples(body)
            if s.name == "dnsprobe_success" and s.labels["kind"] == "pod"}
    assert pods[f"[{sick.ip6}]:53"] == pods[f"{sick.ip}:53"] == sick.name

    # UDP/53 dropped over IPv6 only: its IPv4 address still answers.
    sick.netns.exec(["ip6tables", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"])
    v6 = f"[{sick.ip6}]:53"
    await scrape_until(exporter.url, lambda b: (v6, "udp") not in passing(b), deadline=15)
    body = await metrics(exporter)
    assert (f"{sick.ip}:53", "udp") in passing(body) and (v6, "udp") not in passing(body)
    status, answer = await post(exporter, payload(alert(sick, lab.namespace, address=v6)))
    assert status == 200, answer
    assert results(answer) == [(sick.name, "evict", "success")], answer
    assert evicted(lab, sick) and not evicted(lab, healthy)
    [line] = exporter.logged("evicted pod")
    assert f"UDP probe now: timeout ({v6}: " in line["reason"], line
