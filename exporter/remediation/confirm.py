"""How a pod is probed over UDP to confirm it is sick before anything is done to it, chosen
with the mode: directly (in-cluster), from a probe pod (probe-pod), or not at all (nodeport,
port-forward: the exporter cannot reach the pod over UDP from where it runs, so it never
restarts one). One try each; the remediator makes up to two.
"""

from __future__ import annotations

import typing

from ..dns.engine import probe
from ..model import Check, Endpoint, Kind, PodInfo, ProbeResult, Protocol, Query, Target
from ..probing.probepod import ProbePod, ProbePodError


class CannotConfirm(Exception):
    """The pod could not be probed to confirm it is sick (the message says why): skip."""


class Confirmer(typing.Protocol):
    """One confirming try: (pod, queries) -> the first query's result that fails, else the
    last one's pass; CannotConfirm when the probing itself failed."""

    async def __call__(self, pod: PodInfo, queries: tuple[Query, ...]) -> ProbeResult: ...


class Direct:
    """From here, over the network: in-cluster mode."""

    def __init__(self, dns_port: int, timeout: float) -> None:
        self._port, self._timeout = dns_port, timeout

    async def __call__(self, pod: PodInfo, queries: tuple[Query, ...]) -> ProbeResult:
        result: ProbeResult | None = None
        for query in queries:
            result = await probe(pod.ips[0], self._port, Protocol.UDP, query, self._timeout)
            if not result.ok:
                break
        assert result is not None
        return result


class ThroughProbePod:
    """From a probe pod of its own (its own instance label, so that a confirmation's pod
    and a round's pod are never taken for each other's leftovers): probe-pod mode."""

    def __init__(self, pods: ProbePod, dns_port: int) -> None:
        self._pods, self._port = pods, dns_port

    async def __call__(self, pod: PodInfo, queries: tuple[Query, ...]) -> ProbeResult:
        target = Target(Kind.POD, Endpoint(pod.ips[0], self._port), pod.namespace,
                        pod=pod.name, node=pod.node)
        checks = [Check(target, Protocol.UDP, q) for q in queries]
        try:
            results = await self._pods.round(checks)
        except ProbePodError as exc:
            raise CannotConfirm(f"the probe pod that was to confirm it failed: {exc}") from exc
        if len(results) < len(checks):
            raise CannotConfirm("the probe pod that was to confirm it gave no result for "
                                f"{len(checks) - len(results)} of {len(checks)} queries")
        return next((results[c] for c in checks if not results[c].ok), results[checks[-1]])


class Impossible:
    """No way to probe the pod over UDP from here: every confirmation is a skip, with why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def __call__(self, pod: PodInfo, queries: tuple[Query, ...]) -> ProbeResult:
        raise CannotConfirm(self.reason)
