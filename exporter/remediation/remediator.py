"""Remediation: the guard rails, and the acts (evict, Event, Lease). One place for all of it,
so that a later policy without Alertmanager reuses the same guards.

A decision is made in two pure steps, each tested on its own:

- `triage(alert, lease, ...)`: from the alert and the shared state alone: remediation
  off, not firing, no pod named, another namespace, an episode already acted on, cooldown.
- `judge(alert, facts, ...)`: from what the API and a probe say now: the pod exists and
  is not terminating, matches the CoreDNS Service's selector, is not newer than the alert
  (replaced), no Deployment mid-rollout, enough other Ready pods, and a UDP probe of the
  pod fails now (made directly, or from a probe pod in probe-pod mode). It returns None
  when only the probe is missing, so that no DNS is sent to a pod the other guards
  already rule out.

Acting claims the episode and the cooldown in a coordination.k8s.io Lease first, with
optimistic concurrency (resourceVersion), so that two replicas acting on the same alert
at once restart one pod; then evicts (the pod's UID as precondition), and gives the claim
back when nothing was restarted (404/409: the pod is gone; 429: a PodDisruptionBudget).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import typing
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from .. import kube
from ..config import Settings, default_query
from ..metrics.store import ProcessMetrics
from ..model import DNS_PORT, Endpoint, Kind, Outcome, PodInfo, ProbeResult, Query, Target
from .alerts import Alert, Payload
from .confirm import CannotConfirm, Confirmer, Impossible
from .guards import (
    ACT_RESULTS,
    BLOCKED,
    DONE,
    NO_KUBERNETES,
    SKIP_RESULTS,
    TRIGGERS,
    Action,
    Decision,
    Facts,
    LeaseState,
    judge,
    rollout_in_progress,
    skip,
    triage,
)
from .lease import LEASE_NAME, lease_body, lease_state, micro

log = logging.getLogger(__name__)


COMPONENT = "coredns-health-exporter"
CLAIM_ATTEMPTS = 5
RECENT = 50
# Pods one payload may have judged (each costs API reads); the rest are skipped, and
# Alertmanager repeats them. One restart per cooldown makes more pointless anyway.
MAX_PODS_PER_PAYLOAD = 20


class ApiUnavailable(Exception):
    """The API could not be asked or told; Alertmanager should retry (503)."""


def identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"


class Probed(typing.Protocol):
    """What is being probed now (the scheduler): its queries, and its pod targets'
    addresses and ports, are the confirmation's."""

    @property
    def queries(self) -> tuple[Query, ...]: ...

    @property
    def targets(self) -> list[Target]: ...


class Remediator:
    """Decides on each alert of a payload through the guards, and acts."""

    note: str | None = None
    def __init__(
        self,
        settings: Settings,
        client: kube.Client,
        metrics: ProcessMetrics,
        probed: Probed,
        confirm: Confirmer | Impossible,
    ) -> None:
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._probed = probed
        # How the pod is probed over UDP to confirm (confirm.py), chosen with the mode.
        self._confirm_with = confirm
        self._lock = asyncio.Lock()
        self.identity = identity()
        self.recent: deque[Decision] = deque(maxlen=RECENT)
        triggers = TRIGGERS if settings.remediation.self_remediate else ("webhook",)
        for trigger in triggers:
            for result in SKIP_RESULTS:
                metrics.remediations.labels(action=Action.SKIP.value, result=result,
                                            trigger=trigger)
            for action in (Action.EVICT, Action.DRY_RUN, Action.DELETE):
                for result in ACT_RESULTS:
                    metrics.remediations.labels(action=action.value, result=result,
                                                trigger=trigger)

    async def _api(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    async def handle(self, payload: Payload) -> list[Decision]:
        """A decision per alert, each logged and counted. ApiUnavailable: answer 503."""
        if payload.truncated_alerts:
            log.warning("Alertmanager truncated the payload",
                        extra={"fields": {"truncated_alerts": payload.truncated_alerts,
                                          "group_key": payload.group_key}})
        decisions = []
        judged: dict[tuple[str, str], Decision] = {}
        quiet: dict[str, int] = {}  # skips too many to log one by one, by result
        async with self._lock:
            lease: LeaseState | None = None
            for alert in payload.alerts:
                key = (alert.label("namespace"), alert.label("pod"))
                costly = (alert.status == "firing" and key[1] != ""
                          and key[0] == self._settings.discovery.namespace)
                if costly and key in judged:
                    decision = skip("same_pod", f"another alert of this payload for pod "
                                                f"{key[1]} was decided: {judged[key].result}")
                elif costly and len(judged) >= MAX_PODS_PER_PAYLOAD:
                    decision = skip("too_many_pods", f"only {MAX_PODS_PER_PAYLOAD} pods of a "
                                                     "payload are judged; Alertmanager "
                                                     "repeats the others")
                else:
                    if lease is None and alert.status == "firing":
                        lease = lease_state(await self._read_lease())
                    decision, pod = await self._decide(alert, lease or LeaseState())
                    if decision.action is not Action.SKIP and pod is not None:
                        decision = await self._act(alert, decision, pod)
                        lease = None  # acted: read the shared state again for the next
                    if costly:
                        judged[key] = decision
                    decisions.append(self._record(alert, decision))
                    continue
                quiet[decision.result] = quiet.get(decision.result, 0) + 1
                decisions.append(self._record(alert, decision, quiet=True))
        if quiet:
            log.info("remediation skipped", extra={"fields": {
                "action": Action.SKIP.value, "alerts": len(payload.alerts), **quiet,
                "reason": "further alerts of the payload for pods already judged, or beyond "
                          f"the first {MAX_PODS_PER_PAYLOAD} pods"}})
        return decisions

    async def _read_lease(self) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] | None = await self._api(
                self._client.get_lease, self._settings.discovery.namespace, LEASE_NAME)
            return lease
        except Exception as exc:
            raise ApiUnavailable(self._problem(exc, "get", "leases")) from exc

    def _problem(self, exc: BaseException, verb: str, resource: str) -> str:
        return kube.classify(exc, verb, resource, self._settings.discovery.namespace).message

    async def _decide(self, alert: Alert, lease: LeaseState) -> tuple[Decision, PodInfo | None]:
        """The decision, and the pod as read now (the one to act on)."""
        now = datetime.now(UTC)
        early = triage(alert, lease, self._settings, now)
        if early is not None:
            return early, None
        try:
            facts = await self._api(self._facts, alert)
        except Exception as exc:
            if kube.forbidden(exc):
                return skip("forbidden", self._problem(exc, "read", "pods, services or "
                                                                   "deployments")), None
            raise ApiUnavailable(self._problem(exc, "read", "pods")) from exc
        decision = judge(alert, facts, self._settings)
        if decision is None and isinstance(self._confirm_with, Impossible):
            decision = skip("cannot_confirm", self._confirm_with.reason)
        if decision is None:
            try:
                facts = replace(facts, probe=await self._confirm(facts.pod))
            except CannotConfirm as exc:
                return skip("cannot_confirm", str(exc)), facts.pod
            decision = judge(alert, facts, self._settings)
        assert decision is not None
        return decision, facts.pod

    def _facts(self, alert: Alert) -> Facts:
        d = self._settings.discovery
        pod = self._client.get_pod(d.namespace, alert.label("pod"))
        service = self._client.get_service(d.namespace, d.service)
        if pod is None or service is None or not pod.matches(service.selector):
            return Facts(pod, service, 0, None)
        others = [p for p in self._client.list_pods(d.namespace, service.selector)
                  if p.name != pod.name and p.ready and not p.deleting]
        rollout = rollout_in_progress(self._client.list_deployments(d.namespace), pod)
        return Facts(pod, service, len(others), rollout)

    async def _confirm(self, pod: PodInfo | None) -> ProbeResult | None:
        """Probe the pod over UDP now: every query being probed, up to two tries; any pass
        is healthy. A try is made the mode's way (confirm.py)."""
        assert pod is not None and not isinstance(self._confirm_with, Impossible)
        if not pod.ips:
            return ProbeResult(outcome=Outcome.ERROR, reason="the pod has no IP")
        queries = self._probed.queries or (default_query(self._settings),)
        endpoints = self._endpoints(pod)
        result: ProbeResult | None = None
        for _ in range(2):
            result = await self._confirm_with(pod, endpoints, queries)
            if result.ok:
                return result
        return result

    def _endpoints(self, pod: PodInfo) -> tuple[Endpoint, ...]:
        """Every address of the pod on the port it is probed on (the Service's targetPort
        resolved for it, or --dns-port), as the probe rounds have it; a pod not (yet) among
        the targets: its IPs on --dns-port, else 53."""
        known = tuple(t.endpoint for t in self._probed.targets
                      if t.kind is Kind.POD and t.pod == pod.name and t.namespace == pod.namespace)
        port = self._settings.discovery.dns_port or DNS_PORT
        return known or tuple(Endpoint(ip, port) for ip in pod.ips)

    async def _act(self, alert: Alert, decision: Decision, pod: PodInfo) -> Decision:
        ns, name, uid = pod.namespace, pod.name, pod.uid
        claimed = await self._claim(alert)
        if isinstance(claimed, Decision):
            return claimed
        previous = claimed
        dry = decision.action is Action.DRY_RUN
        try:
            await self._api(self._client.evict, ns, name, uid, dry_run=dry)
            done = replace(decision, result="success")
        except Exception as exc:
            if kube.gone(exc):
                await self._release(alert, previous, keep_episode=True)
                return replace(decision, result="gone",
                               message=f"the pod is gone or was replaced ({kube.status(exc)})"
                                       ": nothing to do")
            if kube.refused_by_budget(exc):
                if not self._settings.remediation.allow_delete:
                    await self._release(alert, previous, keep_episode=False)
                    blocked = replace(decision, result="blocked", message=(
                        "eviction refused (429): a PodDisruptionBudget allows no disruption "
                        f"now; not forced (no --allow-delete); {decision.message}"))
                    await self._event(pod, alert, blocked)
                    return blocked
                try:
                    await self._api(self._client.delete_pod, ns, name, uid, dry_run=dry)
                    done = replace(decision, action=Action.DELETE, result="success")
                except Exception as exc2:
                    await self._release(alert, previous, keep_episode=False)
                    if kube.forbidden(exc2) or kube.gone(exc2):
                        return replace(decision, action=Action.DELETE, result="error",
                                       message=self._problem(exc2, "delete", "pods"))
                    raise ApiUnavailable(self._problem(exc2, "delete", "pods")) from exc2
            else:
                await self._release(alert, previous, keep_episode=False)
                if kube.forbidden(exc):
                    return replace(decision, result="error",
                                   message=self._problem(exc, "create", "pods/eviction"))
                raise ApiUnavailable(self._problem(exc, "create", "pods/eviction")) from exc
        await self._event(pod, alert, done)
        return done

    async def _claim(self, alert: Alert) -> LeaseState | Decision:
        """Record the episode and the restart time in the Lease before acting.

        Returns the state before the claim (to give it back), or the decision to skip when
        another replica got there first (a conflict, then duplicate or cooldown).
        """
        ns = self._settings.discovery.namespace
        for _ in range(CLAIM_ATTEMPTS):
            obj = await self._read_lease()
            state = lease_state(obj)
            now = datetime.now(UTC)
            again = triage(alert, state, self._settings, now)
            if again is not None:
                return again
            claimed = LeaseState(now, {**state.episodes, alert.episode: now})
            try:
                await self._api(self._client.write_lease, ns,
                                lease_body(obj, claimed, ns, self.identity, now))
                return state
            except Exception as exc:
                if not kube.conflict(exc):
                    raise ApiUnavailable(self._problem(exc, "update", "leases")) from exc
                log.info("Lease changed by another replica; deciding again",
                         extra={"fields": {"alert": alert.name, "pod": alert.label("pod")}})
        raise ApiUnavailable(f"the Lease {ns}/{LEASE_NAME} kept changing under us")

    async def _release(self, alert: Alert, previous: LeaseState, keep_episode: bool) -> None:
        """Give back a claim when no pod was restarted; best effort, a few tries."""
        ns = self._settings.discovery.namespace
        for _ in range(CLAIM_ATTEMPTS):
            try:
                obj = await self._read_lease()
                state = lease_state(obj)
                episodes = dict(state.episodes)
                if not keep_episode:
                    episodes.pop(alert.episode, None)
                restored = LeaseState(previous.last_restart, episodes)
                await self._api(self._client.write_lease, ns,
                                lease_body(obj, restored, ns, self.identity, datetime.now(UTC)))
                return
            except Exception as exc:  # giving back is best effort; logged below
                if not kube.conflict(exc):
                    break
        log.warning("could not give back the remediation claim in the Lease; the cooldown "
                    "holds until it expires", extra={"fields": {"alert": alert.name}})

    async def _event(self, pod: PodInfo, alert: Alert, decision: Decision) -> None:
        reason, verb = DONE[decision.action] if decision.result == "success" else BLOCKED
        now = micro(datetime.now(UTC))
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.name,
                               "namespace": pod.namespace, "uid": pod.uid},
            "reason": reason,
            "message": f"{verb} by {COMPONENT} on alert {alert.name or '(unnamed)'} "
                       f"(trigger: {alert.trigger}): {decision.message}"[:1024],
            "type": "Warning",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.identity[:128],
            "firstTimestamp": now[:19] + "Z", "lastTimestamp": now[:19] + "Z", "count": 1,
        }
        try:
            await self._api(self._client.create_event, pod.namespace, body)
        except Exception as exc:  # the act stands without its Event; say so
            log.warning("could not write the Event", extra={"fields": {
                "pod": pod.name, "error": self._problem(exc, "create", "events")}})

    def _record(self, alert: Alert, decision: Decision, quiet: bool = False) -> Decision:
        """Count and keep the decision, and log it (a quiet one is summed up by the caller)."""
        decision = replace(decision, namespace=alert.label("namespace"),
                           pod=alert.label("pod"), alert=alert.name, at=time.time(),
                           trigger=alert.trigger)
        self._metrics.remediations.labels(action=decision.action.value,
                                          result=decision.result, trigger=alert.trigger).inc()
        self.recent.append(decision)
        if quiet:
            return decision
        if decision.action is Action.SKIP:
            level = logging.INFO
            msg = "remediation skipped"
        elif decision.result == "success":
            verb = DONE[decision.action][1]
            level = logging.WARNING
            msg = verb if decision.action is Action.DRY_RUN else f"{verb} pod"
        else:
            level, msg = logging.WARNING, "remediation not done"
        log.log(level, msg, extra={"fields": {
            "action": decision.action.value, "result": decision.result,
            "namespace": decision.namespace, "pod": decision.pod, "alert": decision.alert,
            "episode": alert.episode, "trigger": alert.trigger, "reason": decision.message,
        }})
        return decision


class NoRemediation:
    """The webhook's other end with static targets: no Kubernetes, so every alert is the
    one skip `no_kubernetes`, counted (exported from 0) and logged like any decision."""

    note = "remediation needs Kubernetes; this exporter probes static targets"

    def __init__(self, metrics: ProcessMetrics) -> None:
        self._metrics = metrics
        self.recent: deque[Decision] = deque(maxlen=RECENT)
        metrics.remediations.labels(action=Action.SKIP.value, result=NO_KUBERNETES,
                                    trigger="webhook")

    async def handle(self, payload: Payload) -> list[Decision]:
        decisions = [skip(NO_KUBERNETES, "remediation needs Kubernetes discovery; this "
                                         "exporter probes static targets")
                     for _ in payload.alerts]
        self._metrics.remediations.labels(action=Action.SKIP.value, result=NO_KUBERNETES,
                                          trigger="webhook").inc(len(decisions))
        log.info("remediation skipped: no Kubernetes", extra={"fields": {
            "alerts": len(decisions)}})
        return decisions
