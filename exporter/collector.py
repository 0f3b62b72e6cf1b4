"""Prometheus metrics over the latest probe results.

`ResultStore` accumulates, per check, the last result, the latency histogram and the
outcome counters; `ProbeCollector` renders them on every scrape. Because the series are
built from the store's current checks, a check removed from the store (its target gone)
vanishes from the next scrape: a frozen 0 would page forever and a frozen 1 would hide an
outage. Process-level metrics (build info, rounds) are plain prometheus-client metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .probe import Outcome, ProbeResult
from .targets import TARGET_LABELS, Check, Target

# Latency buckets in seconds: a healthy cluster DNS answers in well under a millisecond
# from a pod on the same node and a few milliseconds across nodes; the top buckets
# separate "slow" from "about to time out" at the default 1 s timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# repr() of these values is what Go and prometheus-client print for `le`.
_BUCKET_LABELS = [repr(b) for b in BUCKETS] + ["+Inf"]
_OUTCOMES = tuple(o.value for o in Outcome)


@dataclass(slots=True)
class CheckState:
    last: ProbeResult
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    rtt_sum: float = 0.0
    outcome_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OUTCOMES, 0))


class ResultStore:
    """The latest result and the accumulated counts of every current check."""

    def __init__(self) -> None:
        self._states: dict[Check, CheckState] = {}
        self._active: set[Check] = set()

    def retain(self, checks: Iterable[Check]) -> None:
        """Make `checks` the current set: state of any other check is dropped now."""
        self._active = set(checks)
        for check in [c for c in self._states if c not in self._active]:
            del self._states[check]

    def record(self, check: Check, result: ProbeResult) -> None:
        # A probe that finishes after its target was removed must not bring it back.
        if check not in self._active:
            return
        state = self._states.get(check)
        if state is None:
            state = self._states[check] = CheckState(result)
        state.last = result
        state.outcome_counts[result.outcome.value] += 1
        if result.rtt_seconds is not None:
            state.bucket_counts[bisect.bisect_left(BUCKETS, result.rtt_seconds)] += 1
            state.rtt_sum += result.rtt_seconds

    def last(self, check: Check) -> ProbeResult | None:
        state = self._states.get(check)
        return state.last if state else None

    def latest(self) -> dict[Check, ProbeResult]:
        return {check: state.last for check, state in self._states.items()}

    def states(self) -> list[tuple[Check, CheckState]]:
        return list(self._states.items())


class ProbeCollector(Collector):
    """Per-check series, read from the store at scrape time."""

    def __init__(self, store: ResultStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        labels = list(TARGET_LABELS)
        success = GaugeMetricFamily(
            "dnsprobe_success",
            "1 if the most recent probe of this target, protocol and query passed, else 0.",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "dnsprobe_duration_seconds",
            "Round-trip time of probes that got a response (TCP includes the handshake).",
            labels=labels,
        )
        probes = CounterMetricFamily(
            "dnsprobe_probes",
            "Probes by outcome.",
            labels=[*labels, "result"],
        )
        for check, state in self._store.states():
            values = list(check.label_values())
            success.add_metric(values, 1.0 if state.last.ok else 0.0)
            cumulative, buckets = 0, []
            for le, count in zip(_BUCKET_LABELS, state.bucket_counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            duration.add_metric(values, buckets, state.rtt_sum)
            for outcome, count in state.outcome_counts.items():
                probes.add_metric([*values, outcome], float(count))
        yield success
        yield duration
        yield probes


class TargetInfoCollector(Collector):
    """`dnsprobe_target_info{ready}`: one series per pod target, from discovery."""

    def __init__(self, pod_ready: Mapping[Target, bool]) -> None:
        self._pod_ready = pod_ready  # kept current by discovery

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "dnsprobe_target_info",
            "One per pod target; label ready is the pod's Ready condition.",
            labels=[*TARGET_LABELS, "ready"],
        )
        for target, ready in list(self._pod_ready.items()):
            # protocol and query do not apply to a pod: empty, as DESIGN.md says.
            info.add_metric([*target.label_values(), "", "", "true" if ready else "false"], 1.0)
        yield info


@dataclass(frozen=True)
class ProcessMetrics:
    """Process-level metrics, registered once per registry."""

    rounds: Counter
    round_overruns: Counter
    remediations: Counter
    kube_errors: Counter
    discovery_synced: Gauge


def register(
    registry: CollectorRegistry,
    store: ResultStore,
    pod_ready: Mapping[Target, bool] | None = None,
) -> ProcessMetrics:
    registry.register(ProbeCollector(store))
    registry.register(TargetInfoCollector({} if pod_ready is None else pod_ready))
    Gauge(
        "dnsprobe_build_info", "Build information; always 1.", ["version"], registry=registry
    ).labels(version=__version__).set(1)
    return ProcessMetrics(
        rounds=Counter("dnsprobe_rounds", "Probe rounds started.", registry=registry),
        round_overruns=Counter(
            "dnsprobe_round_overruns",
            "Probe rounds skipped because the previous round had not dispatched all its "
            "probes by then (concurrency or interval too low for the targets).",
            registry=registry,
        ),
        remediations=Counter(
            "dnsprobe_remediations",
            "Remediation decisions, skips included.",
            ["action", "result"],
            registry=registry,
        ),
        kube_errors=Counter(
            "dnsprobe_kubernetes_errors",
            "Failed Kubernetes API calls, by resource and reason (unreachable, timeout, "
            "unauthorized, forbidden, not_found, error).",
            ["resource", "reason"],
            registry=registry,
        ),
        discovery_synced=Gauge(
            "dnsprobe_discovery_synced",
            "1 once Kubernetes discovery has listed the Service and its pods (always 1 for "
            "static targets).",
            registry=registry,
        ),
    )
