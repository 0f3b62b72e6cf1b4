"""The result store and its exposition: values, histogram buckets, series that vanish with
their target (a removed check leaves nothing behind, even if a probe lands late), and the
fast renderer agreeing with prometheus-client's own, in both formats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from exporter.metrics.exposition import (
    DURATION_HELP,
    PIECE,
    PROBES_HELP,
    SUCCESS_HELP,
    TARGET_INFO_HELP,
    Exposition,
)
from exporter.metrics.store import BUCKETS, OUTCOMES, ResultStore, register
from exporter.model import (
    TARGET_LABELS,
    Check,
    Endpoint,
    Kind,
    Outcome,
    ProbeResult,
    Protocol,
    Query,
    Target,
)

QUERY = Query("kubernetes", "kubernetes.default.svc.cluster.local.")


def pod_check(name: str, protocol: Protocol = Protocol.UDP) -> Check:
    target = Target(Kind.POD, Endpoint("192.0.2.10", 53), "kube-system", "kube-dns", name, "n1")
    return Check(target, protocol, QUERY)


def labels(check: Check, **extra: str) -> dict[str, str]:
    t = check.target
    return {"kind": t.kind.value, "namespace": t.namespace, "service": t.service, "pod": t.pod,
            "node": t.node, "address": t.endpoint.address, "protocol": check.protocol.value,
            "query": check.query.label, **extra}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def render(exposition: Exposition, accept: str = "") -> str:
    return asyncio.run(exposition.render(accept)).decode()


def samples(text: str, openmetrics: bool = False) -> Samples:
    families = (
        om_families(text)  # type: ignore[no-untyped-call]
        if openmetrics
        else text_string_to_metric_families(text)
    )
    return {  # _created samples are creation times: they differ between any two registries
        (s.name, frozenset(s.labels.items())): s.value
        for f in families
        for s in f.samples
        if not s.name.endswith("_created")
    }


class Scrape:
    """get_sample_value() over what /metrics really serves."""

    def __init__(self, exposition: Exposition) -> None:
        self._exposition = exposition

    def __call__(self, name: str, labels: dict[str, str]) -> float | None:
        return samples(render(self._exposition)).get((name, frozenset(labels.items())))


def setup() -> tuple[Scrape, ResultStore]:
    registry = CollectorRegistry()
    store = ResultStore()
    register(registry)
    return Scrape(Exposition(store, registry)), store


def test_success_histogram_and_counters() -> None:
    get, store = setup()
    check = pod_check("a")
    store.retain([check])
    store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.0007))
    store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.003))
    store.record(check, ProbeResult(Outcome.TIMEOUT, "no response"))
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
    get, store = setup()
    kept, gone = pod_check("kept"), pod_check("gone")
    store.retain([kept, gone])
    for check in (kept, gone):
        store.record(check, ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=0.001))
    store.retain([kept])
    assert get("dnsprobe_success", labels(kept)) == 1
    assert get("dnsprobe_success", labels(gone)) is None
    assert get("dnsprobe_probes_total", labels(gone, result="success")) is None
    assert get("dnsprobe_duration_seconds_count", labels(gone)) is None


def test_late_result_for_a_removed_target_is_dropped() -> None:
    get, store = setup()
    gone = pod_check("gone")
    store.retain([])
    assert store.record(gone, ProbeResult(Outcome.TIMEOUT, "late")) is False
    assert get("dnsprobe_success", labels(gone)) is None


def test_no_result_yet_means_no_series() -> None:
    get, store = setup()
    check = pod_check("new")
    store.retain([check])
    assert get("dnsprobe_success", labels(check)) is None
    assert get("dnsprobe_build_info", {"version": "0.1.0"}) == 1


# --- the fast renderer against prometheus-client's own ---


class Reference(Collector):
    """The same families built with prometheus-client's metric families, as the exporter
    once served them: the renderer must produce exactly these samples."""

    def __init__(self, store: ResultStore, pod_ready: dict[Target, bool]) -> None:
        self._store, self._pod_ready = store, pod_ready

    def collect(self) -> Iterator[Metric]:
        names = list(TARGET_LABELS)
        success = GaugeMetricFamily("dnsprobe_success", SUCCESS_HELP, labels=names)
        duration = HistogramMetricFamily("dnsprobe_duration_seconds", DURATION_HELP,
                                         labels=names)
        probes = CounterMetricFamily("dnsprobe_probes", PROBES_HELP, labels=[*names, "result"])
        info = GaugeMetricFamily("dnsprobe_target_info", TARGET_INFO_HELP,
                                 labels=[*names, "ready"])
        for check, state in self._store.states():
            values = list(check.label_values())
            success.add_metric(values, 1.0 if state.last.ok else 0.0)
            cumulative, buckets = 0, []
            les = [*(repr(b) for b in BUCKETS), "+Inf"]
            for le, count in zip(les, state.bucket_counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            duration.add_metric(values, buckets, state.rtt_sum)
            for outcome, count in zip(OUTCOMES, state.outcome_counts, strict=True):
                probes.add_metric([*values, outcome], float(count))
        for target, ready in self._pod_ready.items():
            info.add_metric([*target.label_values(), "", "", str(ready).lower()], 1.0)
        yield from (success, duration, probes, info)


def _awkward_store(copies: int = 1) -> tuple[ResultStore, dict[Target, bool]]:
    """Label values that need escaping, every outcome, sums that are not round. With
    `copies`, that many pods of each name, the first with the shortest labels (pieces of
    the body are sized by the first check's labels)."""
    store = ResultStore()
    names = ['plain', 'quote"d', "back\\slash", "new\nline", "ünïcode", ""]
    suffixes = [""] + [f"-{i:03d}-{'x' * (i % 40)}" for i in range(1, copies)]
    checks = [pod_check(n + s, p) for s in suffixes for n in names for p in Protocol]
    pod_ready = {check.target: i % 2 == 0 for i, check in enumerate(checks)}
    store.retain(checks, pod_ready)
    for i, check in enumerate(checks):
        for j, outcome in enumerate(Outcome):
            rtt = None if outcome is Outcome.TIMEOUT else 0.0001 * (i + 1) * (j + 1) ** 3
            store.record(check, ProbeResult(outcome, "x", rtt_seconds=rtt))
    return store, pod_ready


def _both(accept: str, encoder: Callable[[CollectorRegistry], bytes],
          openmetrics: bool, copies: int = 1) -> tuple[Samples, Samples, str]:
    store, pod_ready = _awkward_store(copies)
    registry = CollectorRegistry()
    register(registry)
    reference = CollectorRegistry()
    reference.register(Reference(store, pod_ready))
    register(reference)
    ours = render(Exposition(store, registry), accept)
    theirs = encoder(reference).decode()
    return samples(ours, openmetrics), samples(theirs, openmetrics), ours


def test_text_format_matches_prometheus_client() -> None:
    ours, theirs, body = _both("", generate_latest, False)
    assert len(theirs) > 12 * 24
    assert ours == theirs
    assert body.count("# TYPE dnsprobe_probes_total counter") == 1


def test_openmetrics_matches_prometheus_client() -> None:
    accept = "application/openmetrics-text; version=1.0.0"
    ours, theirs, body = _both(accept, om_exposition.generate_latest, True)
    assert ours == theirs
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    assert "# TYPE dnsprobe_probes counter" in body


def test_a_body_of_many_pieces_matches_prometheus_client() -> None:
    # 300 checks: the histogram and the counters span several pieces each, the last of
    # them partial, and the later checks' labels are longer than the first's.
    ours, theirs, _ = _both("", generate_latest, False, copies=25)
    per_check = [k for k in theirs if k[0] != "dnsprobe_target_info" and "pod" in dict(k[1])]
    assert len(per_check) == 300 * (1 + len(BUCKETS) + 3 + len(OUTCOMES))
    assert ours == theirs
    store, _ = _awkward_store(25)
    pieces = asyncio.run(_pieces(Exposition(store, CollectorRegistry())))
    assert len(pieces) > 20
    assert max(len(p) for p in pieces) < 2 * PIECE


async def _pieces(exposition: Exposition) -> list[bytes]:
    return [piece async for piece in exposition.stream()]
