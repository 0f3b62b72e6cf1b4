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
import enum
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from . import kube
from .collector import ProcessMetrics
from .config import Remediation, Settings
from .model import Outcome, ProbeResult, Protocol, Query
from .probe import probe
from .targets import PodInfo, ServiceInfo
from .webhook import Alert, Payload, parse_time


class CannotConfirm(Exception):
    """The pod could not be probed to confirm it is sick (the message says why): skip."""


# One confirming try made other than directly: (pod, queries) -> the first query's result
# that fails, else the last one's pass; CannotConfirm when the probing itself failed.
ConfirmThrough = Callable[[PodInfo, tuple[Query, ...]], Awaitable[ProbeResult]]

log = logging.getLogger(__name__)

LEASE_NAME = "coredns-health-exporter-remediation"
ANNOTATION = "coredns-health-exporter.io/"
# Episodes older than this are forgotten (a new firing has a new startsAt anyway).
EPISODE_MEMORY = timedelta(days=7)
MAX_EPISODES = 500
COMPONENT = "coredns-health-exporter"
CLAIM_ATTEMPTS = 5
RECENT = 50
# Seconds a webhook request waits for the exporter to decide its mode (modes.py) before it
# is answered 503, for Alertmanager to retry.
MODE_WAIT = 10.0
# Pods one payload may have judged (each costs API reads); the rest are skipped, and
# Alertmanager repeats them. One restart per cooldown makes more pointless anyway.
MAX_PODS_PER_PAYLOAD = 20


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


# -- the Lease ----------------------------------------------------------------------------


def _micro(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_state(obj: Mapping[str, Any] | None) -> LeaseState:
    if not obj:
        return LeaseState()
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    last = parse_time(notes.get(ANNOTATION + "last-restart", ""))
    episodes: dict[str, datetime] = {}
    try:
        raw = json.loads(notes.get(ANNOTATION + "episodes", "{}"))
        for key, value in (raw.items() if isinstance(raw, dict) else []):
            when = parse_time(value) if isinstance(value, str) else None
            if when:
                episodes[str(key)] = when
    except ValueError:
        pass  # unreadable state: start afresh, the cooldown still holds
    return LeaseState(last, episodes)


def lease_body(
    obj: Mapping[str, Any] | None, state: LeaseState, namespace: str, holder: str, now: datetime
) -> dict[str, Any]:
    keep = sorted(
        ((k, v) for k, v in state.episodes.items() if now - v < EPISODE_MEMORY),
        key=lambda kv: kv[1],
    )[-MAX_EPISODES:]
    notes = {ANNOTATION + "episodes": json.dumps({k: _micro(v) for k, v in keep})}
    if state.last_restart is not None:
        notes[ANNOTATION + "last-restart"] = _micro(state.last_restart)
    meta = dict((obj or {}).get("metadata") or {})
    meta.update(name=LEASE_NAME, namespace=namespace,
                annotations={**(meta.get("annotations") or {}), **notes})
    if state.last_restart is None:
        meta["annotations"].pop(ANNOTATION + "last-restart", None)
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
        "spec": {**((obj or {}).get("spec") or {}), "holderIdentity": holder,
                 "renewTime": _micro(now)},
    }


# -- acting -------------------------------------------------------------------------------


class ApiUnavailable(Exception):
    """The API could not be asked or told; Alertmanager should retry (503)."""


def identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"


class Remediator:
    def __init__(
        self,
        settings: Settings,
        client: kube.Client,
        metrics: ProcessMetrics,
        queries: Callable[[], tuple[Query, ...]],
    ) -> None:
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._queries = queries
        self._lock = asyncio.Lock()
        self.identity = identity()
        # Why a pod cannot be probed over UDP to confirm, so nothing may be restarted
        # (nodeport, port-forward); cleared once in-cluster or probe-pod mode is chosen
        # (modes.run).
        self.cannot_confirm: str | None = ("the exporter has not yet decided how it reaches "
                                           "CoreDNS (--mode)")
        self.decided = asyncio.Event()  # set by modes.run with cannot_confirm
        # How the pod is probed over UDP to confirm: directly (None), or, in probe-pod
        # mode, from a probe pod (modes.run). CannotConfirm from it is a skip, never an act.
        self.confirm_through: ConfirmThrough | None = None
        self.recent: deque[Decision] = deque(maxlen=RECENT)
        for result in SKIP_RESULTS:
            metrics.remediations.labels(action=Action.SKIP.value, result=result)
        for action in (Action.EVICT, Action.DRY_RUN, Action.DELETE):
            for result in ACT_RESULTS:
                metrics.remediations.labels(action=action.value, result=result)

    async def _api(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    async def handle(self, payload: Payload) -> list[Decision]:
        """A decision per alert, each logged and counted. ApiUnavailable: answer 503."""
        if payload.truncated_alerts:
            log.warning("Alertmanager truncated the payload",
                        extra={"fields": {"truncated_alerts": payload.truncated_alerts,
                                          "group_key": payload.group_key}})
        if not self.decided.is_set():
            try:
                await asyncio.wait_for(self.decided.wait(), MODE_WAIT)
            except TimeoutError:
                raise ApiUnavailable("the exporter has not yet decided how it reaches "
                                     "CoreDNS (see its log: mode)") from None
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
        except kube.ApiException as exc:
            if exc.status == 403:
                return skip("forbidden", self._problem(exc, "read", "pods, services or "
                                                                   "deployments")), None
            raise ApiUnavailable(self._problem(exc, "read", "pods")) from exc
        except Exception as exc:
            raise ApiUnavailable(self._problem(exc, "read", "pods")) from exc
        decision = judge(alert, facts, self._settings)
        if decision is None and self.cannot_confirm is not None:
            decision = skip("cannot_confirm", self.cannot_confirm)
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
        """Probe the pod over UDP now: every query, up to two tries; any pass is healthy.
        A try is made directly, or through `confirm_through` (probe-pod mode)."""
        assert pod is not None
        if not pod.ips:
            return ProbeResult(outcome=Outcome.ERROR, reason="the pod has no IP")
        try_once = self.confirm_through or self._probe_once
        result: ProbeResult | None = None
        for _ in range(2):
            result = await try_once(pod, self._queries())
            if result.ok:
                return result
        return result

    async def _probe_once(self, pod: PodInfo, queries: tuple[Query, ...]) -> ProbeResult:
        """One try from here: the first query that fails, else the last one's pass."""
        port, timeout = self._settings.discovery.dns_port, self._settings.probe.timeout
        result: ProbeResult | None = None
        for query in queries:
            result = await probe(pod.ips[0], port, Protocol.UDP, query, timeout)
            if not result.ok:
                break
        assert result is not None
        return result

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
        except kube.ApiException as exc:
            if exc.status in (404, 409):
                await self._release(alert, previous, keep_episode=True)
                return replace(decision, result="gone",
                               message=f"the pod is gone or was replaced ({exc.status}): "
                                       "nothing to do")
            if exc.status == 429:
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
                    if isinstance(exc2, kube.ApiException) and exc2.status in (403, 404, 409):
                        return replace(decision, action=Action.DELETE, result="error",
                                       message=self._problem(exc2, "delete", "pods"))
                    raise ApiUnavailable(self._problem(exc2, "delete", "pods")) from exc2
            else:
                await self._release(alert, previous, keep_episode=False)
                if exc.status == 403:
                    return replace(decision, result="error",
                                   message=self._problem(exc, "create", "pods/eviction"))
                raise ApiUnavailable(self._problem(exc, "create", "pods/eviction")) from exc
        except Exception as exc:
            await self._release(alert, previous, keep_episode=False)
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
            except kube.ApiException as exc:
                if exc.status != 409:
                    raise ApiUnavailable(self._problem(exc, "update", "leases")) from exc
                log.info("Lease changed by another replica; deciding again",
                         extra={"fields": {"alert": alert.name, "pod": alert.label("pod")}})
            except Exception as exc:
                raise ApiUnavailable(self._problem(exc, "update", "leases")) from exc
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
            except kube.ApiException as exc:
                if exc.status != 409:
                    break
            except Exception:  # giving back is best effort; logged below
                break
        log.warning("could not give back the remediation claim in the Lease; the cooldown "
                    "holds until it expires", extra={"fields": {"alert": alert.name}})

    async def _event(self, pod: PodInfo, alert: Alert, decision: Decision) -> None:
        reason, verb = DONE[decision.action] if decision.result == "success" else BLOCKED
        now = _micro(datetime.now(UTC))
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.name,
                               "namespace": pod.namespace, "uid": pod.uid},
            "reason": reason,
            "message": f"{verb} by {COMPONENT} on alert {alert.name or '(unnamed)'}: "
                       f"{decision.message}"[:1024],
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
                           pod=alert.label("pod"), alert=alert.name, at=time.time())
        self._metrics.remediations.labels(action=decision.action.value,
                                          result=decision.result).inc()
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
            "episode": alert.episode, "reason": decision.message,
        }})
        return decision


