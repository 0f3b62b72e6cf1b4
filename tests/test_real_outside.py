"""Outside the cluster network, on the real cluster: probe-pod mode (a real container of the
exporter's image, admitted under `restricted`) and port-forward mode (through the real
kubelet and containerd), each with the ServiceAccount and RBAC shipped in deploy/outside/,
and remediation confirmed by a probe pod."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.probing.probepod import LABELS
from tests.harness.cluster import CLUSTER_DNS, KUBERNETES_CLUSTER_IP
from tests.harness.exporter import Exporter
from tests.harness.netns import NetNS
from tests.harness.node import EXPORTER_IMAGE
from tests.harness.realcluster import RealCluster
from tests.harness.scrape import samples, scrape_until, wait_until
from tests.test_modes import FAST, chosen, mode_of, success
from tests.test_real_cluster import REPO, evictions, fresh_remediation, ready_coredns
from tests.test_remediation import TOKEN, alert, payload, post, results

NAMESPACE = "coredns-health-exporter"
OUTSIDE = REPO / "deploy" / "outside"
ACCOUNT = "coredns-health-exporter-outside"
API_OUTSIDE = "127.0.0.1:6443"


@pytest.fixture
def outside(real_cluster: RealCluster, netns: Callable[[str], NetNS]) -> NetNS:
    """A namespace outside the cluster network: the API server relayed in at
    127.0.0.1:6443, no route to a pod or Service IP."""
    ns = netns("outside")
    ns.reach_out(API_OUTSIDE, f"127.0.0.1:{real_cluster.cluster.api_port}")
    return ns


@pytest.fixture
def granted(real_cluster: RealCluster, tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`grant(*files)`: the namespace (labelled as deploy/base labels it), the RBAC files
    applied with kubectl, a kubeconfig with a token of their ServiceAccount for use
    outside; all deleted after."""
    applied: list[Path] = []

    def grant(*files: Path) -> Path:
        real = real_cluster
        real.kubectl("apply", "-f", str(REPO / "deploy" / "base" / "namespace.yaml"))
        real.cluster.await_default_account(NAMESPACE)
        for f in files:
            real.kubectl("apply", "-f", str(f))
            applied.append(f)
        token = real.kubectl("-n", NAMESPACE, "create", "token", ACCOUNT).strip()
        return real.cluster.write_kubeconfig(tmp_path / "outside.kubeconfig", token,
                                             server=f"https://{API_OUTSIDE}")

    yield grant
    for f in reversed(applied):
        real_cluster.kubectl("delete", "--ignore-not-found", "-f", str(f))
    real_cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found",
                         "--timeout=120s", timeout=130)


@pytest.fixture
def udp_dead(real_cluster: RealCluster) -> Iterator[str]:
    """A CoreDNS pod whose inbound UDP/53 is dropped in its own network namespace; the
    rule is removed after (if the pod is still there)."""
    name = sorted(ready_coredns(real_cluster))[0]
    rule = ["INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"]
    real_cluster.in_pod_network(name, ["iptables", "-A", *rule])
    yield name
    if name in ready_coredns(real_cluster):
        real_cluster.in_pod_network(name, ["iptables", "-D", *rule])


def serve_outside(outside: NetNS, kubeconfig: Path, *args: str) -> Exporter:
    return Exporter(["--kubeconfig", str(kubeconfig), "--mode", "auto", *FAST, *args],
                    netns=outside)


async def test_probe_pod_mode_runs_the_image_as_a_restricted_pod(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path],
        udp_dead: str) -> None:
    kubeconfig = granted(OUTSIDE / "probe-pod.yaml")
    exporter = serve_outside(outside, kubeconfig, "--probe-pod-namespace", NAMESPACE,
                             "--probe-pod-image", EXPORTER_IMAGE)
    try:
        decision = chosen(exporter)
        assert decision["mode"] == "probe-pod", decision
        assert "answered DNS from here" in decision["skipped"]["in-cluster"]
        assert "not allowed to list nodes" in decision["skipped"]["nodeport"]
        pods = ready_coredns(real_cluster)
        wanted = {("pod", name, p["spec"]["nodeName"], f"{p['status']['podIP']}:53", protocol):
                  0.0 if (name, protocol) == (udp_dead, "udp") else 1.0
                  for name, p in pods.items() for protocol in ("udp", "tcp")}
        # The Service over TCP (over UDP one query in three meets the UDP-dead pod).
        wanted[("service", "kube-dns", "", f"{CLUSTER_DNS}:53", "tcp")] = 1.0
        body = await scrape_until(
            exporter.url, lambda b: all(success(b).get(k) == v for k, v in wanted.items()),
            deadline=90)
        got = success(body)
        assert all(got.get(k) == v for k, v in wanted.items()), (got, exporter.raw[-10:])
        assert mode_of(body) == ["probe-pod"]
        runs = [s.value for s in samples(body) if s.name == "dnsprobe_probe_pod_runs_total"
                and s.labels["result"] == "success"]
        assert runs and runs[0] >= 1
        # It ran where Pod Security admission enforces `restricted`.
        ns = real_cluster.cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}")
        assert ns is not None
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    finally:
        exporter.stop()
    selector = ",".join(f"{k}%3D{v}" for k, v in LABELS.items())

    def no_probe_pods() -> bool:
        return not real_cluster.pods(NAMESPACE, selector)

    assert await wait_until(no_probe_pods, 60)


def test_check_json_through_a_probe_pod_labels_results_as_direct(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path]) -> None:
    kubeconfig = granted(OUTSIDE / "probe-pod.yaml")
    done = subprocess.run(
        outside.command([sys.executable, "-m", "exporter", "check", "--json",
                         "--kubeconfig", str(kubeconfig), "--mode", "probe-pod",
                         "--probe-pod-namespace", NAMESPACE,
                         "--probe-pod-image", EXPORTER_IMAGE, "--timeout", "0.5"]),
        capture_output=True, text=True, timeout=180, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)["results"]
    pods = ready_coredns(real_cluster)
    by = {(r["kind"], r["pod"], r["protocol"]): r for r in records}
    for name in pods:
        record = by[("pod", name, "udp")]
        assert record["success"] is True, record
        assert record["node"] == pods[name]["spec"]["nodeName"]
        assert record["answers"] == [KUBERNETES_CLUSTER_IP]
    assert {r["kind"] for r in records} == {"service", "pod"}


async def test_port_forward_mode_goes_through_the_kubelet_and_runtime(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path]) -> None:
    """containerd connects to localhost:53 inside the pod's network namespace: a TCP/53
    dropped there times out; one refused there is unreachable, with the runtime's message
    from the error channel (it closes the stream before the query is written); the others
    answer over TCP alone."""
    refused, dropped = sorted(ready_coredns(real_cluster))[-2:]
    rules = {dropped: ["INPUT", "-p", "tcp", "--dport", "53", "-j", "DROP"],
             refused: ["INPUT", "-p", "tcp", "--dport", "53", "-j", "REJECT",
                       "--reject-with", "tcp-reset"]}
    for pod, rule in rules.items():
        real_cluster.in_pod_network(pod, ["iptables", "-A", *rule])
    try:
        kubeconfig = granted(OUTSIDE / "port-forward.yaml")
        exporter = serve_outside(outside, kubeconfig)
        try:
            decision = chosen(exporter)
            assert decision["mode"] == "port-forward", decision
            assert "not allowed to create pods" in decision["skipped"]["probe-pod"]
            assert "UDP cannot be forwarded" in decision["means"]
            wanted = {("pod", pod, p["spec"]["nodeName"], f"{p['status']['podIP']}:53", "tcp"):
                      0.0 if pod in rules else 1.0
                      for pod, p in ready_coredns(real_cluster).items()}
            body = await scrape_until(exporter.url, lambda b: success(b) == wanted,
                                      deadline=60)
            assert success(body) == wanted, (success(body), exporter.raw[-10:])

            def results(pod: str) -> set[str]:
                return {s.labels["result"] for s in samples(body)
                        if s.name == "dnsprobe_probes_total" and s.labels["pod"] == pod
                        and s.value > 0}

            assert results(dropped) == {"timeout"}
            assert results(refused) == {"unreachable"}
            [changed] = [r for r in exporter.logs if r.get("msg") == "probe outcome changed"
                         and r.get("pod") == refused][:1]
            assert "failed to connect to localhost:53" in changed["reason"], changed
            assert not [line for line in exporter.raw if "Traceback" in line]
            # The answering pods' round trips, through the tunnel, are measured.
            latency = {s.labels["pod"]: s.value for s in samples(body)
                       if s.name == "dnsprobe_duration_seconds_count"}
            assert all(latency.get(str(key[1]), 0) >= 1 for key in wanted
                       if key[1] not in rules)
        finally:
            exporter.stop()
    finally:
        for pod, rule in rules.items():
            real_cluster.in_pod_network(pod, ["iptables", "-D", *rule])


def test_port_forward_needs_create_as_well_as_get(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path],
        tmp_path: Path) -> None:
    """Kubernetes 1.35 and later authorize a WebSocket port-forward as `create` too: with
    `get` alone the API server refuses it, and the exporter says which grant is missing."""
    shipped = (OUTSIDE / "port-forward.yaml").read_text()
    assert "verbs: [get, create]" in shipped
    get_only = tmp_path / "port-forward-get-only.yaml"
    get_only.write_text(shipped.replace("verbs: [get, create]", "verbs: [get]"))
    kubeconfig = granted(get_only)
    done = subprocess.run(
        outside.command([sys.executable, "-m", "exporter", "check", "--json",
                         "--kubeconfig", str(kubeconfig), "--mode", "port-forward",
                         "--timeout", "2"]),
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode == 1, done.stderr
    records: list[dict[str, Any]] = json.loads(done.stdout)["results"]
    assert records and all(not r["success"] for r in records)
    assert all("grant 'get' and 'create' on pods/portforward" in r["reason"]
               for r in records), records


async def test_in_probe_pod_mode_a_probe_pod_confirms_before_a_restart(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path],
        udp_dead: str, tmp_path: Path) -> None:
    """From outside, with the remediation add-on granted: the alert's pod is probed over
    UDP from a probe pod in the cluster. The healthy pod answers it (skipped), the
    UDP-dead one does not (evicted, and its ReplicaSet replaces it). The exporter reaches
    no pod IP itself, so a direct probe would have failed both."""
    real = real_cluster
    seen = fresh_remediation(real)
    token_file = tmp_path / "webhook-token"
    token_file.write_text(TOKEN)
    kubeconfig = granted(OUTSIDE / "probe-pod.yaml", OUTSIDE / "probe-pod-remediation.yaml")
    exporter = serve_outside(outside, kubeconfig, "--mode", "probe-pod",
                             "--remediation", "evict", "--probe-pod-namespace", NAMESPACE,
                             "--probe-pod-image", EXPORTER_IMAGE,
                             "--webhook-token-file", str(token_file))
    try:
        healthy = sorted(set(ready_coredns(real)) - {udp_dead})[0]
        status, answer = await post(exporter, payload(alert(healthy, "kube-system")))
        assert status == 200, answer
        assert results(answer) == [(healthy, "skip", "healthy")], answer
        status, answer = await post(exporter, payload(alert(udp_dead, "kube-system")))
        assert status == 200, answer
        # The decision's message says why when it is not an eviction (the probe pod's error).
        # The message first and alone: pytest cuts a long assertion message short.
        assert results(answer) == [(udp_dead, "evict", "success")], (
            [d.get("message") for d in answer["decisions"]], exporter.raw[-20:])
    finally:
        exporter.stop()
    assert await wait_until(lambda: bool(evictions(real, seen)), 15)
    assert [e["involvedObject"]["name"] for e in evictions(real, seen)] == [udp_dead]

    def replaced() -> bool:
        ready = ready_coredns(real)
        return len(ready) == 3 and udp_dead not in ready and healthy in ready

    assert await wait_until(replaced, 90)


async def test_a_probe_pod_image_that_cannot_be_pulled_fails_the_round_at_once(
        real_cluster: RealCluster, outside: NetNS, granted: Callable[..., Path]) -> None:
    """The node cannot pull the image (no registry): the round stops as soon as the
    container waits with ErrImagePull, not at the pod's deadline, and says which image and
    which flag; `check --json` prints the error as JSON; `serve` counts a failed round."""
    kubeconfig = granted(OUTSIDE / "probe-pod.yaml")
    image = "localhost/coredns-health-exporter-test/no-such-image:1"
    # The pod's deadline is 120 s: a bound of 90 s fails a round that waited for it.
    done = await asyncio.to_thread(
        subprocess.run,
        outside.command([sys.executable, "-m", "exporter", "check", "--json",
                         "--kubeconfig", str(kubeconfig), "--mode", "probe-pod",
                         "--probe-pod-namespace", NAMESPACE, "--probe-pod-image", image]),
        capture_output=True, text=True, timeout=90, check=False, cwd=REPO)
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert image in error and "--probe-pod-image" in error, error
    assert "ErrImagePull" in error or "ImagePullBackOff" in error, error
    assert "Traceback" not in done.stderr

    exporter = serve_outside(outside, kubeconfig, "--probe-pod-namespace", NAMESPACE,
                             "--probe-pod-image", image)
    try:
        def failed(body: str) -> bool:
            return any(s.name == "dnsprobe_probe_pod_runs_total" and s.value >= 1
                       and s.labels["result"] == "failed" for s in samples(body))

        assert failed(await scrape_until(exporter.url, failed, deadline=90))
        [warning] = exporter.logged("probe pod round failed; the checks have no results "
                                    "until a round succeeds", timeout=10)[:1]
        assert image in warning["error"], warning
    finally:
        exporter.stop()
