"""`check`: one round against real CoreDNS, a readable table or JSON, and exit codes 0/1/2;
a UDP-dead server (UDP/53 dropped by iptables in its namespace) fails UDP and passes TCP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from exporter.model import TARGET_LABELS
from tests.conftest import StartDNS
from tests.harness.coredns import KUBERNETES_IP, Behaviour, CoreDNS
from tests.harness.netns import NetNS

EXPORTER = [sys.executable, "-m", "exporter"]


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXPORTER, "check", *args], capture_output=True, text=True, timeout=60
    )


def test_healthy_server_exits_0_with_a_table(healthy_dns: CoreDNS) -> None:
    proc = run_check("--server", healthy_dns.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, *rows = proc.stdout.splitlines()[:3]
    assert header.split()[:6] == ["TARGET", "KIND", "PROTOCOL", "QUERY", "OUTCOME", "LATENCY"]
    assert {row.split()[2] for row in rows} == {"udp", "tcp"}
    assert all(row.split()[4] == "success" for row in rows)
    assert "2 of 2 probes passed." in proc.stdout


def test_json_output_carries_every_label_and_the_result(
    healthy_dns: CoreDNS, start_dns: StartDNS
) -> None:
    broken = start_dns(Behaviour.SERVFAIL)
    proc = run_check("--server", healthy_dns.address, "--server", broken.address, "--json",
                     "--query", "kubernetes.default.svc.cluster.local", "--expect", KUBERNETES_IP)
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["healthy"] is False
    by_address = {(r["address"], r["protocol"]): r for r in data["results"]}
    assert len(by_address) == 4
    for record in data["results"]:
        assert set(TARGET_LABELS) <= set(record)
        assert record["kind"] == "static"
        assert record["query"] == "kubernetes.default.svc.cluster.local"
    good = by_address[(healthy_dns.address, "udp")]
    assert good["outcome"] == "success" and good["answers"] == [KUBERNETES_IP]
    assert good["latency_seconds"] > 0
    bad = by_address[(broken.address, "tcp")]
    assert bad["outcome"] == "rcode" and bad["rcode"] == "SERVFAIL" and not bad["success"]


def test_protocol_flag_limits_the_transports(healthy_dns: CoreDNS) -> None:
    proc = run_check("--server", healthy_dns.address, "--protocol", "tcp", "--json")
    assert [r["protocol"] for r in json.loads(proc.stdout)["results"]] == ["tcp"]


def test_udp_dead_server_exits_1_with_udp_failing_and_tcp_passing(
    udp_dead_dns: tuple[NetNS, CoreDNS]
) -> None:
    ns, server = udp_dead_dns
    proc = ns.run([*EXPORTER, "check", "--server", server.address, "--timeout", "0.5", "--json"])
    assert proc.returncode == 1, proc.stderr
    results = {r["protocol"]: r for r in json.loads(proc.stdout)["results"]}
    assert results["udp"]["outcome"] == "timeout"
    assert results["tcp"]["outcome"] == "success"
    assert results["tcp"]["answers"] == [KUBERNETES_IP]


def test_embedded_default_probes_the_resolver_nameservers(
    tmp_path: Path, netns: Callable[[str], NetNS], start_dns: StartDNS
) -> None:
    """A laptop's resolver, which knows no cluster name: the embedded default asks it a
    question any resolver answers (the root zone's servers), and says so."""
    ns = netns("resolv")
    start_dns(Behaviour.RESOLVER, netns=ns, port=53)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example.net\nnameserver 127.0.0.1\noptions ndots:5\n")
    proc = ns.run([*EXPORTER, "check", "--resolv-conf", str(resolv), "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert [(r["kind"], r["address"], r["query"]) for r in results] == [
        ("static", "127.0.0.1:53", "./NS")] * 2
    assert all(r["answers"] == ["a.root-servers.net."] for r in results), results
    assert "embedded default" in proc.stderr and str(resolv) in proc.stderr
    assert "with ./NS (the root zone's name servers: any resolver answers it)" in proc.stderr
    # A --query of the user's replaces it.
    proc = ns.run([*EXPORTER, "check", "--resolv-conf", str(resolv), "--json",
                   "--query", "nowhere.example"])
    assert proc.returncode == 1
    assert {r["outcome"] for r in json.loads(proc.stdout)["results"]} == {"rcode"}


def test_embedded_default_without_nameservers_is_a_config_error(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\n")
    proc = run_check("--resolv-conf", str(resolv))
    assert proc.returncode == 2
    assert "lists no nameserver" in proc.stderr
