"""Overlays a user turns on, on the real cluster: self-remediation (two replicas of the
Deployment with `--self-remediate` and `--remediation=evict`, the webhook on as well, and
an external query: the upstream resolver failing restarts nothing; a CoreDNS pod whose
UDP/53 dies is evicted within 30 s at the default interval, once), and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml

from tests.harness.cluster import UPSTREAM_IP
from tests.harness.kubedns import UPSTREAM_ANSWER, UPSTREAM_NAME
from tests.harness.realcluster import RealCluster
from tests.harness.scrape import samples, scrape_until, wait_until
from tests.harness.tls import PKI
from tests.test_real_cluster import (
    NAMESPACE,
    REPO,
    applied,
    budget_allows_one,
    evictions,
    fresh_remediation,
    overlay,
    post_alert,
    ready_coredns,
)


@dataclass
class Repairing:
    real: RealCluster
    pods: list[dict[str, Any]]  # the exporter's
    urls: dict[str, str]  # exporter pod name -> its URL from the host
    token: str

    def logs(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        for pod in self.pods:
            text = self.real.kubectl("-n", NAMESPACE, "logs", pod["metadata"]["name"])
            lines += [json.loads(line) | {"exporter": pod["metadata"]["name"]}
                      for line in text.splitlines() if line.startswith("{")]
        return lines

    async def bodies(self) -> dict[str, str]:
        return {name: await scrape_until(url, lambda b: True) for name, url in self.urls.items()}


@pytest.fixture
def repairing(real_cluster: RealCluster, tmp_path: Path) -> Iterator[Repairing]:
    real = real_cluster
    token = os.urandom(16).hex()
    real.kubectl("create", "namespace", NAMESPACE)
    real.kubectl("-n", NAMESPACE, "create", "secret", "generic",
                 "coredns-health-exporter-webhook", f"--from-literal=token={token}")
    # The README's self-remediation, with the shipped interval (5 s) and timeout.
    user = overlay(tmp_path / "overlay", {"remediation": "evict", "self-remediate": None,
                                          "query": UPSTREAM_NAME, "expect": UPSTREAM_ANSWER})
    with applied(real, user) as pods, contextlib.ExitStack() as stack:
        assert len(pods) == 2
        urls = {p["metadata"]["name"]: "http://" + stack.enter_context(
            real.cluster.exposed(f"{p['status']['podIP']}:9953")) for p in pods}
        yield Repairing(real, pods, urls, token)


def success(body: str, query: str) -> dict[str, float]:
    """CoreDNS pod -> dnsprobe_success of its UDP probes of `query`."""
    return {s.labels["pod"]: s.value for s in samples(body) if s.name == "dnsprobe_success"
            and s.labels["kind"] == "pod" and s.labels["protocol"] == "udp"
            and s.labels["query"] == query}


def remediations(body: str) -> dict[tuple[str, str, str], float]:
    """(action, result, trigger) -> dnsprobe_remediations_total, where above 0."""
    return {(s.labels["action"], s.labels["result"], s.labels["trigger"]): s.value
            for s in samples(body) if s.name == "dnsprobe_remediations_total" and s.value > 0}


def rounds(body: str) -> float:
    return next(s.value for s in samples(body) if s.name == "dnsprobe_rounds_total")


async def every_pod_answers(r: Repairing) -> set[str]:
    """Wait until both exporters see every Ready CoreDNS pod answer both queries; their
    names."""
    deadline = time.monotonic() + 90
    while True:
        names = set(await asyncio.to_thread(ready_coredns, r.real))
        bodies = await r.bodies()
        if len(names) == 3 and all(success(b, q) == dict.fromkeys(names, 1.0)
                                   for b in bodies.values()
                                   for q in ("kubernetes", UPSTREAM_NAME)):
            return names
        assert time.monotonic() < deadline, {n: success(b, UPSTREAM_NAME)
                                             for n, b in bodies.items()}
        await asyncio.sleep(0.5)  # the next look; the exporters probe every 5 s


async def test_upstream_failure_restarts_nothing_and_a_udp_dead_pod_is_evicted_once(
        repairing: Repairing) -> None:
    r, real = repairing, repairing.real
    seen = fresh_remediation(real)
    before = await every_pod_answers(r)

    # 1. The upstream resolver stops answering (every CoreDNS pod forwards to it): the
    # external query fails on every pod as their caches expire, the cluster's own name
    # passes; each replica says it is the upstreams, and no pod is restarted for it.
    netns = real.cluster.netns
    assert netns is not None
    rules = [["INPUT", "-d", UPSTREAM_IP, "-p", proto, "--dport", "53", "-j", "DROP"]
             for proto in ("udp", "tcp")]
    for rule in rules:
        netns.exec(["iptables", "-I", *rule])
    try:
        def said() -> set[str]:
            return {line["exporter"] for line in r.logs()
                    if "an upstream failure" in line.get("msg", "")
                    and line.get("failing") == [UPSTREAM_NAME]}

        # CoreDNS caches the answer up to 30 s (`cache 30`), then its forward times out.
        assert await wait_until(lambda: said() == set(r.urls), 120), [
            line for line in r.logs() if "self-remediation" in line.get("msg", "")]
        bodies = await r.bodies()
        for body in bodies.values():
            assert success(body, UPSTREAM_NAME) == dict.fromkeys(before, 0.0)
            assert success(body, "kubernetes") == dict.fromkeys(before, 1.0)
        # Six more rounds (30 s) of it: still nothing restarted, nothing even decided.
        then = {name: rounds(b) for name, b in bodies.items()}
        for name, url in r.urls.items():
            def six_more(body: str, name: str = name) -> bool:
                return rounds(body) >= then[name] + 6

            assert six_more(await scrape_until(url, six_more, deadline=60))
        assert all(not remediations(b) for b in (await r.bodies()).values())
        assert set(ready_coredns(real)) == before and not evictions(real, seen)
    finally:
        for rule in rules:
            netns.exec(["iptables", "-D", *rule])
    await every_pod_answers(r)

    # 2. One pod's UDP/53 dies: both replicas judge it; one of them evicts it within 30 s
    # of its death, the other's decision and the webhook's are skips (the Lease).
    await budget_allows_one(real)
    sick = sorted(before)[0]
    real.in_pod_network(sick, ["iptables", "-A", "INPUT", "-p", "udp", "--dport", "53",
                               "-j", "DROP"])
    began = time.monotonic()

    def gone_or_terminating() -> bool:
        pod = real.cluster.api("GET", f"/api/v1/namespaces/kube-system/pods/{sick}",
                               missing_ok=True)
        return pod is None or bool(pod["metadata"].get("deletionTimestamp"))

    assert await wait_until(gone_or_terminating, 60), [
        line for line in r.logs() if "self-remediation" in line.get("msg", "")
        or line.get("pod") == sick]
    took = time.monotonic() - began
    assert took <= 30, f"evicted {took:.1f}s after its UDP died"
    # Alertmanager's post of the same episode, to the other replica, comes too late.
    status, answer = await post_alert(real, r.pods[1], r.token, sick)
    assert status == 200, answer
    [decision] = answer["decisions"]
    assert decision["action"] == "skip", decision

    # The ReplicaSet replaces it; exactly one eviction, by trigger self.
    assert await wait_until(lambda: len(ready_coredns(real)) == 3 and sick not in {
        p["metadata"]["name"] for p in real.coredns_pods()}, 90)
    assert await wait_until(lambda: bool(evictions(real, seen)), 15)
    [event] = evictions(real, seen)
    assert event["involvedObject"]["name"] == sick
    assert "trigger: self" in event["message"], event["message"]
    counted: dict[tuple[str, str, str], float] = {}
    for body in (await r.bodies()).values():
        for key, value in remediations(body).items():
            counted[key] = counted.get(key, 0) + value
    assert counted.get(("evict", "success", "self")) == 1, counted
    assert not [k for k in counted if k[0] == "evict" and k != ("evict", "success", "self")]
    evicted = [line for line in r.logs() if line.get("msg") == "evicted pod"]
    assert [(line["pod"], line["trigger"]) for line in evicted] == [(sick, "self")], evicted


async def test_the_tls_overlay_serves_https_with_client_certificates_and_basic_auth(
        real_cluster: RealCluster, tmp_path: Path) -> None:
    """`kubectl apply -k deploy/overlays/tls` with the Secret its comment says to make (the
    shipped web.yml.example, a real bcrypt hash of ours): the pods become Ready through
    HTTPS probes, and answer /metrics over TLS to a client certificate with basic auth,
    401 without it."""
    real = real_cluster
    pki = PKI(tmp_path / "pki")
    password = os.urandom(8).hex()
    example = yaml.safe_load((REPO / "deploy" / "overlays" / "tls" / "web.yml.example")
                             .read_text())
    example["basic_auth_users"] = {"prometheus": bcrypt.hashpw(
        password.encode(), bcrypt.gensalt(rounds=6)).decode()}
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump(example))
    real.kubectl("create", "namespace", NAMESPACE)
    real.kubectl("-n", NAMESPACE, "create", "secret", "generic", "coredns-health-exporter-web",
                 f"--from-file=web.yml={web}", f"--from-file=tls.crt={pki.path('server.crt')}",
                 f"--from-file=tls.key={pki.path('server.key')}",
                 f"--from-file=ca.crt={pki.path('ca.crt')}")
    with applied(real, REPO / "deploy" / "overlays" / "tls") as pods:
        assert len(pods) == 2
        logs = real.kubectl("-n", NAMESPACE, "logs", pods[0]["metadata"]["name"])
        [listening] = [json.loads(line) for line in logs.splitlines()
                       if line.startswith("{") and '"listening"' in line]
        assert listening["tls"] is True and listening["basic_auth"] is True
        with real.cluster.exposed(f"{pods[0]['status']['podIP']}:9953") as address:
            auth = {"Authorization": aiohttp.encode_basic_auth("prometheus", password)}
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://{address}/metrics", headers=auth,
                                       ssl=pki.client("prometheus")) as response:
                    assert response.status == 200
                    assert "dnsprobe_build_info" in await response.text()
                async with session.get(f"https://{address}/metrics",
                                       ssl=pki.client("prometheus")) as response:
                    assert response.status == 401
