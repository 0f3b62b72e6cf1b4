"""Which way to reach CoreDNS: in-cluster, nodeport, probe-pod or port-forward (decided by
the composition root, root.py, before the parts that depend on it are built).

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
import logging
from dataclasses import dataclass

from .. import kube
from ..config import Mode, Settings
from ..dns.engine import probe
from ..metrics.store import ProcessMetrics
from ..model import Protocol, Query, Target
from .watch import DiscoveryError, list_once

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
    return list_once(settings, client, mode, kubernetes=False).targets(mode, settings)


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
            problem = api_problem(exc)
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


# Seconds between attempts to decide the mode while the API fails or no mode works: the
# bounds of the back-off (kube.Backoff, with jitter).
RETRY_MIN, RETRY_MAX = 1.0, 60.0


async def choose(settings: Settings, client: kube.Client, query: Query,
                 metrics: ProcessMetrics | None = None) -> Selection:
    """`select`, tried again with back-off while the API fails or no mode can work (RBAC
    applied after the exporter started is picked up); the decision is logged."""
    backoff = kube.Backoff(RETRY_MIN, RETRY_MAX)
    while True:
        delay = backoff.next()
        try:
            selection = await select(settings, client, query)
        except NoMode as exc:
            log.error("no mode can reach CoreDNS with these credentials from here; trying "
                      "again (see docs/modes.md)",
                      extra={"fields": {"reasons": str(exc), "retry_seconds": round(delay, 1)}})
        except Exception as exc:  # the API: unreachable, timeout, 401
            problem = api_problem(exc)
            if metrics is not None:
                metrics.kube_errors.labels(resource="selfsubjectaccessreviews",
                                           reason=problem.reason).inc()
            log.warning("cannot decide the mode: the Kubernetes API failed; trying again",
                        extra={"fields": {"reason": problem.reason, "error": problem.message,
                                          "retry_seconds": round(delay, 1)}})
        else:
            announce(selection)
            if metrics is not None:
                metrics.mode.labels(mode=selection.mode.value).set(1)
            return selection
        await asyncio.sleep(delay)


def announce(selection: Selection) -> None:
    """The decision, in the log: the mode, why, why each other mode was not taken."""
    log.info("mode chosen", extra={"fields": {
        "mode": selection.mode.value, "reason": selection.reason,
        "skipped": selection.skipped, "means": describe(selection)}})


def api_problem(exc: BaseException) -> kube.ApiProblem:
    """What failed while deciding: a listing (named by it), else the access review."""
    if isinstance(exc, DiscoveryError) and exc.problem is not None:
        return exc.problem
    return kube.classify(exc, "create", "selfsubjectaccessreviews", "")


def cannot_confirm(mode: Mode) -> str | None:
    """Why remediation cannot confirm a pod is sick in `mode`, or None when it can."""
    if mode in (Mode.IN_CLUSTER, Mode.PROBE_POD):
        return None
    return (f"in {mode.value} mode the exporter cannot probe the pod over UDP from where it "
            "runs, so it cannot confirm the pod is sick; remediation needs in-cluster or "
            "probe-pod mode")
