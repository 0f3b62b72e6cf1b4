"""`serve` as a real process: scraped over HTTP, its series carry every target label and
follow what real CoreDNS servers do; /probe, health, readiness, the status page, and a
clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest

from exporter.model import TARGET_LABELS
from tests.conftest import StartDNS
from tests.harness.coredns import Behaviour, CoreDNS
from tests.harness.exporter import Exporter
from tests.harness.netns import NetNS
from tests.harness.scrape import samples, scrape, scrape_until, value


@pytest.fixture
def two_servers(start_dns: StartDNS) -> tuple[CoreDNS, CoreDNS]:
    return start_dns(Behaviour.HEALTHY), start_dns(Behaviour.SERVFAIL)


@pytest.fixture
def exporter(two_servers: tuple[CoreDNS, CoreDNS]) -> Iterator[Exporter]:
    healthy, broken = two_servers
    proc = Exporter(
        ["--server", healthy.address, "--server", broken.address,
         "--interval", "0.5", "--timeout", "0.3"]
    )
    yield proc
    proc.stop()


def _all_probed(body: str) -> bool:
    return sum(1 for s in samples(body) if s.name == "dnsprobe_success") == 4 and all(
        (value(body, "dnsprobe_duration_seconds_count", address=a) or 0) >= 1
        for a in {s.labels["address"] for s in samples(body) if s.name == "dnsprobe_success"}
    )


async def test_the_exporter_runs_on_uvloop_and_probes_both_transports(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    """uvloop is a dependency (the locks hold it): the served exporter runs on it, and its
    probes and their kernel receive timestamps work there (a latency is measured)."""
    [start] = exporter.logged("starting coredns-health-exporter")
    assert start["event_loop"].startswith("uvloop "), start
    healthy, _ = two_servers
    body = await scrape_until(exporter.url, _all_probed)
    for proto in ("udp", "tcp"):
        count = value(body, "dnsprobe_duration_seconds_count", address=healthy.address,
                      protocol=proto)
        assert count is not None and count >= 1, proto
        total = value(body, "dnsprobe_duration_seconds_sum", address=healthy.address,
                      protocol=proto)
        assert total is not None and 0 < total < count  # under a second each, not zero


async def test_scrape_shows_per_target_series_with_every_label(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    healthy, broken = two_servers
    body = await scrape_until(exporter.url, _all_probed)
    assert _all_probed(body), body
    for proto in ("udp", "tcp"):
        assert value(body, "dnsprobe_success", address=healthy.address, protocol=proto) == 1
        assert value(body, "dnsprobe_success", address=broken.address, protocol=proto) == 0
        ok = value(body, "dnsprobe_probes_total", address=healthy.address, protocol=proto,
                   result="success")
        assert ok is not None and ok >= 1
        rcode = value(body, "dnsprobe_probes_total", address=broken.address, protocol=proto,
                      result="rcode")
        assert rcode is not None and rcode >= 1
    expected = {"kind": "static", "namespace": "", "service": "", "pod": "", "node": "",
                "query": "kubernetes"}
    per_target = [s for s in samples(body) if s.name.startswith("dnsprobe_")
                  and "address" in s.labels]
    names = {s.name for s in per_target}
    assert {"dnsprobe_success", "dnsprobe_probes_total", "dnsprobe_duration_seconds_bucket",
            "dnsprobe_duration_seconds_sum", "dnsprobe_duration_seconds_count"} <= names
    for s in per_target:
        assert set(TARGET_LABELS) <= set(s.labels), s
        assert {k: s.labels[k] for k in expected} == expected
    # Static targets: no remediator, and the webhook's one decision is exported from 0.
    decisions = {(s.labels["action"], s.labels["result"], s.labels["trigger"]): s.value
                 for s in samples(body) if s.name == "dnsprobe_remediations_total"}
    assert decisions == {("skip", "no_kubernetes", "webhook"): 0}, decisions
    # every outcome is exported from the start, so rate() sees the first failure
    results = {s.labels["result"] for s in per_target if s.name == "dnsprobe_probes_total"}
    assert results == {"success", "timeout", "unreachable", "rcode", "wrong_answer",
                       "truncated", "error"}
    inf = value(body, "dnsprobe_duration_seconds_bucket", address=healthy.address,
                protocol="udp", le="+Inf")
    count = value(body, "dnsprobe_duration_seconds_count", address=healthy.address,
                  protocol="udp")
    assert inf == count and count is not None and count >= 1
    assert value(body, "dnsprobe_build_info") == 1


async def test_openmetrics_when_asked(exporter: Exporter) -> None:
    status, ctype, body = await scrape(
        exporter.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


async def test_probe_endpoint_runs_one_probe(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    healthy, broken = two_servers
    status, _, body = await scrape(exporter.url, f"/probe?target={healthy.address}&protocol=tcp")
    assert status == 200
    assert value(body, "dnsprobe_success") == 1
    # A histogram, as on /metrics, of this one probe.
    assert value(body, "dnsprobe_duration_seconds_count") == 1
    assert (value(body, "dnsprobe_duration_seconds_sum") or 0) > 0
    status, _, body = await scrape(exporter.url, f"/probe?target={broken.address}")
    assert value(body, "dnsprobe_success") == 0
    assert value(body, "dnsprobe_outcome", result="rcode", rcode="SERVFAIL") == 1


async def test_probe_debug_shows_log_metrics_and_settings(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    healthy, _ = two_servers
    status, _, body = await scrape(
        exporter.url, f"/probe?target={healthy.address}&expect=10.96.0.1&debug=true"
    )
    assert status == 200
    assert "Logs for the probe:" in body and "sending A kubernetes.default.svc" in body
    assert "Metrics that would have been returned:" in body and "dnsprobe_success 1.0" in body
    assert "expect: 10.96.0.1" in body and "protocol: udp" in body


async def test_probe_endpoint_off_answers_404_and_known_refuses_other_addresses(
    two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    healthy, broken = two_servers
    off = Exporter(["--server", healthy.address, "--probe-endpoint", "off"])
    known = Exporter(["--server", healthy.address, "--probe-endpoint", "known"])
    try:
        status, _, body = await scrape(off.url, f"/probe?target={healthy.address}")
        assert status == 404 and "--probe-endpoint off" in body
        assert (await scrape(off.url, "/metrics"))[0] == 200
        # An address it probes: answered; any other: 403, before any packet is sent.
        status, _, body = await scrape(known.url, f"/probe?target={healthy.address}")
        assert status == 200 and value(body, "dnsprobe_success") == 1
        status, _, body = await scrape(known.url, f"/probe?target={broken.address}")
        assert status == 403, body
        assert f"{broken.address} is not among the addresses this exporter probes" in body
        host, port = healthy.address.rsplit(":", 1)
        status, _, _ = await scrape(known.url, f"/probe?target={host}:{int(port) + 1}")
        assert status == 403  # the same IP on another port is another target
        # Bad parameters are still 400, whatever the policy.
        assert (await scrape(known.url, "/probe?target=example.org"))[0] == 400
    finally:
        off.stop()
        known.stop()


async def test_a_probe_flood_is_bounded_and_leaves_the_exporter_serving(
    healthy_dns: CoreDNS
) -> None:
    """200 /probe requests at once at a server that never answers (a UDP socket nobody
    reads, on loopback), each waiting up to 3 s: at most MAX_PROBE_INFLIGHT probe, the rest
    get 503 with Retry-After at once; /metrics and /-/healthy answer meanwhile, and /probe
    works again after."""
    from exporter.web.state import MAX_PROBE_INFLIGHT

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    exporter = Exporter(["--server", healthy_dns.address])
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one() -> tuple[int, str]:
                async with session.get(
                        f"{exporter.url}/probe?target={target}&timeout=3") as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After", "")

            flood = [asyncio.create_task(one()) for _ in range(200)]
            busy = await asyncio.wait_for(_first_busy(flood), 10)
            assert busy == (503, "1")
            # Meanwhile the exporter serves everything else.
            assert (await scrape(exporter.url, "/-/healthy"))[0] == 200
            assert (await scrape(exporter.url, "/metrics"))[0] == 200
            answers = await asyncio.wait_for(asyncio.gather(*flood), 30)
        probed = [a for a in answers if a[0] == 200]
        refused = [a for a in answers if a[0] == 503]
        assert len(probed) + len(refused) == 200
        assert len(probed) >= 1 and len(refused) >= 200 - 2 * MAX_PROBE_INFLIGHT
        assert all(retry == "1" for _, retry in refused)
        assert len(exporter.logged("/probe: too many requests at once; answering 503 "
                                   "until some end")) >= 1
        status, _, body = await scrape(exporter.url, f"/probe?target={healthy_dns.address}")
        assert status == 200 and value(body, "dnsprobe_success") == 1
    finally:
        exporter.stop()
        silent.close()


async def _first_busy(tasks: list[asyncio.Task[tuple[int, str]]]) -> tuple[int, str]:
    """The first answer that is a 503 (they come at once; the probes take seconds)."""
    for done in asyncio.as_completed(tasks):
        answer = await done
        if answer[0] == 503:
            return answer
    raise AssertionError("no request was refused")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", "target: required"),
        ("target=example.org", "is not an IP address"),
        ("target=127.0.0.1&protocol=sctp", "expected udp or tcp"),
        ("target=127.0.0.1&type=BOGUS", "type must be one of"),
        ("target=127.0.0.1&timeout=900", "at most 30"),
    ],
)
async def test_probe_endpoint_rejects_bad_requests(
    exporter: Exporter, query: str, expected: str
) -> None:
    status, _, body = await scrape(exporter.url, f"/probe?{query}")
    assert status == 400
    assert expected in body


async def test_health_readiness_and_status_page(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    assert (await scrape(exporter.url, "/-/healthy"))[0] == 200
    # Static targets are ready from the start (no discovery to wait for), and the metric
    # readiness stands on says the same.
    status, _, text = await scrape(exporter.url, "/-/ready")
    assert status == 200, text
    body = await scrape_until(exporter.url, _all_probed)
    assert value(body, "dnsprobe_discovery_synced") == 1
    status, ctype, page = await scrape(exporter.url, "/")
    assert status == 200 and ctype.startswith("text/html")
    for server in two_servers:
        assert server.address in page
    assert 'class="bad"' in page and 'class="ok"' in page


async def test_start_up_logs_version_and_effective_config(exporter: Exporter) -> None:
    start = next(r for r in exporter.logs if r.get("msg") == "starting coredns-health-exporter")
    assert start["version"]
    assert start["config"]["probe"]["interval"] == 0.5


async def test_sigterm_shuts_down_cleanly(exporter: Exporter) -> None:
    await scrape_until(exporter.url, _all_probed)
    assert exporter.stop() == 0
    assert exporter.messages()[-2:] == ["shutting down: finishing in-flight probes", "stopped"]
    assert not any(r.get("level") == "error" for r in exporter.logs)


def test_port_in_use_exits_1_with_a_clear_error(healthy_dns: CoreDNS) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1") as info:
            Exporter(["--server", healthy_dns.address, "--listen", f"127.0.0.1:{port}"])
    assert "cannot listen" in str(info.value)
    assert "Traceback" not in str(info.value)


async def test_udp_dead_server_scraped_inside_its_namespace(
    udp_dead_dns: tuple[NetNS, CoreDNS]
) -> None:
    ns, server = udp_dead_dns
    proc = Exporter(["--server", server.address, "--interval", "0.5", "--timeout", "0.3"],
                    netns=ns)
    try:
        def timed_out(text: str) -> bool:
            return (value(text, "dnsprobe_probes_total", protocol="udp",
                          result="timeout") or 0) >= 1

        body = await scrape_until(proc.url, timed_out, deadline=20)
        assert value(body, "dnsprobe_success", protocol="udp") == 0, body
        assert value(body, "dnsprobe_success", protocol="tcp") == 1, body
        assert timed_out(body)
    finally:
        assert proc.stop() == 0
    # --log-format json: every line it wrote, start to stop, is one JSON object.
    assert proc.raw and all(isinstance(json.loads(line), dict) for line in proc.raw), proc.raw


async def test_outcome_changes_are_logged_once_not_every_round(
    exporter: Exporter, two_servers: tuple[CoreDNS, CoreDNS]
) -> None:
    _, broken = two_servers
    body = await scrape_until(
        exporter.url, lambda b: (value(b, "dnsprobe_rounds_total") or 0) >= 4
    )
    assert (value(body, "dnsprobe_rounds_total") or 0) >= 4
    changes = [r for r in exporter.logs if r.get("msg") == "probe outcome changed"]
    # The broken server: one line per protocol, once, in four rounds or more. (The healthy
    # one may log a late answer's timeout and its recovery on a busy machine; those lines
    # are changes too, and say so.)
    broken_changes = [r for r in changes if r["address"] == broken.address]
    assert sorted((r["protocol"], r["outcome"]) for r in broken_changes) == [
        ("tcp", "rcode"), ("udp", "rcode")]
    assert all(r["level"] == "warning" and "SERVFAIL" in r["reason"] for r in broken_changes)
    assert all(r["outcome"] in ("timeout", "success") for r in changes
               if r["address"] != broken.address), changes


async def test_webhook_cuts_off_a_body_that_trickles_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends its headers and then the body a byte at a time gets 408."""
    from exporter import root
    from exporter.config import load
    from exporter.web import webhook

    monkeypatch.setattr(webhook, "BODY_TIMEOUT", 0.5)
    token = tmp_path / "token"
    token.write_text("t0ken")
    settings = load(["serve", "--server", "127.0.0.1:1", "--webhook-token-file", str(token)])
    runner = aiohttp.web.AppRunner(root.create_app(settings, root.plan_targets(settings)),
                                   lingering_time=1.0)  # as serve() runs it
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /webhook/alertmanager HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer t0ken\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), timeout=10)
        assert status.startswith(b"HTTP/1.1 408"), status
        writer.close()
    finally:
        await runner.cleanup()
