"""The composition root, used by `serve` and by `check`: it plans what to probe, decides
how CoreDNS is reached (the mode), and only then builds each part complete: the
scheduler with its transport, the discovery of that mode, the remediator with its way to
confirm. Nothing is wired into a part after it is built. It owns the API client: it opens
it (planning) and closes it (when serving or checking ends).

    serve: create_app -> HTTP now; in the background: choose the mode (with back-off),
           assemble the parts, hand them to the handlers (web.state.Late), run them.
    check: plan -> select the mode once -> list once -> one round -> results.

docs/architecture.md draws the map.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from . import kube
from .config import RESOLVER_QUERY, ConfigError, Mode, Remediation, Settings, default_query
from .discovery import modes
from .discovery.targets import read_resolv_conf, static_targets
from .discovery.watch import Discovery, DiscoveryError, discover_once
from .metrics.exposition import Exposition
from .metrics.store import ProcessMetrics, ResultStore, register
from .model import Check, ProbeResult, Query, Target
from .probing.portforward import PortForward
from .probing.probepod import ProbePod
from .probing.scheduler import RoundFailed, Scheduler
from .remediation.confirm import Confirmer, Direct, Impossible, ThroughProbePod
from .remediation.remediator import NoRemediation, Remediator
from .remediation.selfheal import SelfRemediation
from .web import app as web_app
from .web.access import WebAccess
from .web.auth import TokenFile
from .web.state import AppState, Late, Parts

log = logging.getLogger("exporter")


@dataclass(frozen=True)
class Plan:
    """What to probe, and a sentence on why, for the log and the status page."""

    targets: list[Target]
    queries: tuple[Query, ...]
    source: str
    # Set when the targets come from Kubernetes discovery (then `targets` is empty).
    client: kube.Client | None = None


def plan_targets(settings: Settings) -> Plan:
    """Decide what to probe: `--server`, else Kubernetes, else the resolver's nameservers.

    Raises ConfigError when the choice cannot be made (nothing to probe, a named
    kubeconfig that does not exist).
    """
    d = settings.discovery
    queries = settings.probe.queries or (default_query(settings),)
    if d.servers:
        return Plan(static_targets(d.servers), queries, "static targets from --server")
    try:
        found = kube.find_config(d.kubeconfig)
    except kube.KubeConfigError as exc:
        raise ConfigError([str(exc)]) from exc
    if found is not None:
        try:
            client = kube.Client.connect(found)
        except kube.KubeConfigError as exc:
            raise ConfigError([str(exc)]) from exc
        return Plan(
            [],
            queries,
            f"Kubernetes discovery of Service {d.namespace}/{d.service} and its pods "
            f"(config: {found}, API server: {client.server})",
            client,
        )
    path = Path(d.resolv_conf)
    try:
        endpoints = read_resolv_conf(path)
    except OSError as exc:
        raise ConfigError(
            [f"no --server and no Kubernetes config, and the resolver file {path} "
             f"(--resolv-conf) cannot be read: {exc.strerror}"]
        ) from exc
    if not endpoints:
        raise ConfigError(
            [f"no --server, no Kubernetes config, and the resolver file {path} "
             "(--resolv-conf) lists no nameserver to probe"]
        )
    queries = settings.probe.queries or (RESOLVER_QUERY,)
    return Plan(
        static_targets(endpoints),
        queries,
        f"embedded default: no --server and no Kubernetes config found, probing the "
        f"nameservers of {path} with {', '.join(q.label for q in queries)}"
        + ("" if settings.probe.queries else
           " (the root zone's name servers: any resolver answers it)"),
    )


# -- serve --------------------------------------------------------------------------------


def create_app(settings: Settings, plan: Plan, access: WebAccess | None = None
               ) -> web.Application:
    """The application: served at once; the parts that depend on the mode follow.
    `access`: --web-config-file's checks on every request (basic auth, headers)."""
    registry = CollectorRegistry()
    metrics = register(registry)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    store = ResultStore()
    parts: Late[Parts] = Late()
    state = AppState(settings, plan.source, Exposition(store, registry), store,
                     TokenFile(settings.remediation.webhook_token_file), parts)
    if plan.client is None:
        metrics.discovery_synced.set(1)
        metrics.mode.labels(mode="static").set(1)
        scheduler = Scheduler(settings.probe, store, metrics,
                              source_node=settings.discovery.node_name)
        scheduler.set_targets(plan.targets, plan.queries)
        parts.set(Parts("static", scheduler, NoRemediation(metrics)))
        work = functools.partial(_run_static, scheduler)
    else:
        work = functools.partial(_run_kubernetes, settings, plan.client, store, metrics, parts)
    return web_app.build(state, _background(work, metrics), access)


def _background(work: Callable[[], Coroutine[Any, Any, None]], metrics: ProcessMetrics
                ) -> Callable[[web.Application], AsyncIterator[None]]:
    """The application's background work, started with it and cancelled when it stops."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        metrics.tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
        task = asyncio.create_task(work(), name="exporter")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


async def _run_static(scheduler: Scheduler) -> None:
    try:
        await scheduler.run()
    finally:
        await scheduler.drain()


async def _run_kubernetes(settings: Settings, client: kube.Client, store: ResultStore,
                          metrics: ProcessMetrics, late: Late[Parts]) -> None:
    """Decide the mode, then build the parts of that mode and run them until cancelled."""
    try:
        selection = await modes.choose(settings, client, default_query(settings), metrics)
        async with _assembled(settings, client, selection.mode, store, metrics) as parts:
            late.set(parts)
            assert parts.discovery is not None
            running = [parts.discovery.run(), parts.scheduler.run()]
            if parts.self_remediation is not None:
                running.append(parts.self_remediation.run())
            try:
                await asyncio.gather(*running)
            finally:
                await parts.scheduler.drain()
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _assembled(settings: Settings, client: kube.Client, mode: Mode, store: ResultStore,
                     metrics: ProcessMetrics) -> AsyncIterator[Parts]:
    if settings.discovery.node_local_dns is not None and mode is not Mode.IN_CLUSTER:
        log.warning("--node-local-dns is ignored", extra={"fields": {
            "reason": f"{mode.value} mode: a node's NodeLocal DNSCache is reached from a "
                      "pod on that node only (in-cluster mode, the DaemonSet)"}})
    async with contextlib.AsyncExitStack() as stack:
        scheduler = _scheduler(settings, client, mode, store, metrics, stack)
        discovery = Discovery(settings, client, mode, scheduler.set_targets, metrics)
        remediator = Remediator(settings, client, metrics, scheduler,
                                _confirmer(settings, client, mode, stack))
        yield Parts(mode.value, scheduler, remediator, discovery,
                    _self_remediation(settings, mode, store, remediator))


def _self_remediation(settings: Settings, mode: Mode, store: ResultStore,
                      remediator: Remediator) -> SelfRemediation | None:
    """--self-remediate where it can work: in-cluster mode (pods probed directly, every
    interval), remediation not off."""
    r = settings.remediation
    if not r.self_remediate:
        return None
    why_not = ("--remediation off" if r.mode is Remediation.OFF else
               None if mode is Mode.IN_CLUSTER else
               f"{mode.value} mode: the pods are not probed directly over UDP from here, "
               "so the exporter's own probes cannot judge them; self-remediation needs "
               "in-cluster mode (the webhook still works as the mode allows)")
    if why_not is not None:
        log.warning("--self-remediate is off", extra={"fields": {"reason": why_not}})
        return None
    return SelfRemediation(settings, store, remediator)


def _scheduler(settings: Settings, client: kube.Client, mode: Mode, store: ResultStore,
               metrics: ProcessMetrics | None, stack: contextlib.AsyncExitStack) -> Scheduler:
    """The scheduler over the mode's transport: the API server's port-forward, a probe pod
    per round, or the network directly (from this node: its log lines name it)."""
    if mode is Mode.PORT_FORWARD:
        forward = PortForward(client)
        stack.push_async_callback(forward.close)
        return Scheduler(settings.probe, store, metrics, transport=forward.probe)
    if mode is Mode.PROBE_POD:
        pods = ProbePod(settings, client, metrics)
        stack.callback(pods.stop)
        return Scheduler(settings.probe, store, metrics, rounds=pods)
    return Scheduler(settings.probe, store, metrics, source_node=settings.discovery.node_name)


def _confirmer(settings: Settings, client: kube.Client, mode: Mode,
               stack: contextlib.AsyncExitStack) -> Confirmer | Impossible:
    """How remediation probes a pod to confirm it is sick, in `mode`."""
    reason = modes.cannot_confirm(mode)
    if reason is not None:
        return Impossible(reason)
    if mode is Mode.PROBE_POD:
        # A ProbePod of its own (its own instance label): a confirmation's pod and a
        # round's pod are never taken for each other's leftovers.
        pods = ProbePod(settings, client)
        stack.callback(pods.stop)
        return ThroughProbePod(pods)
    return Direct(settings.probe.timeout)


# -- check --------------------------------------------------------------------------------


class CannotCheck(Exception):
    """`check` could not probe: no mode, discovery failed, a probe pod failed."""


async def check(settings: Settings, plan: Plan) -> list[tuple[Check, ProbeResult]]:
    """One round: the static targets, or those of the mode decided once and listed once.
    CannotCheck says why there are no results."""
    store = ResultStore()
    if plan.client is None:
        scheduler = Scheduler(settings.probe, store)
        scheduler.set_targets(plan.targets, plan.queries)
        return await scheduler.run_once()
    client = plan.client
    try:
        try:
            selection = await modes.select(settings, client, default_query(settings))
        except modes.NoMode as exc:
            raise CannotCheck(str(exc)) from exc
        except Exception as exc:
            raise CannotCheck(f"cannot decide the mode: {modes.api_problem(exc).message}"
                              ) from exc
        modes.announce(selection)
        try:
            targets, queries = await discover_once(settings, client, selection.mode)
        except DiscoveryError as exc:
            raise CannotCheck(f"cannot discover targets: {exc}") from exc
        async with contextlib.AsyncExitStack() as stack:
            scheduler = _scheduler(settings, client, selection.mode, store, None, stack)
            scheduler.set_targets(targets, queries)
            try:
                return await scheduler.run_once()
            except RoundFailed as exc:
                raise CannotCheck(str(exc)) from exc
    finally:
        client.close()
