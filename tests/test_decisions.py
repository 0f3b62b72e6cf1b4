"""The remediation decision as pure functions (triage, judge, the Lease's state, rollout
detection) and the webhook payload parser, each rule on its own."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from exporter.config import Remediation, RemediationSettings, Settings
from exporter.model import Outcome, PodInfo, ProbeResult, ServiceInfo
from exporter.remediation.alerts import Alert, PayloadError, parse_payload, parse_time
from exporter.remediation.guards import (
    Action,
    Facts,
    LeaseState,
    judge,
    rollout_in_progress,
    triage,
)
from exporter.remediation.lease import ANNOTATION, lease_body, lease_state
from exporter.web.auth import TokenFile, authorized

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SELECTOR = (("k8s-app", "kube-dns"),)
SETTINGS = replace(Settings(), remediation=RemediationSettings(mode=Remediation.EVICT))


def make_alert(status: str = "firing", namespace: str = "kube-system", pod: str = "coredns-a",
               starts: datetime = NOW - timedelta(minutes=3)) -> Alert:
    labels = {"alertname": "CoreDNSPodUDPFailing", "namespace": namespace, "pod": pod}
    text = starts.isoformat().replace("+00:00", "Z")
    return Alert(status, tuple(sorted((k, v) for k, v in labels.items() if v)),
                 starts, text, "fp1")


POD = PodInfo("kube-system", "coredns-a", "uid-a", ("10.244.0.2",), "node-1", True, "Running",
              SELECTOR, False, (NOW - timedelta(days=1)).isoformat())
SERVICE = ServiceInfo("kube-system", "kube-dns", ("10.96.0.10",), 53, SELECTOR)
FAILING = ProbeResult(Outcome.TIMEOUT, "no response within 1s")
PASSING = ProbeResult(Outcome.SUCCESS, "NOERROR, A 10.96.0.1")
FACTS = Facts(POD, SERVICE, others_ready=1, rollout=None, probe=FAILING)


# -- triage ---------------------------------------------------------------------------------

def test_triage_lets_a_firing_alert_for_the_coredns_namespace_through() -> None:
    assert triage(make_alert(), LeaseState(), SETTINGS, NOW) is None


@pytest.mark.parametrize(
    ("alert", "lease", "settings", "result"),
    [
        (make_alert(), LeaseState(), replace(SETTINGS, remediation=RemediationSettings(
            mode=Remediation.OFF)), "disabled"),
        (make_alert(status="resolved"), LeaseState(), SETTINGS, "not_firing"),
        (make_alert(pod=""), LeaseState(), SETTINGS, "no_target"),
        (make_alert(namespace="default"), LeaseState(), SETTINGS, "not_coredns"),
        (make_alert(), LeaseState(None, {make_alert().episode: NOW}), SETTINGS, "duplicate"),
        (make_alert(), LeaseState(NOW - timedelta(minutes=4)), SETTINGS, "cooldown"),
    ],
    ids=["off", "resolved", "no-pod-label", "other-namespace", "same-episode", "cooldown"],
)
def test_triage_skips(alert: Alert, lease: LeaseState, settings: Settings, result: str) -> None:
    decision = triage(alert, lease, settings, NOW)
    assert decision is not None
    assert (decision.action, decision.result) == (Action.SKIP, result)


def test_cooldown_ends() -> None:
    assert triage(make_alert(), LeaseState(NOW - timedelta(minutes=6)), SETTINGS, NOW) is None


def test_a_new_episode_of_the_same_alert_is_not_a_duplicate() -> None:
    earlier = make_alert(starts=NOW - timedelta(hours=2))
    lease = LeaseState(None, {earlier.episode: NOW - timedelta(hours=2)})
    assert triage(make_alert(), lease, SETTINGS, NOW) is None


# -- judge ----------------------------------------------------------------------------------

def test_judge_evicts_a_failing_pod_when_every_guard_passes() -> None:
    decision = judge(make_alert(), FACTS, SETTINGS)
    assert decision is not None
    assert decision.action is Action.EVICT
    assert "timeout" in decision.message


def test_dry_run_mode_decides_a_dry_run() -> None:
    dry = replace(SETTINGS, remediation=RemediationSettings(mode=Remediation.DRY_RUN))
    decision = judge(make_alert(), FACTS, dry)
    assert decision is not None and decision.action is Action.DRY_RUN


def test_judge_asks_for_the_probe_only_when_everything_else_passes() -> None:
    assert judge(make_alert(), replace(FACTS, probe=None), SETTINGS) is None
    outside = replace(FACTS, probe=None, pod=replace(POD, labels=(("app", "x"),)))
    decision = judge(make_alert(), outside, SETTINGS)
    assert decision is not None and decision.result == "not_coredns"


@pytest.mark.parametrize(
    ("facts", "result"),
    [
        (replace(FACTS, pod=None), "not_found"),
        (replace(FACTS, pod=replace(POD, deleting=True)), "terminating"),
        (replace(FACTS, service=None), "no_service"),
        (replace(FACTS, pod=replace(POD, labels=(("k8s-app", "other"),))), "not_coredns"),
        (replace(FACTS, pod=replace(POD, created=NOW.isoformat())), "replaced"),
        (replace(FACTS, rollout="Deployment coredns: 1 of 2 replicas updated"), "rollout"),
        (replace(FACTS, others_ready=0), "min_ready"),
        (replace(FACTS, probe=PASSING), "healthy"),
    ],
    ids=["gone", "terminating", "no-service", "selector", "replaced", "rollout", "min-ready",
         "healthy-now"],
)
def test_judge_skips(facts: Facts, result: str) -> None:
    decision = judge(make_alert(), facts, SETTINGS)
    assert decision is not None
    assert (decision.action, decision.result) == (Action.SKIP, result)


def test_min_ready_is_configurable() -> None:
    two = replace(SETTINGS, remediation=RemediationSettings(mode=Remediation.EVICT, min_ready=2))
    decision = judge(make_alert(), FACTS, two)
    assert decision is not None and decision.result == "min_ready"


# -- rollouts -------------------------------------------------------------------------------

def deployment(generation: int = 2, observed: int = 2, replicas: int = 2, updated: int = 2,
               current: int = 2, match: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "coredns", "generation": generation},
        "spec": {"replicas": replicas,
                 "selector": {"matchLabels": match or {"k8s-app": "kube-dns"}}},
        "status": {"observedGeneration": observed, "replicas": current,
                   "updatedReplicas": updated},
    }


@pytest.mark.parametrize(
    ("dep", "busy"),
    [
        (deployment(), False),
        (deployment(observed=1), True),
        (deployment(updated=1), True),
        (deployment(current=3), True),
        (deployment(updated=0, match={"app": "other"}), False),
    ],
    ids=["rolled-out", "new-generation", "half-updated", "old-replicas", "other-deployment"],
)
def test_rollout_detection(dep: dict[str, Any], busy: bool) -> None:
    assert (rollout_in_progress([dep], POD) is not None) is busy


# -- the Lease --------------------------------------------------------------------------------

def test_lease_state_round_trips_and_forgets_old_episodes() -> None:
    state = LeaseState(NOW, {"fp@1": NOW - timedelta(days=8), "fp@2": NOW})
    body = lease_body(None, state, "kube-system", "me/1", NOW)
    assert body["metadata"]["name"] == "coredns-health-exporter-remediation"
    assert body["spec"]["holderIdentity"] == "me/1"
    back = lease_state(body)
    assert back.last_restart == NOW
    assert set(back.episodes) == {"fp@2"}


def test_unreadable_lease_state_starts_afresh() -> None:
    obj = {"metadata": {"annotations": {ANNOTATION + "episodes": "{not json",
                                        ANNOTATION + "last-restart": "yesterday"}}}
    assert lease_state(obj) == LeaseState()


def test_lease_body_keeps_the_resource_version_for_optimistic_concurrency() -> None:
    obj = {"metadata": {"name": "x", "resourceVersion": "42", "annotations": {"a": "b"}},
           "spec": {"leaseTransitions": 3}}
    body = lease_body(obj, LeaseState(), "kube-system", "me/1", NOW)
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["metadata"]["annotations"]["a"] == "b"
    assert ANNOTATION + "last-restart" not in body["metadata"]["annotations"]
    assert body["spec"]["leaseTransitions"] == 3


# -- the payload ------------------------------------------------------------------------------

def test_payload_v4_parses_and_ignores_unknown_fields() -> None:
    raw = {
        "version": "4", "status": "firing", "receiver": "r", "groupKey": "g",
        "truncatedAlerts": 2, "unknown": [1, 2],
        "alerts": [{"status": "firing", "labels": {"pod": "p", "namespace": "n"},
                    "annotations": {}, "startsAt": "2026-11-24T11:57:00.123456789Z",
                    "fingerprint": "abc", "extra": True}],
    }
    payload = parse_payload(json.dumps(raw).encode())
    assert payload.truncated_alerts == 2
    [a] = payload.alerts
    assert a.label("pod") == "p" and a.fingerprint == "abc"
    assert a.starts_at == datetime(2026, 11, 24, 11, 57, 0, 123456, tzinfo=UTC)
    assert a.episode == "abc@2026-11-24T11:57:00.123456789Z"


def test_missing_fingerprint_is_derived_from_the_labels() -> None:
    raw = {"version": "4", "alerts": [{"status": "firing", "labels": {"pod": "p"}}]}
    first = parse_payload(json.dumps(raw).encode()).alerts[0]
    second = parse_payload(json.dumps(raw).encode()).alerts[0]
    assert first.fingerprint and first.fingerprint == second.fingerprint


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "not JSON"),
        (b"[" * 100000, "not JSON"),
        (b'"text"', "expected a JSON object"),
        (b'{"version": "3", "alerts": []}', "version"),
        (b'{"version": 4, "alerts": []}', "version"),
        (b'{"version": "4"}', "alerts: expected a list"),
        (b'{"version": "4", "alerts": [1]}', "alerts[0]: expected an object"),
        (b'{"version": "4", "alerts": [{"status": "x"}]}', "alerts[0].status"),
        (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"a": 1}}]}',
         "alerts[0].labels.a"),
    ],
)
def test_bad_payloads_say_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(PayloadError, match=says.replace("[", r"\[").replace("]", r"\]")):
        parse_payload(raw)


def test_times_as_alertmanager_and_kubernetes_write_them() -> None:
    assert parse_time("2026-11-24T12:00:00Z") == NOW
    assert parse_time("2026-11-24T13:00:00+01:00") == NOW
    assert parse_time("0001-01-01T00:00:00Z") == datetime(1, 1, 1, tzinfo=UTC)
    assert parse_time("soon") is None and parse_time("") is None


# -- the token --------------------------------------------------------------------------------

def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = TokenFile(str(path))
    assert tokens.current() == "one"
    path.write_text("two-longer\n")
    assert tokens.current() == "two-longer"
    path.write_text("")
    assert tokens.current() is None and tokens.problem == f"{path} is empty"
    path.unlink()
    assert tokens.current() is None and "cannot read" in str(tokens.problem)
    assert TokenFile(None).current() is None


def test_bearer_comparison() -> None:
    assert authorized("Bearer s3cret", "s3cret")
    assert authorized("bearer s3cret", "s3cret")
    assert not authorized("Bearer s3cre", "s3cret")
    assert not authorized("Basic s3cret", "s3cret")
    assert not authorized("", "s3cret")


def test_every_skip_result_in_the_code_is_in_the_list_exported_from_zero() -> None:
    """Every skip the remediator can decide is in SKIP_RESULTS (each exported from 0 by
    the remediator; tests/test_kubernetes.py and test_serve.py read them from /metrics),
    and the static exporter's one, no_kubernetes, is named apart."""
    import re

    from exporter.remediation import guards, remediator

    source = "".join(Path(str(m.__file__)).read_text() for m in (guards, remediator))
    used = set(re.findall(r'skip\("(\w+)"', source))
    assert used == set(guards.SKIP_RESULTS)
    assert guards.NO_KUBERNETES not in guards.SKIP_RESULTS
    assert "skip(NO_KUBERNETES" in Path(remediator.__file__).read_text()
