"""How a pod is probed over UDP to confirm it is sick before anything is done to it, chosen
with the mode: directly (in-cluster), from a probe pod (probe-pod), or not at all (nodeport,
port-forward: the exporter cannot reach the pod over UDP from where it runs, so it never
restarts one). One try each; the remediator makes up to two.
"""

from __future__ import annotations

import dataclasses
import typing

from ..dns.engine import probe
from ..model import Check, Endpoint, Kind, PodInfo, ProbeResult, Protocol, Query, Target
from ..probing.probepod import ProbePod, ProbePodError


class CannotConfirm(Exception):
    """The pod could not be probed to confirm it is sick (the message says why): skip."""


class Confirmer(typing.Protocol):
    """One confirming try: (pod, its DNS endpoints, queries) -> the first result that
    fails, over every address of the pod and every query, else the last one's pass;
    CannotConfirm when the probing itself failed."""

    async def __call__(self, pod: PodInfo, endpoints: tuple[Endpoint, ...],
                       queries: tuple[Query, ...]) -> ProbeResult: ...


class Direct:
    """From here, over the network: in-cluster mode."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    async def __call__(self, pod: PodInfo, endpoints: tuple[Endpoint, ...],
                       queries: tuple[Query, ...]) -> ProbeResult:
        result: ProbeResult | None = None
        for endpoint in endpoints:
            for query in queries:
                result = await probe(endpoint.host, endpoint.port, Protocol.UDP, query,
                                     self._timeout)
                if not result.ok:
                    return _at(endpoint, result)
        assert result is not None
        return result


class ThroughProbePod:
    """From a probe pod of its own (its own instance label, so that a confirmation's pod
    and a round's pod are never taken for each other's leftovers): probe-pod mode."""

    def __init__(self, pods: ProbePod) -> None:
        self._pods = pods

    async def __call__(self, pod: PodInfo, endpoints: tuple[Endpoint, ...],
                       queries: tuple[Query, ...]) -> ProbeResult:
        checks = [Check(Target(Kind.POD, e, pod.namespace, pod=pod.name, node=pod.node),
                        Protocol.UDP, q) for e in endpoints for q in queries]
        try:
            results = await self._pods.round(checks)
        except ProbePodError as exc:
            raise CannotConfirm(f"the probe pod that was to confirm it failed: {exc}") from exc
        if len(results) < len(checks):
            raise CannotConfirm("the probe pod that was to confirm it gave no result for "
                                f"{len(checks) - len(results)} of {len(checks)} checks")
        failed = next((c for c in checks if not results[c].ok), None)
        if failed is None:
            return results[checks[-1]]
        return _at(failed.target.endpoint, results[failed])


def _at(endpoint: Endpoint, result: ProbeResult) -> ProbeResult:
    """A failure names the address it failed on (a pod has one per IP family)."""
    return dataclasses.replace(result, reason=f"{endpoint.address}: {result.reason}")


class Impossible:
    """No way to probe the pod over UDP from here: every confirmation is a skip, with why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def __call__(self, pod: PodInfo, endpoints: tuple[Endpoint, ...],
                       queries: tuple[Query, ...]) -> ProbeResult:
        raise CannotConfirm(self.reason)
