"""Real Prometheus 3 and Alertmanager (upstream, built by scripts/install-monitoring-tools)
as processes in a network namespace of the tests
(a lab's node namespace, or the real cluster's), wired to the exporter under test:
Prometheus scrapes it and evaluates the shipped rules, Alertmanager routes
CoreDNSPodUDPFailing to its webhook with a bearer token. Stopped by their PIDs."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .cluster import Process, free_port, run_all
from .components import MONITORING_BIN, monitoring_missing
from .lab import Lab
from .netns import NetNS
from .relay import Relay

PROMETHEUS_PORT, ALERTMANAGER_PORT = 9090, 9093


def get(url: str) -> Any:
    """GET `url`: its JSON (an object or a list), else its text. AssertionError with the
    body when the answer is an HTTP error (Prometheus and Alertmanager say why there)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{url}: {exc.code}: {exc.read().decode()}") from None
    return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()


def instant_query(prometheus: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """The result vector of an instant query (at `at`, else now) of the Prometheus at the
    URL `prometheus`; AssertionError with the reason if it fails."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    answer = get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode(params))
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def binaries_missing() -> str | None:
    return monitoring_missing("prometheus", "alertmanager")


def alertmanager_config(webhook: str, token_file: Path,
                        tls_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The route and receiver docs/alertmanager.md tells users to configure, with the
    waits shortened; `tls_config` (Alertmanager's) for a webhook served over TLS."""
    http_config: dict[str, Any] = {"authorization": {"credentials_file": str(token_file)}}
    if tls_config is not None:
        http_config["tls_config"] = tls_config
    return {
        "route": {
            "receiver": "default",
            "group_by": ["alertname", "namespace", "pod"],
            "group_wait": "1s", "group_interval": "2s", "repeat_interval": "1h",
            "routes": [{"receiver": "coredns-health-exporter",
                        "matchers": ['alertname="CoreDNSPodUDPFailing"']}],
        },
        "receivers": [
            {"name": "default"},
            {"name": "coredns-health-exporter", "webhook_configs": [{
                "url": webhook, "send_resolved": True, "http_config": http_config,
            }]},
        ],
    }


class Monitoring:
    def __init__(self, where: Lab | NetNS, workdir: Path, exporter: str, token_file: Path,
                 rules: dict[str, Any],
                 scrape_configs: list[dict[str, Any]] | None = None,
                 webhook: str | None = None,
                 webhook_tls: dict[str, Any] | None = None) -> None:
        """In the lab's node namespace, or in namespace `where`. `scrape_configs` replaces
        the default: a static target at `exporter`; `webhook` (default: `exporter`'s) is
        the HOST:PORT Alertmanager posts to, over TLS with `webhook_tls` (its
        tls_config)."""
        netns = where.node if isinstance(where, Lab) else where
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yaml")],
            "alerting": {"alertmanagers": [{"static_configs": [
                {"targets": [f"127.0.0.1:{ALERTMANAGER_PORT}"]}]}]},
            "scrape_configs": scrape_configs or [{
                "job_name": "coredns-health-exporter", "honor_labels": True,
                "static_configs": [{"targets": [exporter]}],
            }],
        }))
        scheme = "https" if webhook_tls is not None else "http"
        (workdir / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(
            f"{scheme}://{webhook or exporter}/webhook/alertmanager", token_file,
            webhook_tls)))
        self.processes = [
            Process("prometheus", netns.command([
                str(MONITORING_BIN / "prometheus"),
                "--config.file", str(workdir / "prometheus.yml"),
                "--storage.tsdb.path", str(workdir / "tsdb"),
                "--web.listen-address", f"127.0.0.1:{PROMETHEUS_PORT}"]),
                workdir / "prometheus.log"),
            Process("alertmanager", netns.command([
                str(MONITORING_BIN / "alertmanager"),
                "--config.file", str(workdir / "alertmanager.yml"),
                "--storage.path", str(workdir / "am"), "--cluster.listen-address=",
                "--web.listen-address", f"127.0.0.1:{ALERTMANAGER_PORT}"]),
                workdir / "alertmanager.log"),
        ]
        self.relays = [Relay.start("-", "127.0.0.1:0", netns.path, f"127.0.0.1:{port}")
                       for port in (PROMETHEUS_PORT, ALERTMANAGER_PORT)]
        self.prometheus, self.alertmanager = (f"http://{r.address}" for r in self.relays)
        try:
            for process, url in zip(self.processes, (self.prometheus, self.alertmanager),
                                    strict=True):
                process.await_ready(url + "/-/ready", timeout=60)
        except Exception:  # not handed to the caller yet: stop what started, by PID
            self.stop()
            raise

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector; AssertionError with the reason if it fails."""
        return instant_query(self.prometheus, expr)

    def firing(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager holds (active ones)."""
        alerts: list[dict[str, Any]] = get(f"{self.alertmanager}/api/v2/alerts")
        return alerts

    def stop(self) -> None:
        run_all([p.stop for p in self.processes] + [r.stop for r in self.relays])


class Backfilled:
    """A real Prometheus on loopback whose only data are known series, written as
    OpenMetrics and turned into blocks by its own promtool (`tsdb create-blocks-from
    openmetrics`): what a test asks of it has exactly one right answer."""

    def __init__(self, workdir: Path, series: dict[str, list[tuple[float, float]]]) -> None:
        """`series`: `name{labels}` -> [(unix time, value)], times ascending."""
        workdir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        # One family's samples together (OpenMetrics), each series' in time order.
        for name in sorted(series, key=lambda key: key.split("{", 1)[0]):
            lines += [f"{name} {v} {t:.3f}" for t, v in series[name]]
        (workdir / "series.om").write_text("\n".join(lines) + "\n# EOF\n")
        done = subprocess.run(
            [str(MONITORING_BIN / "promtool"), "tsdb", "create-blocks-from", "openmetrics",
             str(workdir / "series.om"), str(workdir / "tsdb")],
            capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({"scrape_configs": []}))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = Process("prometheus", [
            str(MONITORING_BIN / "prometheus"), "--config.file", str(workdir / "prometheus.yml"),
            "--storage.tsdb.path", str(workdir / "tsdb"),
            "--web.listen-address", self.url.removeprefix("http://")],
            workdir / "prometheus.log")
        self.process.await_ready(self.url + "/-/ready", timeout=60)

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        return instant_query(self.url, expr, at)

    def stop(self) -> None:
        self.process.stop()
