"""The user's path on a real cluster: Kubernetes v1.37.2 with a real node, CoreDNS as
kube-dns, and the exporter installed with `kubectl apply -k deploy/` from its image."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from alerts.generate import rules
from tests.harness.cluster import CLUSTER_DNS, KUBERNETES_CLUSTER_IP, NODE_NAMES
from tests.harness.components import missing
from tests.harness.exporter import Exporter
from tests.harness.monitoring import Monitoring
from tests.harness.monitoring import binaries_missing as monitoring_missing
from tests.harness.node import COREDNS_IMAGE
from tests.harness.realcluster import RealCluster, deploy_deployment
from tests.harness.scrape import samples, scrape_until, wait_until
from tests.test_e2e import FAST_RULES

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "coredns-health-exporter"
SELECTOR = "app.kubernetes.io%2Fname%3Dcoredns-health-exporter"


def check_inside(real: RealCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`coredns-health-exporter check --json` run on the node (the cluster namespace)."""
    netns = real.cluster.netns
    assert netns is not None
    return subprocess.run(
        netns.enter([sys.executable, "-m", "exporter", "check", "--json",
                     "--kubeconfig", str(real.cluster.admin_kubeconfig_inside()), *args]),
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO)


def test_coredns_answers_from_the_real_api(real_cluster: RealCluster) -> None:
    pods = list(ready_coredns(real_cluster).values())
    assert len(pods) == 3
    # Spread over both nodes (CoreDNS's anti-affinity, as kubeadm ships it).
    assert {p["spec"]["nodeName"] for p in pods} == set(NODE_NAMES)
    node_of = {f"{p['status']['podIP']}:53": p["spec"]["nodeName"] for p in pods}
    done = check_inside(real_cluster, "--mode", "in-cluster")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(done.stdout)["results"]
    by_kind: dict[str, set[str]] = {}
    for r in results:
        assert r["outcome"] == "success", r
        by_kind.setdefault(r["kind"], set()).add(r["address"])
        if r["kind"] == "pod":
            assert r["node"] == node_of[r["address"]], r
    assert by_kind["service"] == {f"{CLUSTER_DNS}:53"}
    assert by_kind["pod"] == {f"{p['status']['podIP']}:53" for p in pods}
    # the default query's expected answer is the real `kubernetes` Service's ClusterIP
    assert all(KUBERNETES_CLUSTER_IP in " ".join(r["answers"]) for r in results), results


@contextlib.contextmanager
def applied(real: RealCluster, kustomization: Path) -> Iterator[list[dict[str, Any]]]:
    """`kubectl apply -k` as a user runs it (the node has the image under the name
    deploy/ gives it); yields the exporter's pods once the rollout is complete; deletes
    everything after."""
    try:
        real.kubectl("apply", "-k", str(kustomization))
        try:
            real.kubectl("-n", NAMESPACE, "rollout", "status",
                         "deployment/coredns-health-exporter", "--timeout=180s", timeout=190)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{why_not_ready(real)}") from exc
        yield real.pods(NAMESPACE, SELECTOR)
    finally:
        real.kubectl("delete", "-k", str(kustomization), "--ignore-not-found", "--wait=true",
                     "--timeout=120s", timeout=130)


def why_not_ready(real: RealCluster) -> str:
    """The exporter's pods, their status and the end of their logs, for a failed rollout."""
    lines = [real.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide")]
    for pod in real.pods(NAMESPACE, SELECTOR):
        name = pod["metadata"]["name"]
        lines.append(f"{name}: {json.dumps(pod['status'].get('containerStatuses'))}")
        for previous in ([], ["--previous"]):
            with contextlib.suppress(RuntimeError):
                lines.append(real.kubectl("-n", NAMESPACE, "logs", name, "--tail=10",
                                          *previous))
    return "\n".join(lines)


@pytest.fixture
def installed(real_cluster: RealCluster) -> Iterator[list[dict[str, Any]]]:
    """deploy/ applied unchanged."""
    with applied(real_cluster, REPO / "deploy") as pods:
        yield pods


async def test_kubectl_apply_k_deploy_runs_the_image_and_probes_every_pod(
        real_cluster: RealCluster, installed: list[dict[str, Any]]) -> None:
    pods = installed
    assert len(pods) == 2
    # Spread over the nodes, as the Deployment's anti-affinity asks.
    assert {p["spec"]["nodeName"] for p in pods} == set(NODE_NAMES)
    for pod in pods:
        spec = pod["spec"]
        assert spec["serviceAccountName"] == "coredns-health-exporter"
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True", pod["status"]
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["restartCount"] == 0, status
    # Admitted under the namespace's `restricted` Pod Security level.
    ns = real_cluster.cluster.api("GET", f"/api/v1/namespaces/{NAMESPACE}")
    assert ns is not None
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # --mode auto decided in-cluster, from the pod's own ServiceAccount.
    logs = real_cluster.kubectl("-n", NAMESPACE, "logs", pods[0]["metadata"]["name"])
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    chosen = [line for line in lines if line.get("msg") == "mode chosen"]
    assert chosen and chosen[0]["mode"] == "in-cluster", logs[-3000:]
    assert not [line for line in lines if line.get("level") in ("ERROR", "CRITICAL")], logs

    await probes_every_coredns_pod(real_cluster, pods[0])


async def probes_every_coredns_pod(real: RealCluster, exporter: dict[str, Any]) -> None:
    """The exporter pod `exporter` exports a passing result for every CoreDNS pod and the
    Service, over both protocols, labelled with the pod, its node and namespace."""
    coredns = {p["status"]["podIP"]: p for p in real.coredns_pods()}

    def probed_all(body: str) -> bool:
        """A result for each pod and the Service over both protocols (a round's results
        are exported as they come in)."""
        kinds = [s.labels["kind"] for s in samples(body) if s.name == "dnsprobe_success"]
        return (kinds.count("pod"), kinds.count("service")) == (2 * len(coredns), 2)

    with real.cluster.exposed(f"{exporter['status']['podIP']}:9953") as address:
        body = await scrape_until(f"http://{address}", probed_all, deadline=60)
    success = [s for s in samples(body) if s.name == "dnsprobe_success"]
    pod_series = {(s.labels["address"], s.labels["protocol"]): s for s in success
                  if s.labels["kind"] == "pod"}
    for ip, pod in coredns.items():
        for protocol in ("udp", "tcp"):
            series = pod_series[(f"{ip}:53", protocol)]
            assert series.value == 1, series
            assert series.labels["pod"] == pod["metadata"]["name"]
            assert series.labels["node"] == pod["spec"]["nodeName"]
            assert series.labels["namespace"] == "kube-system"
    service = {s.labels["protocol"]: s.value for s in success
               if s.labels["kind"] == "service" and s.labels["address"] == f"{CLUSTER_DNS}:53"}
    assert service == {"udp": 1, "tcp": 1}


async def test_helm_install_runs_the_image_and_probes_every_pod(
        real_cluster: RealCluster) -> None:
    """The README's Helm steps: the namespace made and labelled `restricted`, then
    `helm install` of deploy/helm/coredns-health-exporter with the webhook token as a value
    (its defaults otherwise: the objects of deploy/base); the pods are admitted, Ready,
    probe every CoreDNS pod, and the webhook takes the token from the chart's Secret.
    `helm uninstall` removes everything it made."""
    from tests.test_helm import CHART, helm

    real = real_cluster
    token = os.urandom(16).hex()
    kubeconfig = ["--kubeconfig", str(real.cluster.admin_kubeconfig), "--namespace", NAMESPACE]
    real.kubectl("create", "namespace", NAMESPACE)
    try:
        real.kubectl("label", "namespace", NAMESPACE,
                     "pod-security.kubernetes.io/enforce=restricted")
        done = helm("install", "coredns-health-exporter", str(CHART), *kubeconfig,
                    "--set", f"webhook.token={token}", "--wait", "--timeout", "180s")
        assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{why_not_ready(real)}"
        assert "The webhook answers 503" not in done.stdout  # NOTES: the token is set
        pods = real.pods(NAMESPACE, SELECTOR)
        assert len(pods) == 2
        for pod in pods:
            assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == \
                "coredns-health-exporter"
            status = pod["status"]["containerStatuses"][0]
            assert status["ready"] and status["restartCount"] == 0, status
        await probes_every_coredns_pod(real, pods[0])
        # The token of the values is the one the webhook asks for.
        status, text = await post_alert(real, pods[0], "not-the-token", "coredns-x")
        assert status == 401, text
        status, answer = await post_alert(real, pods[0], token, "not-a-coredns-pod")
        assert status == 200, answer
        assert [d["action"] for d in answer["decisions"]] == ["skip"], answer
    finally:
        done = helm("uninstall", "coredns-health-exporter", *kubeconfig, "--wait",
                    "--timeout", "120s")
        real.kubectl("delete", "namespace", NAMESPACE, "--wait=true", "--timeout=120s",
                     timeout=130)
    assert done.returncode == 0, done.stderr
    # Nothing of the release is left where it reached beyond its namespace.
    for namespace in ("kube-system", "default"):
        left = real.kubectl("-n", namespace, "get", "roles,rolebindings", "-o", "name")
        assert "coredns-health-exporter" not in left, left


async def test_daemonset_overlay_probes_from_the_node(real_cluster: RealCluster,
                                                      tmp_path: Path) -> None:
    """`kubectl apply -k` of a user's overlay over deploy/overlays/daemonset that turns on
    --node-local-dns: one exporter on each node beside the Deployment, admitted under
    `restricted`, each probing every CoreDNS pod from its node and the NodeLocal DNSCache
    of its node (a real CoreDNS on 169.254.20.10 in each node's namespace); the node a
    probe was sent from is its pod's (Prometheus adds `source_node`)."""
    real = real_cluster
    coredns = ready_coredns(real)
    upstreams = sorted(p["status"]["podIP"] for p in coredns.values())
    user = daemonset_overlay(tmp_path / "overlay", [f"--node-local-dns={NODE_LOCAL_DNS}"])
    with contextlib.ExitStack() as caches:
        for node in real.nodes:
            caches.enter_context(node.node_local_dns(real.coredns_bin, NODE_LOCAL_DNS,
                                                     upstreams))
        with applied(real, user):
            real.kubectl("-n", NAMESPACE, "rollout", "status",
                         "daemonset/coredns-health-exporter-node", "--timeout=120s",
                         timeout=130)
            pods = real.pods(NAMESPACE, PER_NODE)
            assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(NODE_NAMES)

            def probed_all(body: str) -> bool:
                ok = [s for s in samples(body) if s.name == "dnsprobe_success"
                      and s.labels["kind"] in ("pod", "nodelocal") and s.value == 1]
                return ({s.labels["pod"] for s in ok if s.labels["kind"] == "pod"}
                        == set(coredns) and len(ok) == 6 + 2)

            with contextlib.ExitStack() as stack:
                url = {p["spec"]["nodeName"]: "http://" + stack.enter_context(
                    real.cluster.exposed(f"{p['status']['podIP']}:9953")) for p in pods}
                await _from_each_node(real, tmp_path, pods, url, coredns, probed_all)


NODE_LOCAL_DNS = "169.254.20.10"
PER_NODE = "app.kubernetes.io%2Fname%3Dcoredns-health-exporter-node"


def daemonset_overlay(directory: Path, args: list[str]) -> Path:
    """A user's kustomization over deploy/overlays/daemonset adding flags to the
    DaemonSet's exporter."""
    directory.mkdir(parents=True, exist_ok=True)
    ops = [{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": a}
           for a in args]
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy" / "overlays" / "daemonset", directory)],
        "patches": [{"target": {"kind": "DaemonSet", "name": "coredns-health-exporter-node"},
                     "patch": json.dumps(ops)}],
    }))
    return directory


async def _from_each_node(real: RealCluster, work: Path, pods: list[dict[str, Any]],
                          url: dict[str, str], coredns: dict[str, dict[str, Any]],
                          probed_all: Callable[[str], bool]) -> None:
    for node in NODE_NAMES:
        body = await scrape_until(url[node], probed_all, deadline=60)
        assert probed_all(body), [s for s in samples(body) if s.name == "dnsprobe_success"]
        # Its own node's cache, labelled with its node; nothing else of the target's.
        local = [s.labels for s in samples(body) if s.name == "dnsprobe_success"
                 and s.labels["kind"] == "nodelocal"]
        assert {(s["node"], s["address"], s["namespace"], s["service"], s["pod"])
                for s in local} == {(node, f"{NODE_LOCAL_DNS}:53", "", "", "")}, local
        # It only probes: remediation stays with the Deployment.
        assert not [s for s in samples(body) if s.name == "dnsprobe_remediations_total"
                    and s.value > 0]

    # DNS that fails from one node only: the other node loses UDP to one CoreDNS pod; and
    # the other node's NodeLocal DNSCache stops answering UDP.
    far = sorted(coredns)[0]
    here = coredns[far]["spec"]["nodeName"]
    [observer] = [n for n in NODE_NAMES if n != here]
    breaks = [["FORWARD", "-d", coredns[far]["status"]["podIP"], "-p", "udp", "--dport", "53",
              "-j", "DROP"],
             ["INPUT", "-d", NODE_LOCAL_DNS, "-p", "udp", "--dport", "53", "-j", "DROP"]]
    netns = real.node_named(observer).netns
    cluster_netns = real.cluster.netns
    assert cluster_netns is not None
    # Prometheus scrapes the replicas as the shipped scrape config does (source_node from
    # the pod's node), with the shipped rules on short windows.
    monitoring = Monitoring(
        cluster_netns, work / "monitoring", f"{pods[0]['status']['podIP']}:9953",
        work / "no-token", rules(dataclasses.replace(FAST_RULES, for_node="5s")),
        scrape_configs=[{
            "job_name": "coredns-health-exporter-node", "honor_labels": True,
            "static_configs": [{"targets": [f"{p['status']['podIP']}:9953"],
                                "labels": {"source_node": p["spec"]["nodeName"]}}
                               for p in pods]}])
    for rule in breaks:
        netns.exec(["iptables", "-I", *rule])
    try:
        def udp_of(body: str, **labels: str) -> float | None:
            return next((s.value for s in samples(body) if s.name == "dnsprobe_success"
                         and s.labels["protocol"] == "udp"
                         and all(s.labels[k] == v for k, v in labels.items())), None)

        body = await scrape_until(url[observer], lambda b: udp_of(b, pod=far) == 0 and udp_of(
            b, kind="nodelocal") == 0, deadline=30)
        assert udp_of(body, pod=far) == 0 and udp_of(body, kind="nodelocal") == 0
        other = await scrape_until(url[here], lambda b: True)
        assert udp_of(other, pod=far) == 1 and udp_of(other, kind="nodelocal") == 1

        # The observer's log says which pod failed from which node.
        [replica] = [p["metadata"]["name"] for p in pods if p["spec"]["nodeName"] == observer]

        def said() -> list[dict[str, Any]]:
            logs = real.kubectl("-n", NAMESPACE, "logs", replica)
            return [r for r in (json.loads(line) for line in logs.splitlines()
                                if line.startswith("{"))
                    if r.get("msg") == "probe outcome changed" and r.get("outcome") == "timeout"
                    and r.get("protocol") == "udp"]

        assert await wait_until(lambda: {(r["kind"], r["pod"], r["node"], r["source_node"])
                                         for r in said()} >= {
            ("pod", far, here, observer), ("nodelocal", "", observer, observer)}, 30), said()

        # The per-node alerts have what they need: from the observer, the far pod fails
        # while from its own node it answers; the observer's cache fails.
        def fired() -> set[tuple[str, str, str]]:
            return {(r["metric"]["alertname"], r["metric"].get("source_node", ""),
                     r["metric"]["address"]) for r in monitoring.query(
                'ALERTS{alertstate="firing", alertname=~"CoreDNSFailingFromNode|'
                'CoreDNSNodeLocalCacheFailing"}')}

        expected = {("CoreDNSFailingFromNode", observer, f"{coredns[far]['status']['podIP']}:53"),
                    ("CoreDNSNodeLocalCacheFailing", observer, f"{NODE_LOCAL_DNS}:53")}
        assert await wait_until(lambda: fired() == expected, 60), (
            fired(), monitoring.query("source_node_target_protocol:dnsprobe_failure_ratio:rate"))
    finally:
        for rule in breaks:
            netns.exec(["iptables", "-D", *rule])
        monitoring.stop()


async def test_a_pod_deleted_while_probed_leaves_no_late_log_lines(
        real_cluster: RealCluster) -> None:
    """A CoreDNS pod stops answering and is deleted while probes to it are in flight: its
    late results change nothing, and say nothing, once it has left the targets."""
    real = real_cluster
    netns = real.cluster.netns
    assert netns is not None
    # Rounds 2 s apart, each probe sent in the round's first 0.1 s and waiting up to 1.9 s.
    exporter = Exporter(["--kubeconfig", str(real.cluster.admin_kubeconfig_inside()),
                         "--mode", "in-cluster", "--interval", "2", "--timeout", "1.9",
                         "--protocol", "udp"], netns=netns)
    try:
        victim = sorted(ready_coredns(real))[0]

        def probed(body: str) -> bool:
            return any(s.name == "dnsprobe_success" and s.labels["pod"] == victim
                       and s.value == 1 for s in samples(body))

        assert probed(await scrape_until(exporter.url, probed, deadline=30))
        real.in_pod_network(victim, ["iptables", "-A", "INPUT", "-p", "udp", "--dport", "53",
                                     "-j", "DROP"])
        # A probe timed out, 1.9 s after it was sent; the next is sent an interval after
        # it, so 0.1 s from now, and stays in flight until 2.0 s from now. Deleting the
        # pod 0.5 s from now lands inside that window: there is no event to wait for, only
        # the schedule.
        changed = exporter.logs_until(lambda logs: any(
            r.get("msg") == "probe outcome changed" and r.get("pod") == victim
            and r.get("outcome") == "timeout" for r in logs), timeout=30)
        assert any(r.get("pod") == victim for r in changed), exporter.raw[-5:]
        await asyncio.sleep(0.5)
        real.cluster.api("DELETE", f"/api/v1/namespaces/kube-system/pods/{victim}",
                         {"gracePeriodSeconds": 0})
        removed = exporter.logs_until(lambda logs: any(
            r.get("msg") == "targets updated" and victim in str(r.get("removed"))
            for r in logs), timeout=30)
        after = next(i for i, r in enumerate(removed) if r.get("msg") == "targets updated"
                     and victim in str(r.get("removed")))

        # Every probe in flight at the removal ends within its timeout: two rounds after
        # it, any late line would have been written.
        def rounds(body: str) -> float:
            return next(s.value for s in samples(body) if s.name == "dnsprobe_rounds_total")

        first = rounds(await scrape_until(exporter.url, lambda b: True))
        await scrape_until(exporter.url, lambda b: rounds(b) >= first + 2, deadline=30)
        late = [r for r in exporter.logs[after:] if r.get("msg") == "probe outcome changed"
                and r.get("pod") == victim]
        assert not late, late
    finally:
        exporter.stop()


ALT_COREFILE = (".:1053 {\n"
                "    template IN A kubernetes.default.svc.cluster.local {\n"
                f'        answer "{{{{ .Name }}}} 5 IN A {KUBERNETES_CLUSTER_IP}"\n'
                "    }\n"
                "}\n")


def alt_dns(namespace: str) -> str:
    """A second cluster DNS in `namespace`, as some clusters run CoreDNS: listening on
    1053 (a non-root image), the Service's targetPort naming the container port; one pod
    on the pod network and one hostNetwork pod (its IP is its node's), on worker-2."""
    def deployment(name: str, host: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "containers": [{
                "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never",
                "args": ["-conf", "/etc/coredns/Corefile"],
                "ports": [{"name": "dns", "containerPort": 1053, "protocol": "UDP"},
                          {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}],
                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}]}],
            "volumes": [{"name": "config", "configMap": {"name": "alt-dns"}}],
            "nodeSelector": {"kubernetes.io/hostname": NODE_NAMES[1]}}
        if host:
            spec |= {"hostNetwork": True, "dnsPolicy": "Default"}
        labels = {"app": "alt-dns", "variant": name}
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": spec}}}

    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "alt-dns", "namespace": namespace},
         "data": {"Corefile": ALT_COREFILE}},
        deployment("alt-dns-pod", host=False), deployment("alt-dns-host", host=True),
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "alt-dns", "namespace": namespace},
         "spec": {"selector": {"app": "alt-dns"}, "ports": [
             {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
             {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": "dns-tcp"}]}},
    ]
    return yaml.safe_dump_all(objects)


def test_named_target_ports_and_host_network_pods(real_cluster: RealCluster) -> None:
    """Pods are probed on the port their Service's targetPort names in each pod's spec
    (1053 here, behind Service port 53), a hostNetwork pod at its node's IP; the Service
    IP on its own port."""
    real, namespace = real_cluster, "alt-dns"
    real.kubectl("apply", "-f", "-", stdin=alt_dns(namespace))
    try:
        for name in ("alt-dns-pod", "alt-dns-host"):
            real.kubectl("-n", namespace, "rollout", "status", f"deployment/{name}",
                         "--timeout=120s", timeout=130)
        pods = {p["metadata"]["labels"]["variant"]: p
                for p in real.pods(namespace, "app%3Dalt-dns")}
        host = pods["alt-dns-host"]
        assert host["status"]["podIP"] == host["status"]["hostIP"]
        done = check_inside(real, "--mode", "in-cluster", "--namespace", namespace,
                            "--service", "alt-dns")
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads(done.stdout)["results"]
        assert all(r["outcome"] == "success" for r in results), results
        got = {(r["kind"], r["pod"], r["node"], r["address"]) for r in results}
        service = real.cluster.api("GET", f"/api/v1/namespaces/{namespace}/services/alt-dns")
        assert service is not None
        assert got == {
            ("service", "", "", f"{service['spec']['clusterIP']}:53"),
            *{("pod", p["metadata"]["name"], NODE_NAMES[1], f"{p['status']['podIP']}:1053")
              for p in pods.values()}}
    finally:
        real.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s",
                     timeout=130)


def overlay(directory: Path, args: dict[str, str | None]) -> Path:
    """A user's kustomization over deploy/ that sets some of the exporter's flags
    (`--NAME=VALUE`, or `--NAME` for a value of None; replacing the shipped value of that
    flag, or added in the order given)."""
    directory.mkdir(parents=True, exist_ok=True)
    deployment = deploy_deployment()
    shipped: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    ops = []
    for name, value in args.items():
        index = next((i for i, a in enumerate(shipped) if a.startswith(f"--{name}=")), "-")
        ops.append({"op": "replace" if index != "-" else "add",
                    "path": f"/spec/template/spec/containers/0/args/{index}",
                    "value": f"--{name}" if value is None else f"--{name}={value}"})
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy", directory)],
        "patches": [{"target": {"kind": "Deployment", "name": "coredns-health-exporter"},
                     "patch": json.dumps(ops)}],
    }))
    return directory


def evictions(real: RealCluster, since: set[str] | None = None) -> list[dict[str, Any]]:
    """The CoreDNSPodEvicted Events in kube-system (Events outlive their tests: those
    whose UIDs are in `since` are left out)."""
    answer = real.cluster.api(
        "GET", "/api/v1/namespaces/kube-system/events?fieldSelector=reason%3DCoreDNSPodEvicted")
    assert answer is not None
    items: list[dict[str, Any]] = answer["items"]
    return [e for e in items if e["metadata"]["uid"] not in (since or set())]


def fresh_remediation(real: RealCluster) -> set[str]:
    """Forget earlier tests' remediations: the cooldown Lease goes (it is the cluster's
    memory of the last act); returns the eviction Events that exist already."""
    real.kubectl("-n", "kube-system", "delete", "lease", "--ignore-not-found",
                 "coredns-health-exporter-remediation")
    return {e["metadata"]["uid"] for e in evictions(real)}


@dataclass
class Monitored:
    """The exporter installed by a user's overlay (remediation on), scraped by a real
    Prometheus with the shipped rules, routed by a real Alertmanager to its webhook."""

    real: RealCluster
    pods: list[dict[str, Any]]
    monitoring: Monitoring
    token: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.monitoring.query(expr)


@pytest.fixture(scope="module")
def monitored(real_cluster: RealCluster, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Monitored]:
    reason = monitoring_missing()
    if reason:
        missing("Prometheus and Alertmanager", reason)
    real, work = real_cluster, tmp_path_factory.mktemp("monitored")
    token = os.urandom(16).hex()
    (work / "token").write_text(token)
    # The README's steps: the token Secret, then the install with remediation turned on.
    real.kubectl("create", "namespace", NAMESPACE)
    real.kubectl("-n", NAMESPACE, "create", "secret", "generic",
                 "coredns-health-exporter-webhook", f"--from-literal=token={token}")
    user = overlay(work / "overlay", {"remediation": "evict", "interval": "1",
                                      "timeout": "0.5"})
    netns = real.cluster.netns
    assert netns is not None
    with applied(real, user) as pods:
        service = real.cluster.api(
            "GET", f"/api/v1/namespaces/{NAMESPACE}/services/coredns-health-exporter")
        assert service is not None
        monitoring = Monitoring(
            netns, work / "monitoring", "", work / "token", rules(FAST_RULES),
            scrape_configs=[{
                "job_name": "coredns-health-exporter", "honor_labels": True,
                "static_configs": [{"targets": [f"{p['status']['podIP']}:9953"
                                                for p in pods]}]}],
            webhook=f"{service['spec']['clusterIP']}:9953")
        try:
            yield Monitored(real, pods, monitoring, token)
        finally:
            monitoring.stop()


def ready_coredns(real: RealCluster) -> dict[str, dict[str, Any]]:
    """The CoreDNS pods that are Ready and not being deleted, by name."""
    return {p["metadata"]["name"]: p for p in real.coredns_pods()
            if not p["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", []))}


async def every_pod_answering(m: Monitored) -> set[str]:
    """Wait until Prometheus sees every Ready CoreDNS pod answer UDP and TCP, to each of
    the two exporters, and no other pod; the pods' names."""
    def settled() -> bool:
        names = set(ready_coredns(m.real))
        seen = m.query('dnsprobe_success{job="coredns-health-exporter", kind="pod"} == 1')
        every = m.query('dnsprobe_success{job="coredns-health-exporter", kind="pod"}')
        # And no alert pending or firing: a Prometheus just started holds the exporter's
        # absent-alert pending until its first scrape.
        return (len(names) == 3 and len(seen) == len(every) == 4 * len(names)
                and {r["metric"]["pod"] for r in every} == names and not m.query("ALERTS"))

    assert await wait_until(settled, 90), m.query("dnsprobe_success")
    return set(ready_coredns(m.real))


async def test_rollout_restart_evicts_nothing_and_series_follow_the_pods(
        monitored: Monitored) -> None:
    """`kubectl rollout restart` of CoreDNS: no alert, no eviction; the series follow the
    new pods. A pod being deleted is Terminating with its grace period, and an alert for
    it is skipped as such."""
    m, real = monitored, monitored.real
    seen = fresh_remediation(real)
    before = await every_pod_answering(m)
    began = time.monotonic()
    real.kubectl("-n", "kube-system", "rollout", "restart", "deployment/coredns")
    real.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns",
                 "--timeout=180s", timeout=190)
    after = await every_pod_answering(m)
    assert not after & before
    # Over the whole rollout, not just now: no CoreDNS alert pending or firing (the window
    # starts at the rollout, when there was none).
    window = f"{int(time.monotonic() - began)}s"
    assert not m.query(f'max_over_time(ALERTS{{alertname=~"CoreDNS.*"}}[{window}])'), \
        m.query("ALERTS")
    assert not m.query('dnsprobe_remediations_total{action="evict"} > 0')
    assert not evictions(real, seen)

    # A pod held Terminating (a finalizer keeps its object after its containers stop).
    held = sorted(after)[0]
    path = f"/api/v1/namespaces/kube-system/pods/{held}"
    real.kubectl("-n", "kube-system", "patch", "pod", held, "--type=merge",
                 "-p", '{"metadata":{"finalizers":["coredns-health-exporter.test/hold"]}}')
    try:
        real.kubectl("-n", "kube-system", "delete", "pod", held, "--wait=false")
        pod = real.cluster.api("GET", path)
        assert pod is not None and pod["metadata"]["deletionTimestamp"]
        assert pod["metadata"]["deletionGracePeriodSeconds"] == 30
        shown = real.kubectl("-n", "kube-system", "get", "pod", held)
        assert "Terminating" in shown, shown
        # Leaving: no longer probed, its series gone from both exporters (a pod that is
        # shutting down fails by design), while the other pods stay probed.
        assert await wait_until(lambda: not m.query(f'dnsprobe_success{{pod="{held}"}}'),
                                30), m.query(f'dnsprobe_success{{pod="{held}"}}')
        assert len(m.query('dnsprobe_success{kind="pod"} == 1')) >= 4 * (len(after) - 1)
        status, answer = await post_alert(real, m.pods[0], m.token, held)
        assert status == 200, answer
        assert [(d["pod"], d["action"], d["result"]) for d in answer["decisions"]] == [
            (held, "skip", "terminating")], answer
    finally:
        real.kubectl("-n", "kube-system", "patch", "pod", held, "--type=json",
                     "-p", '[{"op":"remove","path":"/metadata/finalizers"}]')
    assert not evictions(real, seen)


async def post_alert(real: RealCluster, exporter: dict[str, Any], token: str, pod: str
                     ) -> tuple[int, Any]:
    """Post Alertmanager's payload for CoreDNSPodUDPFailing on `pod` to the exporter pod
    `exporter`, with the webhook's bearer `token`."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    body = {"version": "4", "groupKey": "{}:{pod}", "status": "firing",
            "receiver": "coredns-health-exporter", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "http://alertmanager",
            "truncatedAlerts": 0, "alerts": [{
                "status": "firing", "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": os.urandom(8).hex(), "generatorURL": "",
                "annotations": {}, "labels": {"alertname": "CoreDNSPodUDPFailing",
                                              "namespace": "kube-system", "pod": pod}}]}
    with real.cluster.exposed(f"{exporter['status']['podIP']}:9953") as address:
        async with aiohttp.ClientSession() as session, session.post(
                f"http://{address}/webhook/alertmanager", json=body,
                headers={"Authorization": f"Bearer {token}"}) as response:
            if response.content_type != "application/json":
                return response.status, await response.text()
            return response.status, await response.json()


async def test_udp_dead_pod_is_alerted_evicted_and_replaced(monitored: Monitored) -> None:
    """UDP/53 broken inside one CoreDNS pod's own network namespace: its UDP series fail
    while TCP passes; the shipped alert fires in a real Prometheus, Alertmanager calls the
    webhook, the pod is evicted (policy/v1, its PDB honoured), the ReplicaSet's
    replacement is scheduled, started and probed, the old pod's series vanish. Once."""
    seen = fresh_remediation(monitored.real)
    before = await every_pod_answering(monitored)
    await _break_and_watch(monitored.real, monitored.monitoring, sorted(before)[0], before,
                           seen)


def budget(real: RealCluster) -> tuple[Any, Any]:
    """The CoreDNS PodDisruptionBudget's (expected pods, disruptions allowed)."""
    pdb = real.cluster.api(
        "GET", "/apis/policy/v1/namespaces/kube-system/poddisruptionbudgets/coredns")
    status = (pdb or {}).get("status") or {}
    return status.get("expectedPods"), status.get("disruptionsAllowed")


async def budget_allows_one(real: RealCluster) -> None:
    """Wait until the PodDisruptionBudget an eviction must pass lets one of three go (once
    a pod of an earlier test, still terminating, has gone and the controller has counted
    again)."""
    assert await wait_until(lambda: budget(real) == (3, 1), 90), budget(real)


async def _break_and_watch(real: RealCluster, monitoring: Monitoring, sick: str,
                           before: set[str], seen: set[str]) -> None:
    def query(expr: str) -> list[dict[str, Any]]:
        return monitoring.query(expr)

    await budget_allows_one(real)
    real.in_pod_network(sick, [
        "iptables", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP"])
    assert await wait_until(lambda: bool(query(
        f'dnsprobe_success{{pod="{sick}", protocol="udp"}} == 0')), 30)
    assert query(f'min(dnsprobe_success{{pod="{sick}", protocol="tcp"}}) == 1')
    # The Service keeps answering: two pods in three behind it still do.
    assert await wait_until(lambda: bool(query(
        'sum(increase(dnsprobe_probes_total{kind="service", protocol="udp", '
        'result="success"}[15s])) > 0')), 30)

    # Alert, webhook, eviction: the pod goes Terminating (its grace period, not 0).
    def gone_or_terminating() -> bool:
        pod = real.cluster.api("GET", f"/api/v1/namespaces/kube-system/pods/{sick}",
                               missing_ok=True)
        return pod is None or bool(pod["metadata"].get("deletionTimestamp"))

    assert await wait_until(gone_or_terminating, 120), (
        "not evicted; alerts: " + str(query("ALERTS")))
    # The Event follows the eviction.
    assert await wait_until(lambda: bool(evictions(real, seen)), 15)
    [event] = evictions(real, seen)
    assert event["involvedObject"]["name"] == sick
    assert "CoreDNSPodUDPFailing" in event["message"]

    # The ReplicaSet's replacement runs, is Ready and probed; the old pod's series vanish.
    def replaced() -> bool:
        pods = real.coredns_pods()
        return len(ready_coredns(real)) == 3 and sick not in {
            p["metadata"]["name"] for p in pods}

    assert await wait_until(replaced, 90)
    [new] = {p["metadata"]["name"] for p in real.coredns_pods()} - before
    assert await wait_until(lambda: len(query(
        f'dnsprobe_success{{pod="{new}"}} == 1')) == 4, 60), query("dnsprobe_success")
    assert await wait_until(lambda: not query(f'dnsprobe_success{{pod="{sick}"}}'), 30)

    # Exactly one eviction, by one of the two replicas, counted once the alert has
    # resolved (Alertmanager's repeats and the other replica were answered by then; the
    # Lease's cooldown holds any other act for 5 minutes).
    assert await wait_until(lambda: not [
        a for a in monitoring.firing() if a["labels"].get("pod") == sick], 60)
    assert query('sum(dnsprobe_remediations_total{action="evict", result="success"}) == 1')
    assert len(evictions(real, seen)) == 1
