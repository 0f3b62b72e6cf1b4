"""Kubernetes discovery: keeps the probe targets equal to the CoreDNS Service and its pods.

Three watches, each in a thread of its own (`kube.Watcher`), feed one queue on the
event loop:

- the CoreDNS Service (`--namespace`/`--service`): ClusterIPs, DNS port, selector;
- the pods matching that selector (the watch restarts when the selector changes);
- `default/kubernetes`, whose ClusterIP is the expected answer of the default query
  (only when no `--query` is given).

After each batch of events the targets are recomputed and handed to the scheduler, which
drops the series of whatever disappeared. API trouble never touches the targets already
known: probing goes on, each watch backs off and retries, and the trouble is logged once
when it starts (or changes) and once when it ends, and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .. import kube
from ..config import DEFAULT_QUERY_LABEL, Mode, Settings, default_query
from ..metrics.store import ProcessMetrics
from ..model import Kind, NodeInfo, PodInfo, Protocol, Query, ServiceInfo, Target
from .targets import exposed_targets, kubernetes_targets

log = logging.getLogger(__name__)

SERVICE, PODS, KUBERNETES, EXPOSED, NODES = "service", "pods", "kubernetes", "exposed", "nodes"


@dataclass
class _Source:
    """One watch: what it last listed, whether it has listed, its current problem."""

    watcher: kube.Watcher | None = None
    generation: int = 0
    listed: bool = False
    problem: kube.ApiProblem | None = None


# Where discovery hands each new target set: the targets, the queries (the default one
# with its expected answer), the Ready condition of each pod target (Scheduler.set_targets).
Publish = Callable[[list[Target], tuple[Query, ...], dict[Target, bool]], None]


class Discovery:
    """The watches of one mode (`mode_targets` says which targets each mode probes),
    publishing every change of the target set."""

    def __init__(self, settings: Settings, client: kube.Client, mode: Mode, publish: Publish,
                 metrics: ProcessMetrics) -> None:
        self._settings = settings
        self._client = client
        self._publish_to = publish
        self._metrics = metrics
        self.mode = mode
        self._queue: asyncio.Queue[tuple[str, int, kube.WatchEvent]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sources = {name: _Source() for name in (SERVICE, PODS, KUBERNETES, EXPOSED,
                                                      NODES)}
        self.service: ServiceInfo | None = None
        self.pods: dict[str, PodInfo] = {}
        self.exposed: dict[str, ServiceInfo] = {}  # nodeport mode: Services in the namespace
        self.nodes: dict[str, NodeInfo] = {}
        self.kubernetes_ip: str | None = None
        self.synced = False
        self._published: tuple[list[Target], tuple[Query, ...], dict[Target, bool]] | None = None
        self._warned: set[str] = set()

    async def run(self) -> None:
        """Watch and update targets until cancelled."""
        self._loop = asyncio.get_running_loop()
        d = self._settings.discovery
        self._start(SERVICE, "services", d.namespace, kube.service_info,
                    field_selector=f"metadata.name={d.service}")
        if self._settings.probe.expects_kubernetes_ip:
            self._start(KUBERNETES, "services", "default", kube.service_info,
                        field_selector="metadata.name=kubernetes")
        if self.mode is Mode.NODEPORT:
            self._start(EXPOSED, "services", d.namespace, kube.service_info)
            self._start(NODES, "nodes", "", kube.node_info)
        try:
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                try:
                    for source, generation, event in batch:
                        if generation == self._sources[source].generation:
                            self._handle(source, event)
                    self._publish()
                except Exception:  # a bug here must not end discovery for good
                    log.exception("discovery: could not apply an update; keeping the "
                                  "targets already known")
        finally:
            for watched in self._sources.values():
                if watched.watcher is not None:
                    watched.watcher.stop()

    # -- watches -----------------------------------------------------------------------

    def _start(self, name: str, resource: str, namespace: str,
               convert: Callable[[Any], Any], *, label_selector: str = "",
               field_selector: str = "") -> None:
        source = self._sources[name]
        if source.watcher is not None:
            source.watcher.stop()
        source.generation += 1
        source.listed = False
        generation, loop = source.generation, self._loop
        assert loop is not None

        def emit(event: kube.WatchEvent) -> None:
            # RuntimeError: the loop is closed, the exporter is stopping.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue.put_nowait, (name, generation, event))

        source.watcher = kube.Watcher(
            self._client, resource, namespace, convert, emit,
            label_selector=label_selector, field_selector=field_selector,
        )
        source.watcher.start()

    def _stop(self, name: str) -> None:
        source = self._sources[name]
        if source.watcher is not None:
            source.watcher.stop()
            source.watcher = None
        source.generation += 1
        source.listed = True  # nothing to list: counts as synced
        source.problem = None

    def _handle(self, name: str, event: kube.WatchEvent) -> None:
        source = self._sources[name]
        if isinstance(event, kube.Failed):
            self._metrics.kube_errors.labels(
                resource=source.watcher.resource if source.watcher else name,
                reason=event.problem.reason,
            ).inc()
            # Once per change of state: retries failing the same way stay quiet.
            if source.problem is None or source.problem.reason != event.problem.reason:
                log.warning(
                    "Kubernetes API error; probing continues with the targets already known",
                    extra={"fields": {"watch": name, "reason": event.problem.reason,
                                      "error": event.problem.message}},
                )
            source.problem = event.problem
            return
        if isinstance(event, kube.Recovered):
            if source.problem is not None:
                log.info("Kubernetes API reachable again", extra={"fields": {"watch": name}})
            source.problem = None
            return
        if name == PODS:
            self._handle_pods(event)
        elif name in (EXPOSED, NODES):
            self._handle_named(self.exposed if name == EXPOSED else self.nodes, event)
        else:
            self._handle_service(name, event)
        source.listed = True

    def _handle_pods(self, event: kube.WatchEvent) -> None:
        if isinstance(event, kube.Listed):
            self.pods = {p.name: p for p in event.items}
        elif isinstance(event, kube.Changed):
            pod: PodInfo = event.item
            if event.type == "DELETED":
                self.pods.pop(pod.name, None)
            else:
                self.pods[pod.name] = pod

    @staticmethod
    def _handle_named(known: dict[str, Any], event: kube.WatchEvent) -> None:
        if isinstance(event, kube.Listed):
            known.clear()
            known.update((item.name, item) for item in event.items)
        elif isinstance(event, kube.Changed):
            if event.type == "DELETED":
                known.pop(event.item.name, None)
            else:
                known[event.item.name] = event.item

    def _handle_service(self, name: str, event: kube.WatchEvent) -> None:
        current: ServiceInfo | None
        if isinstance(event, kube.Listed):
            current = event.items[0] if event.items else None
        elif isinstance(event, kube.Changed):
            current = None if event.type == "DELETED" else event.item
        else:
            return
        if name == KUBERNETES:
            self.kubernetes_ip = current.cluster_ips[0] if current and current.cluster_ips else None
            return
        previous, self.service = self.service, current
        d = self._settings.discovery
        if current is None:
            key, why = "no-service", (f"Service {d.namespace}/{d.service} not found: nothing "
                                      "to probe until it exists (check --namespace/--service)")
        elif not current.selector:
            key, why = "no-selector", (f"Service {d.namespace}/{d.service} has no selector: "
                                       "its pods cannot be found, only its ClusterIP is probed")
        else:
            key = why = ""
        self._warned -= {"no-service", "no-selector"} - {key}  # warn again if it recurs
        if key or self.mode is Mode.NODEPORT:  # no pods to watch
            if key:
                self._warn_once(key, why)
            self._stop(PODS)
            self.pods = {}
            return
        assert current is not None
        if previous is None or previous.selector != current.selector:
            self._start(PODS, "pods", d.namespace, kube.pod_info,
                        label_selector=kube.label_selector(current.selector))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # -- targets -----------------------------------------------------------------------

    def _queries(self) -> tuple[Query, ...]:
        return probe_queries(self._settings, self.kubernetes_ip,
                             unreadable=self._sources[KUBERNETES].problem is not None)

    def _is_synced(self) -> bool:
        service, pods, k8s = (self._sources[n] for n in (SERVICE, PODS, KUBERNETES))
        if not service.listed or (not pods.listed and self.service is not None):
            return False
        if self.mode is Mode.NODEPORT and not all(
                self._sources[n].listed for n in (EXPOSED, NODES)):
            return False
        if self._settings.probe.expects_kubernetes_ip and not k8s.listed:
            # default/kubernetes unreadable (forbidden, say): go on without it, once.
            if k8s.problem is None or k8s.problem.reason not in ("forbidden", "not_found"):
                return False
            self._warn_once(
                "no-kubernetes-ip",
                f"cannot read default/kubernetes ({k8s.problem.message}); the "
                f"'{DEFAULT_QUERY_LABEL}' query expects "
                + (f"{os.environ['KUBERNETES_SERVICE_HOST']} from KUBERNETES_SERVICE_HOST"
                   if os.environ.get("KUBERNETES_SERVICE_HOST") else "any address"),
            )
        return True

    def _publish(self) -> None:
        if not self._is_synced():
            return
        targets, ready = mode_targets(
            self.mode, self._settings, self.service, list(self.pods.values()),
            list(self.exposed.values()), list(self.nodes.values()))
        queries = self._queries()
        if self._published != (targets, queries, ready):
            before = set(self._published[0]) if self._published else set()
            added = [t for t in targets if t not in before]
            removed = [t for t in before if t not in set(targets)]
            self._publish_to(targets, queries, ready)
            self._published = (targets, queries, ready)
            log.info(
                "targets updated",
                extra={"fields": {
                    "targets": len(targets),
                    "added": ",".join(f"{t.pod or t.kind.value}@{t.endpoint.address}"
                                      for t in added),
                    "removed": ",".join(f"{t.pod or t.kind.value}@{t.endpoint.address}"
                                        for t in removed),
                    "expect": ",".join(queries[0].expect) if queries else "",
                }},
            )
        if not self.synced:
            self.synced = True
            self._metrics.discovery_synced.set(1)
            log.info("discovery synced", extra={"fields": {
                "service": f"{self._settings.discovery.namespace}/"
                           f"{self._settings.discovery.service}",
                "pods": len(ready), "targets": len(targets)}})


def mode_targets(
    mode: Mode, settings: Settings, service: ServiceInfo | None, pods: list[PodInfo],
    exposed: list[ServiceInfo], nodes: list[NodeInfo],
) -> tuple[list[Target], dict[Target, bool]]:
    """The targets `mode` probes, and the Ready condition of each pod target.

    in-cluster and probe-pod: the Service's IPs and every pod IP (in-cluster: and the
    NodeLocal DNSCache of this node, `--node-local-dns`); port-forward: the pods
    alone, over TCP alone; nodeport: node addresses x node ports, load-balancer IPs.
    """
    d = settings.discovery
    if mode is Mode.NODEPORT:
        return exposed_targets(service, exposed, nodes, d.node_address_type.value), {}
    targets, ready = kubernetes_targets(service, pods, d.dns_port)
    if mode is Mode.IN_CLUSTER and d.node_local_dns is not None and service is not None:
        # The cache on this replica's node, which the pods here resolve through.
        targets.append(Target(Kind.NODELOCAL, d.node_local_dns, node=d.node_name))
    if mode is Mode.PORT_FORWARD:
        targets = [replace(t, only=Protocol.TCP) for t in targets if t.kind is Kind.POD]
        ready = {replace(t, only=Protocol.TCP): r for t, r in ready.items()}
    return targets, ready


def probe_queries(settings: Settings, kubernetes_ip: str | None, unreadable: bool
                  ) -> tuple[Query, ...]:
    """The default query first, then every `--query`. The default query expects what
    `--expect` gave it, else the ClusterIP of default/kubernetes, or, where that could not
    be read, $KUBERNETES_SERVICE_HOST (every pod's environment names it), else any
    address. CoreDNS answers it from the API itself, never from upstream: the cluster's
    own name, against which an external `--query` failing means the upstreams."""
    ip = kubernetes_ip
    if ip is None and unreadable:
        ip = os.environ.get("KUBERNETES_SERVICE_HOST") or None
    return (default_query(settings, (ip,) if ip else ()), *settings.probe.queries)


class DiscoveryError(Exception):
    """Listing for one-shot discovery failed; the message says why, `problem` names it."""

    def __init__(self, message: str, problem: kube.ApiProblem | None = None) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class Snapshot:
    """What the watches of a mode would list, listed once."""

    service: ServiceInfo | None
    pods: list[PodInfo]
    exposed: list[ServiceInfo]
    nodes: list[NodeInfo]
    kubernetes_ip: str | None = None
    unreadable: bool = False  # default/kubernetes could not be read (forbidden)

    def targets(self, mode: Mode, settings: Settings) -> list[Target]:
        return mode_targets(mode, settings, self.service, self.pods, self.exposed,
                            self.nodes)[0]


def list_once(settings: Settings, client: kube.Client, mode: Mode, *, kubernetes: bool
              ) -> Snapshot:
    """List, blocking, what the watches of `mode` list: the Service, its pods (or, in
    nodeport mode, the Services and nodes), and, when `kubernetes`, default/kubernetes.
    DiscoveryError names the call that failed."""
    d = settings.discovery
    step = ("list", "services", d.namespace)
    try:
        found, _ = client.list_objects("services", d.namespace, convert=kube.service_info,
                                       field_selector=f"metadata.name={d.service}")
        service: ServiceInfo | None = found[0] if found else None
        pods: list[PodInfo] = []
        exposed: list[ServiceInfo] = []
        nodes: list[NodeInfo] = []
        if service is not None and mode is Mode.NODEPORT:
            exposed, _ = client.list_objects("services", d.namespace, convert=kube.service_info)
            step = ("list", "nodes", "")
            nodes, _ = client.list_objects("nodes", "", convert=kube.node_info)
        elif service is not None and service.selector:
            step = ("list", "pods", d.namespace)
            pods, _ = client.list_objects(
                "pods", d.namespace, label_selector=kube.label_selector(service.selector),
                convert=kube.pod_info)
        kubernetes_ip, unreadable = None, False
        if kubernetes:
            step = ("list", "services", "default")
            try:
                listed, _ = client.list_objects("services", "default", convert=kube.service_info,
                                                field_selector="metadata.name=kubernetes")
                ips = listed[0].cluster_ips if listed else ()
                kubernetes_ip = ips[0] if ips else None
            except Exception as exc:
                problem = kube.classify(exc, *step)
                if problem.reason != "forbidden":
                    raise
                log.warning("cannot read default/kubernetes: %s", problem.message)
                unreadable = True
    except Exception as exc:
        problem = kube.classify(exc, *step)
        raise DiscoveryError(problem.message, problem) from exc
    return Snapshot(service, pods, exposed, nodes, kubernetes_ip, unreadable)


async def discover_once(settings: Settings, client: kube.Client, mode: Mode
                        ) -> tuple[list[Target], tuple[Query, ...]]:
    """The targets and queries of `mode`, listed once (for `check`)."""
    d = settings.discovery
    snapshot = await asyncio.to_thread(list_once, settings, client, mode,
                                       kubernetes=settings.probe.expects_kubernetes_ip)
    if snapshot.service is None:
        raise DiscoveryError(f"Service {d.namespace}/{d.service} not found")
    queries = probe_queries(settings, snapshot.kubernetes_ip, snapshot.unreadable)
    return snapshot.targets(mode, settings), queries
