"""Which way to reach CoreDNS: in-cluster, nodeport, probe-pod or port-forward.

The 2020 design proposal behind this product names four deployments, because teams differ
in what they allow (docs/modes.md):

- in-cluster: in a pod (or anywhere pod IPs route), probe Service and pod IPs directly;
- nodeport: outside, CoreDNS exposed by NodePort or LoadBalancer Services: probe node
  addresses x node ports and load-balancer ingress IPs;
- probe-pod: outside, allowed to create pods: a short-lived pod probes from inside;
- port-forward: outside with neither: DNS over TCP through the API server's port-forward.

`--mode auto` tries them in that order. Each needs permissions, asked of the API server by
SelfSubjectAccessReview, and the first two need the network to reach what they probe,
found by probing it once. The decision and the reason for skipping each other mode are
logged; an explicitly named mode is used as named, with a warning for any permission it
lacks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from . import kube
from .collector import ProcessMetrics
from .config import Mode, Settings
from .discovery import Discovery
from .model import Protocol, Query
from .portforward import PortForward
from .probe import probe
from .probepod import ProbePod, ProbePodError
from .probepod import confirm as confirm_in_probe_pod
from .remediate import Remediator
from .scheduler import Scheduler
from .targets import Target, exposed_targets, kubernetes_targets

log = logging.getLogger(__name__)

ORDER = (Mode.IN_CLUSTER, Mode.NODEPORT, Mode.PROBE_POD, Mode.PORT_FORWARD)
# Targets probed to decide whether a mode's addresses are reachable from here.
REACH_SAMPLE = 4


@dataclass(frozen=True, slots=True)
class Need:
    """One permission a mode needs."""

    verb: str
    resource: str
    namespace: str  # "" for a cluster-scoped resource
    subresource: str = ""

    def __str__(self) -> str:
        what = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {what} " + (f"in {self.namespace}" if self.namespace
                                         else "(cluster-wide)")


def needs(mode: Mode, settings: Settings) -> list[Need]:
    ns, pp = settings.discovery.namespace, settings.probe_pod.namespace
    watch = [Need(v, r, ns) for r in ("services", "pods") for v in ("list", "watch")]
    if mode is Mode.IN_CLUSTER:
        return watch
    if mode is Mode.NODEPORT:
        return [Need(v, "services", ns) for v in ("list", "watch")] + [
            Need(v, "nodes", "") for v in ("list", "watch")]
    if mode is Mode.PROBE_POD:
        return watch + [Need(v, "pods", pp) for v in ("create", "get", "list", "watch",
                                                      "delete")] + [
            Need("get", "pods", pp, "log")]
    # WebSocket port-forward is a GET: Kubernetes before 1.30 authorizes it as `get`,
    # later releases ask for `create` too.
    return watch + [Need(v, "pods", ns, "portforward") for v in ("get", "create")]


@dataclass(frozen=True)
class Selection:
    mode: Mode
    reason: str
    skipped: dict[str, str]  # mode -> why it was not used


class NoMode(Exception):
    """No mode can work with these credentials from here; the message says why."""


def _missing(client: kube.Client, wanted: list[Need]) -> list[Need]:
    missing = []
    for need in wanted:
        allowed, _ = client.allowed(need.verb, need.resource, need.namespace,
                                    subresource=need.subresource)
        if not allowed:
            missing.append(need)
    return missing


def _coredns_targets(settings: Settings, client: kube.Client, mode: Mode) -> list[Target]:
    """Targets of in-cluster or nodeport mode, listed once, to try reaching them."""
    d = settings.discovery
    found, _ = client.list_objects("services", d.namespace, convert=kube.service_info,
                                   field_selector=f"metadata.name={d.service}")
    if not found:
        return []
    service = found[0]
    if mode is Mode.IN_CLUSTER:
        pods = client.list_pods(d.namespace, service.selector) if service.selector else []
        targets, _ = kubernetes_targets(service, pods, d.dns_port)
        return targets
    services, _ = client.list_objects("services", d.namespace, convert=kube.service_info)
    nodes, _ = client.list_objects("nodes", "", convert=kube.node_info)
    return exposed_targets(service, services, nodes, d.node_address_type.value)


async def _reachable(targets: list[Target], query: Query, timeout: float) -> str | None:
    """The address of a target that answered DNS (any answer), or None."""
    sample = targets[:REACH_SAMPLE]
    probes = [(t, p) for t in sample for p in ((t.only,) if t.only else tuple(Protocol))]
    results = await asyncio.gather(*(
        probe(t.endpoint.host, t.endpoint.port, p, query, timeout) for t, p in probes))
    for (target, protocol), result in zip(probes, results, strict=True):
        if result.rtt_seconds is not None:
            return f"{target.endpoint.address} answered over {protocol}"
    return None


async def _why_not(mode: Mode, settings: Settings, client: kube.Client, query: Query,
                   in_pod: bool) -> tuple[str | None, str]:
    """(None, why it works) when `mode` can work, else (why not, "")."""
    missing = await asyncio.to_thread(_missing, client, needs(mode, settings))
    if missing:
        return "not allowed to " + ", ".join(str(n) for n in missing), ""
    if mode is Mode.PORT_FORWARD and Protocol.TCP not in settings.probe.protocols:
        return "--protocol udp: a port-forward carries TCP only", ""
    if mode is Mode.IN_CLUSTER and in_pod:
        return None, "running in a pod (in-cluster credentials)"
    if mode in (Mode.IN_CLUSTER, Mode.NODEPORT):
        targets = await asyncio.to_thread(_coredns_targets, settings, client, mode)
        if not targets:
            what = ("the Service and its pods have no address" if mode is Mode.IN_CLUSTER
                    else "no NodePort or LoadBalancer Service with DNS ports selects the "
                         f"CoreDNS pods in {settings.discovery.namespace}, or no node has "
                         f"an {settings.discovery.node_address_type.value}")
            return what, ""
        answered = await _reachable(targets, query, settings.probe.timeout)
        if answered is None:
            kinds = "Service and pod IPs" if mode is Mode.IN_CLUSTER else "node ports"
            return (f"none of {', '.join(t.endpoint.address for t in targets[:REACH_SAMPLE])}"
                    f" ({kinds}) answered DNS from here"), ""
        return None, answered
    return None, "allowed"


async def select(settings: Settings, client: kube.Client, query: Query) -> Selection:
    """Decide the mode. NoMode when auto finds none; kube errors when the API fails."""
    in_pod = client.source == kube.IN_CLUSTER
    chosen = settings.discovery.mode
    if chosen is not Mode.AUTO:
        # Named: used whatever the API says; what it lacks is worth a warning, and an API
        # that cannot be asked now is discovery's to report and retry.
        try:
            missing = await asyncio.to_thread(_missing, client, needs(chosen, settings))
        except Exception as exc:
            problem = kube.classify(exc, "create", "selfsubjectaccessreviews", "")
            log.warning("cannot check this mode's permissions",
                        extra={"fields": {"mode": chosen.value, "error": problem.message}})
            missing = []
        if missing:
            log.warning("the credentials lack permissions this mode needs",
                        extra={"fields": {"mode": chosen.value,
                                          "missing": ", ".join(str(n) for n in missing)}})
        return Selection(chosen, "named by --mode", {})
    skipped: dict[str, str] = {}
    for mode in ORDER:
        why_not, why = await _why_not(mode, settings, client, query, in_pod)
        if why_not is None:
            return Selection(mode, why, skipped)
        skipped[mode.value] = why_not
    raise NoMode("; ".join(f"{m}: {why}" for m, why in skipped.items()))


def describe(selection: Selection) -> str:
    notes = {
        Mode.PORT_FORWARD: "DNS over TCP through the API server's port-forward; UDP "
                           "cannot be forwarded, so only protocol=\"tcp\" series exist and "
                           "a UDP-only outage is not seen",
        Mode.PROBE_POD: "a short-lived pod probes each round from inside the cluster",
        Mode.NODEPORT: "probing node addresses x node ports and load-balancer IPs; pods "
                       "are not probed one by one",
        Mode.IN_CLUSTER: "probing Service and pod IPs directly",
    }
    return notes.get(selection.mode, "")


# Seconds between attempts to decide the mode while the API fails or no mode works.
RETRY_MIN, RETRY_MAX = 1.0, 60.0


async def choose(settings: Settings, client: kube.Client, query: Query,
                 metrics: ProcessMetrics | None = None) -> Selection:
    """`select`, tried again with back-off while the API fails or no mode can work (RBAC
    applied after the exporter started is picked up); the decision is logged."""
    delay = RETRY_MIN
    while True:
        try:
            selection = await select(settings, client, query)
        except NoMode as exc:
            log.error("no mode can reach CoreDNS with these credentials from here; trying "
                      "again (see docs/modes.md)",
                      extra={"fields": {"reasons": str(exc), "retry_seconds": delay}})
        except Exception as exc:  # the API: unreachable, timeout, 401
            problem = kube.classify(exc, "create", "selfsubjectaccessreviews", "")
            if metrics is not None:
                metrics.kube_errors.labels(resource="selfsubjectaccessreviews",
                                           reason=problem.reason).inc()
            log.warning("cannot decide the mode: the Kubernetes API failed; trying again",
                        extra={"fields": {"reason": problem.reason, "error": problem.message,
                                          "retry_seconds": delay}})
        else:
            log.info("mode chosen", extra={"fields": {
                "mode": selection.mode.value, "reason": selection.reason,
                "skipped": selection.skipped, "means": describe(selection)}})
            if metrics is not None:
                metrics.mode.labels(mode=selection.mode.value).set(1)
            return selection
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def run(settings: Settings, client: kube.Client, discovery: Discovery,
              scheduler: Scheduler, metrics: ProcessMetrics, remediator: Remediator | None,
              query: Query) -> None:
    """Decide the mode, then discover and probe that way until cancelled."""
    selection = await choose(settings, client, query, metrics)
    mode = selection.mode
    discovery.mode = mode
    confirmer: ProbePod | None = None
    if remediator is not None:
        remediator.cannot_confirm = None if mode in (Mode.IN_CLUSTER, Mode.PROBE_POD) else (
            f"in {mode.value} mode the exporter cannot probe the pod over UDP from where it "
            "runs, so it cannot confirm the pod is sick; remediation needs in-cluster or "
            "probe-pod mode")
        if mode is Mode.PROBE_POD:
            # A ProbePod of its own (its own instance label): a confirmation's pod and a
            # round's pod are never taken for each other's leftovers.
            confirmer = ProbePod(settings, client)
            remediator.confirm_through = functools.partial(
                confirm_in_probe_pod, confirmer, settings.discovery.dns_port)
        remediator.decided.set()
    pods: ProbePod | None = None
    forward: PortForward | None = None
    if mode is Mode.PROBE_POD:
        pods = ProbePod(settings, client)
        rounds = probe_pod_rounds(pods, scheduler, metrics, settings.probe.interval)
    else:
        if mode is Mode.PORT_FORWARD:
            forward = PortForward(client)
            scheduler.transport = forward.probe
        rounds = scheduler.run()
    try:
        await asyncio.gather(discovery.run(), rounds)
    finally:
        for probe_pods in (pods, confirmer):
            if probe_pods is not None:
                probe_pods.stop()
        if forward is not None:
            await forward.close()


# Seconds between probe pod rounds at the least: each round is a pod created, scheduled,
# run and deleted, which a 5 s --interval would turn into a pod every 5 s.
PROBE_POD_MIN_INTERVAL = 15.0


async def probe_pod_rounds(pods: ProbePod, scheduler: Scheduler, metrics: ProcessMetrics,
                           interval: float) -> None:
    """A probe pod per round, one at a time, a round every `interval` (at least
    PROBE_POD_MIN_INTERVAL) at most; the first as soon as discovery has found targets."""
    loop = asyncio.get_running_loop()
    every = max(interval, PROBE_POD_MIN_INTERVAL)
    if every > interval:
        log.info("probe-pod mode: a round every %gs (--interval %gs is shorter than a pod's "
                 "life is worth)", every, interval)
    failing = False
    while True:
        started = loop.time()
        checks = scheduler.checks
        if not checks:  # discovery has not found any target yet
            await asyncio.sleep(min(1.0, every))
            continue
        metrics.rounds.inc()
        try:
            results = await pods.round(checks)
        except ProbePodError as exc:
            metrics.probe_pod_runs.labels(result="failed").inc()
            scheduler.forget()
            if not failing:
                log.warning("probe pod round failed; the checks have no results until "
                            "a round succeeds", extra={"fields": {"error": str(exc)}})
            failing = True
        else:
            metrics.probe_pod_runs.labels(result="success").inc()
            if failing:
                log.info("probe pod rounds work again")
            failing = False
            for check in checks:
                result = results.get(check)
                if result is not None:
                    scheduler.record(check, result)
        await asyncio.sleep(max(0.0, started + every - loop.time()))
