"""The collector over the result store: values, histogram buckets, and series that vanish
with their target (a removed check leaves nothing behind, even if a probe lands late)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from exporter.collector import ResultStore, register
from exporter.probe import Outcome, ProbeResult, Protocol, Query
from exporter.targets import Check, Endpoint, Kind, Target

QUERY = Query("kubernetes", "kubernetes.default.svc.cluster.local.")


def pod_check(name: str, protocol: Protocol = Protocol.UDP) -> Check:
    target = Target(Kind.POD, Endpoint("192.0.2.10", 53), "kube-system", "kube-dns", name, "n1")
    return Check(target, protocol, QUERY)


def labels(check: Check, **extra: str) -> dict[str, str]:
    t = check.target
    return {"kind": t.kind.value, "namespace": t.namespace, "service": t.service, "pod": t.pod,
            "node": t.node, "address": t.endpoint.address, "protocol": check.protocol.value,
            "query": check.query.label, **extra}


def setup() -> tuple[CollectorRegistry, ResultStore]:
    registry = CollectorRegistry()
    store = ResultStore()
    register(registry, store)
    return registry, store


def test_success_histogram_and_counters() -> None:
    registry, store = setup()
    check = pod_check("a")
    store.retain([check])
    store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.0007))
    store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.003))
    store.record(check, ProbeResult(Outcome.TIMEOUT, "no response"))
    get = registry.get_sample_value
    assert get("dnsprobe_success", labels(check)) == 0
    assert get("dnsprobe_probes_total", labels(check, result="success")) == 2
    assert get("dnsprobe_probes_total", labels(check, result="timeout")) == 1
    assert get("dnsprobe_probes_total", labels(check, result="error")) == 0
    # timeouts have no round trip: only the two answers are in the histogram
    assert get("dnsprobe_duration_seconds_count", labels(check)) == 2
    assert get("dnsprobe_duration_seconds_sum", labels(check)) == 0.0037
    assert get("dnsprobe_duration_seconds_bucket", labels(check, le="0.0005")) == 0
    assert get("dnsprobe_duration_seconds_bucket", labels(check, le="0.001")) == 1
    assert get("dnsprobe_duration_seconds_bucket", labels(check, le="0.005")) == 2
    assert get("dnsprobe_duration_seconds_bucket", labels(check, le="+Inf")) == 2


def test_removed_target_loses_every_series_at_once() -> None:
    registry, store = setup()
    kept, gone = pod_check("kept"), pod_check("gone")
    store.retain([kept, gone])
    for check in (kept, gone):
        store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.001))
    store.retain([kept])
    get = registry.get_sample_value
    assert get("dnsprobe_success", labels(kept)) == 1
    assert get("dnsprobe_success", labels(gone)) is None
    assert get("dnsprobe_probes_total", labels(gone, result="success")) is None
    assert get("dnsprobe_duration_seconds_count", labels(gone)) is None


def test_late_result_for_a_removed_target_is_dropped() -> None:
    registry, store = setup()
    gone = pod_check("gone")
    store.retain([])
    store.record(gone, ProbeResult(Outcome.TIMEOUT, "late"))
    assert registry.get_sample_value("dnsprobe_success", labels(gone)) is None


def test_no_result_yet_means_no_series() -> None:
    registry, store = setup()
    check = pod_check("new")
    store.retain([check])
    assert registry.get_sample_value("dnsprobe_success", labels(check)) is None
    assert registry.get_sample_value("dnsprobe_build_info", {"version": "0.1.0"}) == 1
