"""The self-remediation rule on its own (remediation/selfheal.py's Tracker): which pods
become suspect from the results the scheduler recorded. Plain data in, suspects out; the
acts it leads to are tested against the real API server in tests/test_remediation.py."""

from __future__ import annotations

from dataclasses import replace

from exporter.model import Check, Endpoint, Kind, Outcome, ProbeResult, Protocol, Query, Target
from exporter.remediation.selfheal import SUSPECT_AFTER, Tracker

QUERY = Query("kubernetes", "kubernetes.default.svc.cluster.local.", "A")


def check(pod: str, protocol: Protocol = Protocol.UDP, kind: Kind = Kind.POD) -> Check:
    host = f"10.244.0.{ord(pod[-1])}"
    return Check(Target(kind, Endpoint(host, 53), "kube-system", "kube-dns" if kind is
                        Kind.SERVICE else "", pod if kind is Kind.POD else ""),
                 protocol, QUERY)


def result(ok: bool, at: float, rtt: float = 0.001) -> ProbeResult:
    if ok:
        return ProbeResult(Outcome.SUCCESS, "ok", rtt_seconds=rtt, started_at=at)
    return ProbeResult(Outcome.TIMEOUT, "no response within 1s", started_at=at)


def rounds(tracker: Tracker, outcomes: dict[Check, list[bool]], rtt: float = 0.001,
           start: float = 1000.0) -> tuple[list[Check], frozenset[str]]:
    """Feed one result per check per round (rounds 5 s apart from `start`), looking after
    each."""
    found: tuple[list[Check], frozenset[str]] = ([], frozenset())
    for i in range(max(len(v) for v in outcomes.values())):
        latest = {c: result(v[i], start + 5 * i, rtt) for c, v in outcomes.items()
                  if i < len(v)}
        tracker.observe(latest)
        found = tracker.suspects(latest)[:2]
    return found


def test_a_pod_failing_twice_in_a_row_while_another_answers_is_suspect() -> None:
    sick, healthy = check("a"), check("b")
    assert SUSPECT_AFTER == 2
    tracker = Tracker()
    assert rounds(tracker, {sick: [False], healthy: [True]}) == ([], frozenset())
    assert rounds(tracker, {sick: [False], healthy: [True]}, start=1005.0) == ([sick], frozenset())
    assert tracker.streaks[sick].since == 1000.0  # the streak's first failure


def test_a_success_between_failures_starts_the_count_again() -> None:
    sick, healthy = check("a"), check("b")
    tracker = Tracker()
    suspects, _ = rounds(tracker, {sick: [False, True, False], healthy: [True] * 3})
    assert suspects == []


def test_the_same_result_seen_twice_counts_once() -> None:
    sick, healthy = check("a"), check("b")
    tracker = Tracker()
    latest = {sick: result(False, 1000.0), healthy: result(True, 1000.0)}
    for _ in range(5):  # looked at every second, between rounds
        tracker.observe(latest)
    assert tracker.suspects(latest)[:2] == ([], frozenset())
    assert tracker.streaks[sick].failed == 1


def test_every_pod_failing_is_a_shared_cause_and_suspects_none() -> None:
    a, b, c = check("a"), check("b"), check("c")
    suspects, shared = rounds(Tracker(), {a: [False] * 4, b: [False] * 4, c: [False] * 4})
    assert suspects == [] and shared == {"kubernetes"}


def test_an_external_query_every_pod_fails_is_the_upstreams_and_suspects_none() -> None:
    """The upstreams down: every pod fails example.org while answering the cluster's own
    name. Another pod passing *some* query must not make any of them suspect."""
    external = Query("example.org", "example.org.", "A")
    pods = [check(p) for p in "abc"]
    outside = [replace(c, query=external) for c in pods]
    tracker = Tracker()
    outcomes = {c: [True] * 4 for c in pods} | {c: [False] * 4 for c in outside}
    suspects, shared = rounds(tracker, outcomes)
    assert suspects == [] and shared == {"example.org"}
    latest = {c: result(c in pods, 2000.0) for c in pods + outside}
    assert tracker.suspects(latest).passing == {"kubernetes"}
    # One pod failing it first while the others still answer it (their caches hold the
    # name longer): that pod still answers the cluster's name, it is not suspect.
    one = {c: [True] * 4 for c in pods + outside[1:]} | {outside[0]: [False] * 4}
    assert rounds(Tracker(), one) == ([], frozenset())
    # A pod failing both queries while the others answer them: suspect, once.
    dead = {c: [True] * 4 for c in pods[1:] + outside[1:]} | {
        pods[0]: [False] * 4, outside[0]: [False] * 4}
    [suspect], shared = rounds(Tracker(), dead)
    assert suspect.target.pod == "a" and not shared


def test_a_slow_pod_that_answers_is_never_suspect() -> None:
    slow, other = check("a"), check("b")
    suspects, shared = rounds(Tracker(), {slow: [True] * 20, other: [True] * 20}, rtt=0.9)
    assert suspects == [] and not shared


def test_only_pod_targets_over_udp_are_judged() -> None:
    """TCP failing, or the Service's IP failing, says nothing of one pod's UDP."""
    tcp, service, healthy = check("a", Protocol.TCP), check("s", kind=Kind.SERVICE), check("b")
    tracker = Tracker()
    suspects, _ = rounds(tracker, {tcp: [False] * 3, service: [False] * 3, healthy: [True] * 3})
    assert suspects == [] and set(tracker.streaks) == {healthy}


def test_a_pod_gone_from_the_results_is_forgotten() -> None:
    sick, healthy = check("a"), check("b")
    tracker = Tracker()
    rounds(tracker, {sick: [False], healthy: [True]})
    tracker.observe({healthy: result(True, 2000.0)})
    assert set(tracker.streaks) == {healthy}
