"""The latest probe results, the pod targets' readiness, and the process-level metrics.

`ResultStore` accumulates, per check, the last result, the latency histogram and the
outcome counters; `exposition.Exposition` renders them on every scrape. Because the
series are built from the store's current checks, a check removed from the store (its
target gone) vanishes from the next scrape: a frozen 0 would page forever and a frozen 1
would hide an outage. Process-level metrics (build info, rounds) are plain
prometheus-client metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from .. import __version__
from ..model import Check, Outcome, ProbeResult, Target

# Latency buckets in seconds: a healthy cluster DNS answers in well under a millisecond
# from a pod on the same node and a few milliseconds across nodes; the top buckets
# separate "slow" from "about to time out" at the default 1 s timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The `result` label values of dnsprobe_probes_total, in the order of CheckState's counts.
OUTCOMES = tuple(o.value for o in Outcome)
_OUTCOME_INDEX = {o: i for i, o in enumerate(Outcome)}


@dataclass(slots=True)
class CheckState:
    last: ProbeResult
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    rtt_sum: float = 0.0
    outcome_counts: list[int] = field(default_factory=lambda: [0] * len(OUTCOMES))
    # The check's labels as the exposition formats write them, made by the first scrape.
    labels: bytes = b""


class ResultStore:
    """The latest result and the accumulated counts of every current check."""

    def __init__(self) -> None:
        self._states: dict[Check, CheckState] = {}
        self._active: set[Check] = set()
        self._ready: dict[Target, bool] = {}

    def retain(self, checks: Iterable[Check], ready: Mapping[Target, bool] | None = None
               ) -> None:
        """Make `checks` the current set: state of any other check is dropped now.
        `ready`: the Ready condition of each pod target (dnsprobe_target_info)."""
        self._active = set(checks)
        self._ready = dict(ready or {})
        for check in [c for c in self._states if c not in self._active]:
            del self._states[check]

    def ready(self) -> list[tuple[Target, bool]]:
        """Each current pod target and its Ready condition."""
        return list(self._ready.items())

    def clear(self) -> None:
        """Drop every check's state; the current set stays (its series come back with
        the next results)."""
        self._states.clear()

    def record(self, check: Check, result: ProbeResult) -> bool:
        """Keep `result` as `check`'s latest; False (and nothing kept) when the check is
        not current: a probe that finishes after its target was removed must not bring it
        back."""
        if check not in self._active:
            return False
        state = self._states.get(check)
        if state is None:
            state = self._states[check] = CheckState(result)
        state.last = result
        state.outcome_counts[_OUTCOME_INDEX[result.outcome]] += 1
        if result.rtt_seconds is not None:
            state.bucket_counts[bisect.bisect_left(BUCKETS, result.rtt_seconds)] += 1
            state.rtt_sum += result.rtt_seconds
        return True

    def last(self, check: Check) -> ProbeResult | None:
        state = self._states.get(check)
        return state.last if state else None

    def latest(self) -> dict[Check, ProbeResult]:
        return {check: state.last for check, state in self._states.items()}

    def states(self) -> list[tuple[Check, CheckState]]:
        return list(self._states.items())


@dataclass(frozen=True)
class ProcessMetrics:
    """Process-level metrics, registered once per registry."""

    rounds: Counter
    round_overruns: Counter
    remediations: Counter
    kube_errors: Counter
    discovery_synced: Gauge
    mode: Gauge
    probe_pod_runs: Counter
    tasks: Gauge


def register(registry: CollectorRegistry) -> ProcessMetrics:
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
            "Remediation decisions, skips included, by what raised them (trigger: webhook, "
            "or self for the exporter's own probes with --self-remediate).",
            ["action", "result", "trigger"],
            registry=registry,
        ),
        kube_errors=Counter(
            "dnsprobe_kubernetes_errors",
            "Failed Kubernetes API calls, by resource and reason (unreachable, timeout, "
            "unauthorized, forbidden, not_found, throttled, error).",
            ["resource", "reason"],
            registry=registry,
        ),
        discovery_synced=Gauge(
            "dnsprobe_discovery_synced",
            "1 once Kubernetes discovery has listed the Service and its pods (always 1 for "
            "static targets).",
            registry=registry,
        ),
        mode=Gauge(
            "dnsprobe_mode_info",
            "How CoreDNS is reached (in-cluster, nodeport, probe-pod, port-forward; static "
            "for --server and the embedded default); always 1, once decided.",
            ["mode"],
            registry=registry,
        ),
        probe_pod_runs=Counter(
            "dnsprobe_probe_pod_runs",
            "Probe pods run in probe-pod mode, by result (success, failed).",
            ["result"],
            registry=registry,
        ),
        tasks=Gauge(
            "dnsprobe_event_loop_tasks",
            "Tasks on the exporter's event loop, at the scrape: flat in a healthy process "
            "(a growing count is a leak).",
            registry=registry,
        ),
    )
