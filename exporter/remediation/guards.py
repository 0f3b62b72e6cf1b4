"""The guard rails of remediation as pure functions over plain data: which decisions
exist (named, each exported from 0), `triage` from the alert and the shared state alone,
`judge` from what the API and a probe say now, and the rollout check.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..config import Remediation, Settings
from ..model import PodInfo, ProbeResult, ServiceInfo
from .alerts import Alert, parse_time


class Action(enum.StrEnum):
    SKIP = "skip"
    EVICT = "evict"
    DRY_RUN = "dry_run"
    DELETE = "delete"


# Every (action, result) a decision can have, exported from 0 so that the first real one
# shows up in rate() and increase() (a counter born at 1 shows no increase).
SKIP_RESULTS = ("disabled", "not_firing", "no_target", "not_coredns", "duplicate", "cooldown",
                "not_found", "terminating", "no_service", "replaced", "rollout", "min_ready",
                "healthy", "forbidden", "cannot_confirm", "same_pod", "too_many_pods")
# With static targets there is no remediator: the webhook's every alert is this skip.
NO_KUBERNETES = "no_kubernetes"
ACT_RESULTS = ("success", "blocked", "gone", "error")
# What raised a decision: an Alertmanager webhook, or the exporter's own probes.
TRIGGERS = ("webhook", "self")
# A successful act: the reason of its Event, and the verb of its Event and log line.
DONE = {
    Action.EVICT: ("CoreDNSPodEvicted", "evicted"),
    Action.DELETE: ("CoreDNSPodDeleted", "deleted"),
    Action.DRY_RUN: ("CoreDNSPodEvictionDryRun", "would evict (dry run)"),
}
BLOCKED = ("CoreDNSPodEvictionBlocked", "not evicted")


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    result: str  # a skip's reason, or the act's outcome: success, blocked, gone, error
    message: str
    namespace: str = ""
    pod: str = ""
    alert: str = ""
    at: float = 0.0
    trigger: str = "webhook"  # or self (remediation/selfheal.py)


def skip(result: str, message: str) -> Decision:
    return Decision(Action.SKIP, result, message)


@dataclass(frozen=True, slots=True)
class LeaseState:
    last_restart: datetime | None = None
    episodes: Mapping[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Facts:
    pod: PodInfo | None
    service: ServiceInfo | None
    others_ready: int
    rollout: str | None  # why a Deployment is mid-rollout, or None
    probe: ProbeResult | None = None  # the confirming UDP probe, once made


def triage(
    alert: Alert, lease: LeaseState, settings: Settings, now: datetime
) -> Decision | None:
    """Guards that need no API call; None when the alert goes on to `judge`."""
    r, d = settings.remediation, settings.discovery
    if r.mode is Remediation.OFF:
        return skip("disabled", "--remediation off")
    if alert.status != "firing":
        return skip("not_firing", f"alert is {alert.status}")
    namespace, pod = alert.label("namespace"), alert.label("pod")
    if not namespace or not pod:
        return skip("no_target", "the alert has no 'namespace' and 'pod' labels")
    if namespace != d.namespace:
        return skip("not_coredns", f"namespace {namespace} is not the CoreDNS namespace "
                                   f"{d.namespace}")
    if alert.episode in lease.episodes:
        return skip("duplicate", f"episode {alert.episode} already acted on at "
                                 f"{lease.episodes[alert.episode].isoformat()}")
    if lease.last_restart is not None:
        since = now - lease.last_restart
        if since < timedelta(seconds=r.cooldown):
            return skip("cooldown", f"last restart {since.total_seconds():.0f}s ago, "
                                    f"cooldown {r.cooldown:g}s")
    return None


def judge(alert: Alert, facts: Facts, settings: Settings) -> Decision | None:
    """Guards on the cluster as it is now. None: all pass but the confirming probe is due."""
    pod, service = facts.pod, facts.service
    d = settings.discovery
    if pod is None:
        return skip("not_found", f"pod {alert.label('namespace')}/{alert.label('pod')} "
                                 "does not exist")
    if pod.deleting:
        return skip("terminating", "the pod is already terminating")
    if service is None:
        return skip("no_service", f"Service {d.namespace}/{d.service} not found")
    if not pod.matches(service.selector):
        return skip("not_coredns", f"pod {pod.name} does not match the selector of "
                                   f"Service {d.namespace}/{d.service}")
    created = parse_time(pod.created)
    if created and alert.starts_at and created > alert.starts_at:
        return skip("replaced", f"pod {pod.name} was created at {pod.created}, after the "
                                f"alert started ({alert.starts_at_text}): not the pod it is about")
    if facts.rollout:
        return skip("rollout", facts.rollout)
    if facts.others_ready < settings.remediation.min_ready:
        return skip("min_ready", f"only {facts.others_ready} other Ready CoreDNS pod(s), "
                                 f"--min-ready is {settings.remediation.min_ready}")
    if facts.probe is None:
        return None
    if facts.probe.ok:
        return skip("healthy", f"the pod answers over UDP now: {facts.probe.reason}")
    action = Action.EVICT if settings.remediation.mode is Remediation.EVICT else Action.DRY_RUN
    return Decision(action, "pending", f"UDP probe now: {facts.probe.outcome.value} "
                                       f"({facts.probe.reason})")


def rollout_in_progress(deployments: list[Mapping[str, Any]], pod: PodInfo) -> str | None:
    """Why a Deployment selecting `pod` is mid-rollout, or None (matchLabels only)."""
    labels = dict(pod.labels)
    for dep in deployments:
        meta, spec, status = (dep.get(k) or {} for k in ("metadata", "spec", "status"))
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        if not match or any(labels.get(k) != v for k, v in match.items()):
            continue
        name = meta.get("name", "")
        want = spec.get("replicas", 1)
        if status.get("observedGeneration", 0) < meta.get("generation", 0):
            return f"Deployment {name}: a new generation is not yet observed"
        if status.get("updatedReplicas", 0) < want:
            return f"Deployment {name}: {status.get('updatedReplicas', 0)} of {want} " \
                   "replicas updated"
        if status.get("replicas", 0) > want:
            return f"Deployment {name}: old replicas still terminating"
    return None


