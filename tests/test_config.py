"""Configuration: flags, environment and YAML merge in that order; every bad value is
reported, all at once, naming where it came from; the CLI turns that into exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ConfigError, LogFormat, Remediation, load, parse_duration
from exporter.model import Protocol


def problems(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(argv, env or {})
    return info.value.problems


def test_defaults_match_the_contract() -> None:
    s = load([], {})
    assert s.command == "serve"
    assert s.discovery.namespace == "kube-system"
    assert s.discovery.service == "kube-dns"
    assert s.discovery.dns_port is None  # the Service's targetPort on each pod, else 53
    assert s.http.probe_endpoint.value == "any"  # blackbox_exporter's contract
    assert s.discovery.cluster_domain == "cluster.local"
    assert s.probe.protocols == (Protocol.UDP, Protocol.TCP)
    assert s.probe.timeout == 1.0
    assert s.probe.interval == 5.0
    assert s.remediation.mode is Remediation.DRY_RUN
    assert s.remediation.min_ready == 1
    assert s.remediation.cooldown == 300.0
    assert s.remediation.allow_delete is False
    assert s.log_format is LogFormat.TEXT
    assert (s.http.host, s.http.port) == ("", 9953)


def test_flags_parse_into_settings() -> None:
    s = load(
        ["check", "--server", "127.0.0.1:1053", "--server", "[::1]", "--protocol", "udp",
         "--timeout", "250ms", "--query", "example.org/AAAA", "--expect", "2001:db8::1",
         "--query", "a.example", "--expect", "10.0.0.1", "--expect", "10.0.0.2", "--json"],
        {},
    )
    assert s.command == "check" and s.json_output
    assert [e.address for e in s.discovery.servers] == ["127.0.0.1:1053", "[::1]:53"]
    assert s.probe.protocols == (Protocol.UDP,)
    assert s.probe.timeout == 0.25
    assert [(q.label, q.qname, q.rdtype, q.expect) for q in s.probe.queries] == [
        ("example.org/AAAA", "example.org.", "AAAA", ("2001:db8::1",)),
        ("a.example", "a.example.", "A", ("10.0.0.1", "10.0.0.2")),
    ]


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("timeout: 2\ninterval: 10\nnamespace: from-file\nlog-format: json\n")
    s = load(
        ["--config", str(config), "--timeout", "3"],
        {"DNSPROBE_INTERVAL": "20", "DNSPROBE_TIMEOUT": "4"},
    )
    assert s.probe.timeout == 3.0  # flag
    assert s.probe.interval == 20.0  # environment
    assert s.discovery.namespace == "from-file"  # file
    assert s.log_format is LogFormat.JSON


def test_yaml_queries_take_names_types_and_expectations(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "query:\n  - example.org\n  - name: svc.example\n    type: AAAA\n    expect: ['::1']\n"
    )
    s = load(["--config", str(config)], {})
    assert [(q.label, q.expect) for q in s.probe.queries] == [
        ("example.org", ()),
        ("svc.example/AAAA", ("::1",)),
    ]


def test_every_bad_value_is_reported_at_once_naming_its_source(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dns-port: 70000\nnamespace: Not_Valid\nprotocol: sctp\n")
    found = problems(
        ["--config", str(config), "--timeout", "soon", "--server", "dns.example",
         "--remediation", "reboot"],
        {"DNSPROBE_MIN_READY": "-1"},
    )
    joined = "\n".join(found)
    assert len(found) == 7, joined
    assert f"{config}: dns-port: expected a whole number from 1 to 65535" in joined
    assert f"{config}: namespace: 'Not_Valid' is not a valid Kubernetes name" in joined
    assert f"{config}: protocol: expected udp, tcp or both" in joined
    assert "--timeout: expected a duration" in joined
    assert "--server: 'dns.example' is not an IP address" in joined
    assert "--remediation: expected one of off, dry-run, evict" in joined
    assert "$DNSPROBE_MIN_READY: expected a whole number from 0 to 1000" in joined


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dns_port: 53\nfrobnicate: true\n")
    found = problems(["--config", str(config)])
    assert f"{config}: unknown key 'dns_port' (did you mean 'dns-port'?)" in found
    assert any("unknown key 'frobnicate'" in p for p in found)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("timeout: [1\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping of keys"),
    ],
)
def test_unparseable_config_file_is_reported(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert expected in "\n".join(problems(["--config", str(config)]))


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    assert "cannot read" in problems(["--config", str(tmp_path / "nope.yaml")])[0]


def test_expect_before_any_query_is_the_default_querys() -> None:
    from exporter.config import default_query

    settings = load(["--expect", "10.0.0.1", "--expect", "10.0.0.2"], {})
    assert settings.probe.default_expect == ("10.0.0.1", "10.0.0.2")
    # It wins over the ClusterIP read from the API.
    assert default_query(settings, ("10.96.0.1",)).expect == ("10.0.0.1", "10.0.0.2")
    assert default_query(load([], {}), ("10.96.0.1",)).expect == ("10.96.0.1",)
    # With Kubernetes the default query is probed beside every --query: it keeps it.
    both = load(["--expect", "10.0.0.1", "--query", "example.org"], {})
    assert both.probe.default_expect == ("10.0.0.1",)
    assert [q.label for q in both.probe.queries] == ["example.org"]
    # --server targets with a --query do not probe the default query: it would be lost.
    [problem] = problems(["--server", "10.0.0.53", "--expect", "10.0.0.1", "--query",
                          "example.org"])
    assert "applies to the default query, which --server targets with --query" in problem


def test_node_local_dns_names_its_node_and_is_an_address() -> None:
    from exporter.model import Endpoint

    # As the DaemonSet sets it: the node from the downward API's environment variable.
    settings = load(["--node-local-dns", "169.254.20.10"], {"DNSPROBE_NODE_NAME": "worker-1"})
    assert settings.discovery.node_local_dns == Endpoint("169.254.20.10", 53)
    assert settings.discovery.node_name == "worker-1"
    assert settings.effective()["discovery"]["node_local_dns"] == "169.254.20.10:53"
    assert load(["--node-local-dns", "[fd00::a]:5353", "--node-name", "n1"],
                {}).discovery.node_local_dns == Endpoint("fd00::a", 5353)
    [problem] = problems(["--node-local-dns", "169.254.20.10"])
    assert "needs the node this exporter runs on: --node-name, or DNSPROBE_NODE_NAME" in problem
    [problem] = problems(["--node-local-dns", "nodelocal.example", "--node-name", "n1"])
    assert "is not an IP address" in problem
    [problem] = problems(["--node-local-dns", "169.254.20.10", "--node-name", "n1",
                          "--server", "10.0.0.53"])
    assert "with --server, give the cache as one more --server" in problem
    [problem] = problems(["--node-name", "Not_A_Node"])
    assert "not a valid Kubernetes node name" in problem


def test_a_default_timeout_makes_room_for_a_short_interval() -> None:
    assert load(["--interval", "1"], {}).probe.timeout == 0.5
    assert load(["--interval", "0.5"], {}).probe.timeout == 0.25
    assert load(["--interval", "2"], {}).probe.timeout == 1.0
    assert load([], {}).probe.timeout == 1.0
    # A timeout given explicitly is kept, and must still be shorter than the interval.
    assert "must be shorter than interval" in problems(["--interval", "1", "--timeout", "1"])[0]


def test_timeout_must_be_shorter_than_interval_for_serve() -> None:
    assert "must be shorter than interval" in problems(["--timeout", "5", "--interval", "5"])[0]
    # `check` runs one round: no interval to overlap.
    assert load(["check", "--timeout", "5", "--server", "127.0.0.1"], {}).probe.timeout == 5.0


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--query", "bad..name"], "not a valid domain name"),
        (["--query", "example.org/BOGUS"], "type must be one of"),
        (["--query", "a.example", "--query", "a.example"], "duplicate queries: a.example"),
        (["--query", "kubernetes"], "taken by the default query"),
        (["--listen", "nope"], "expected HOST:PORT"),
        (["--interval", "0"], "must be greater than zero"),
        (["--cooldown=-5m"], "expected a duration"),
        (["--concurrency", "0"], "from 1 to 10000"),
        (["--cluster-domain", "bad_domain"], "not a valid domain name"),
        (["--server", "127.0.0.1:0"], "port must be a number from 1 to 65535"),
        (["--server", "[::1"], "missing ']'"),
        (["--log-format", "xml"], "expected one of text, json"),
        (["--mode", "tunnel"], "expected one of auto, in-cluster, nodeport, probe-pod, "
                               "port-forward"),
        (["--node-address-type", "Hostname"], "expected one of InternalIP, ExternalIP"),
        (["--probe-pod-namespace", "Not_A_Name"], "--probe-pod-namespace"),
        (["--probe-pod-image", "bad image"], "expected a container image reference"),
    ],
)
def test_invalid_values(argv: list[str], expected: str) -> None:
    assert expected in "\n".join(problems(argv))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), (2, 2.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_effective_config_is_plain_data() -> None:
    s = load(["--server", "127.0.0.1:1053"], {})
    effective = s.effective()
    assert effective["discovery"]["servers"] == ["127.0.0.1:1053"]
    assert effective["remediation"]["mode"] == "dry-run"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_reports_config_errors_with_exit_2_and_no_traceback() -> None:
    proc = run_cli("check", "--timeout", "x", "--server", "nope")
    assert proc.returncode == 2
    assert "configuration error" in proc.stderr
    assert "--timeout: expected a duration" in proc.stderr
    assert "--server: 'nope' is not an IP address" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_flag_is_a_usage_error_with_exit_2() -> None:
    proc = run_cli("check", "--no-such-flag")
    assert proc.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_kubeconfig_is_a_config_error(tmp_path: Path) -> None:
    proc = run_cli("check", "--kubeconfig", str(tmp_path / "absent"))
    assert proc.returncode == 2
    assert "no such file" in proc.stderr


@pytest.mark.parametrize(
    "text",
    ["not: [valid", "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"],
    ids=["not-yaml", "no-context"],
)
def test_cli_unusable_kubeconfig_is_a_config_error(tmp_path: Path, text: str) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(text)
    proc = run_cli("serve", "--kubeconfig", str(kubeconfig))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot use the Kubernetes config {kubeconfig}" in proc.stderr
    assert "Traceback" not in proc.stderr
