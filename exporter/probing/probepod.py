"""Probing from a short-lived pod, for `--mode probe-pod`.

The exporter runs outside the cluster and may create pods, but reaches neither pod IPs
nor NodePorts. Each round it creates one pod in `--probe-pod-namespace` that runs
`coredns-health-exporter check --json` against the targets discovery found (their
addresses as `--server`, the queries with their expected answers), waits for it to end,
reads its result from the pod's log through the API, and deletes it. The results are
recorded as if probed directly: same checks, same labels.

The pod is as small and as unprivileged as it can be: no service account token, non-root,
no privilege escalation, every capability dropped, a read-only root filesystem, resource
limits, an active deadline. Its labels mark it as ours; a pod of ours left behind (the
exporter killed mid-round) is deleted by the next round of any replica once it is older
than LEFTOVER_AGE, and at once by the replica that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from .. import kube
from ..config import Settings, parse_query
from ..metrics.store import ProcessMetrics
from ..model import Check, Outcome, PodInfo, ProbeResult, Query
from .scheduler import RoundFailed

log = logging.getLogger(__name__)

NAME = "coredns-health-exporter-probe"
LABELS = {"app.kubernetes.io/name": NAME,
          "app.kubernetes.io/managed-by": "coredns-health-exporter"}
INSTANCE_LABEL = "dnsprobe.io/instance"
CONTAINER = "probe"
# Seconds the pod may run (Kubernetes ends it after that: activeDeadlineSeconds); the
# exporter stops waiting a little later and deletes it.
POD_DEADLINE = 120
WAIT_GRACE = 15
# A pod of ours older than this is a leftover of a replica that died mid-round.
LEFTOVER_AGE = 600.0


class ProbePodError(RoundFailed):
    """A round could not produce results; the message says why."""


def _pod_label(query: Query) -> str:
    """The label `check` inside the pod gives this query (it gets it as --query)."""
    return parse_query(f"{query.qname.rstrip('.')}/{query.rdtype}").label


def pod_manifest(settings: Settings, checks: Sequence[Check], instance: str) -> dict[str, Any]:
    """The probe pod for one round over `checks`."""
    p = settings.probe
    protocols = {c.protocol for c in checks} or set(p.protocols)
    args = ["check", "--json", "--log-format", "json", "--timeout", f"{p.timeout:g}",
            "--protocol", "both" if len(protocols) > 1 else protocols.pop().value,
            "--concurrency", str(p.concurrency)]
    for address in dict.fromkeys(c.target.endpoint.address for c in checks):
        args += ["--server", address]
    queries: dict[str, Query] = {}
    for check in checks:
        queries.setdefault(_pod_label(check.query), check.query)
    for query in queries.values():
        args += ["--query", f"{query.qname.rstrip('.')}/{query.rdtype}"]
        for value in query.expect:
            args += ["--expect", value]
    pp = settings.probe_pod
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "dnsprobe-",
            "labels": {**LABELS, INSTANCE_LABEL: instance},
            "annotations": {"dnsprobe.io/purpose": "one probe round of coredns-health-"
                            "exporter; deleted when read, safe to delete"},
        },
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": POD_DEADLINE,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": CONTAINER,
                "image": pp.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["coredns-health-exporter"],
                "args": args,
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                              "limits": {"cpu": "500m", "memory": "128Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }


# Container waiting reasons that never resolve by waiting (the kubelet retries a pull with
# a back-off, but no registry will start serving a missing image within a round).
CANNOT_START = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName",
                "CreateContainerConfigError", "CreateContainerError")


def cannot_start(pod: PodInfo) -> bool:
    """Whether the pod's container waits for something that will not come."""
    kind, _, rest = pod.state.partition(": ")
    return kind == "waiting" and rest.split(": ", 1)[0] in CANNOT_START


def parse_output(text: str, checks: Sequence[Check]) -> dict[Check, ProbeResult]:
    """The results in a probe pod's log, matched back to `checks` by address, protocol
    and query. The log holds the pod's stderr too (JSON log lines); the result document
    is the one that starts with a line that is just `{`."""
    start = 0 if text.startswith("{\n") else text.find("\n{\n") + 1
    if start == 0 and not text.startswith("{\n"):  # find() gave -1
        raise ProbePodError(f"no result in the probe pod's log: {_tail(text)}")
    try:
        document, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError as exc:
        raise ProbePodError(f"unreadable result in the probe pod's log: {exc}") from exc
    records = document.get("results") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise ProbePodError("the probe pod's result has no list of results")
    wanted: dict[tuple[str, str, str], list[Check]] = {}
    for check in checks:
        key = (check.target.endpoint.address, check.protocol.value, _pod_label(check.query))
        wanted.setdefault(key, []).append(check)
    results: dict[Check, ProbeResult] = {}
    for record in records:
        try:
            key = (str(record["address"]), str(record["protocol"]), str(record["query"]))
            latency = record.get("latency_seconds")
            result = ProbeResult(
                Outcome(record["outcome"]), str(record.get("reason", "")),
                rtt_seconds=float(latency) if latency is not None else None,
                rcode=str(record["rcode"]) if record.get("rcode") is not None else None,
                answers=tuple(str(a) for a in record.get("answers") or ()),
                started_at=float(record.get("started_at") or 0.0),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProbePodError(f"unexpected result record {record!r}: {exc!r}") from exc
        if result.rtt_seconds is not None and not math.isfinite(result.rtt_seconds):
            raise ProbePodError(f"unexpected latency in {record!r}")
        for check in wanted.get(key, []):
            results[check] = result
    return results


def _tail(text: str, size: int = 300) -> str:
    text = text.strip()
    return ("..." + text[-size:]) if len(text) > size else (text or "(empty)")


def _age(pod: PodInfo, now: datetime) -> float:
    try:
        created = datetime.fromisoformat(pod.created.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (now - created).total_seconds()


# Seconds between probe pod rounds at the least: each round is a pod created, scheduled,
# run and deleted, which a 5 s --interval would turn into a pod every 5 s.
PROBE_POD_MIN_INTERVAL = 15.0


class ProbePod:
    """Runs probe rounds in pods, one round at a time: the scheduler's transport in
    probe-pod mode (scheduler.Rounds), and the remediator's way to confirm."""

    name = "probe pod"
    min_interval = PROBE_POD_MIN_INTERVAL

    def __init__(self, settings: Settings, client: kube.Client,
                 metrics: ProcessMetrics | None = None) -> None:
        self._settings = settings
        self._client = client
        self._metrics = metrics
        self._namespace = settings.probe_pod.namespace
        self.instance = secrets.token_hex(6)
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make a round in progress give up soon (its pod is still deleted)."""
        self._stop.set()

    async def round(self, checks: Sequence[Check]) -> dict[Check, ProbeResult]:
        try:
            results = await asyncio.to_thread(self.run, checks)
        except ProbePodError:
            if self._metrics:
                self._metrics.probe_pod_runs.labels(result="failed").inc()
            raise
        if self._metrics:
            self._metrics.probe_pod_runs.labels(result="success").inc()
        return results

    def run(self, checks: Sequence[Check]) -> dict[Check, ProbeResult]:
        """One round, blocking: clean up, create, wait, read, delete. ProbePodError."""
        ns = self._namespace
        self._remove_leftovers()
        manifest = pod_manifest(self._settings, checks, self.instance)
        image = self._settings.probe_pod.image
        try:
            pod = self._api("create", "pods", lambda: self._client.create_pod(ns, manifest))
        except ProbePodError as exc:  # refused by admission (Pod Security), quota, RBAC
            raise ProbePodError(f"{exc} (the probe pod of image {image}; "
                                "--probe-pod-image sets the image)") from exc
        try:
            seconds = POD_DEADLINE + WAIT_GRACE
            final = self._api("watch", "pods", lambda: self._client.wait_pod(
                ns, pod.name, lambda p: p.phase in ("Succeeded", "Failed") or cannot_start(p),
                seconds, self._stop))
            if final is None:
                raise ProbePodError(f"probe pod {ns}/{pod.name} was deleted before it ended")
            if final.phase not in ("Succeeded", "Failed") and cannot_start(final):
                raise ProbePodError(
                    f"probe pod {ns}/{pod.name} cannot start its container of image {image} "
                    f"({final.state}); --probe-pod-image sets an image the nodes can pull")
            if final.phase not in ("Succeeded", "Failed"):
                if self._stop.is_set():
                    raise ProbePodError("stopping")
                raise ProbePodError(
                    f"probe pod {ns}/{pod.name} did not end within {seconds}s (phase "
                    f"{final.phase or 'unknown'}{': ' + final.state if final.state else ''}); "
                    f"check --probe-pod-image and the namespace's quota")
            text = self._api("get", "pods/log",
                             lambda: self._client.pod_log(ns, pod.name, CONTAINER))
            try:
                return parse_output(text, checks)
            except ProbePodError as exc:
                raise ProbePodError(f"probe pod {ns}/{pod.name} ({final.phase}, "
                                    f"{final.state or 'no state'}): {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                self._client.delete_pod(ns, pod.name, pod.uid, dry_run=False)

    def _api(self, verb: str, resource: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except ProbePodError:
            raise
        except Exception as exc:
            raise ProbePodError(kube.classify(exc, verb, resource, self._namespace).message
                                ) from exc

    def _remove_leftovers(self) -> None:
        selector = kube.label_selector(tuple(sorted(LABELS.items())))
        pods, _ = self._api("list", "pods", lambda: self._client.list_objects(
            "pods", self._namespace, label_selector=selector, convert=kube.pod_info))
        now = datetime.now(UTC)
        for pod in pods:
            mine = dict(pod.labels).get(INSTANCE_LABEL) == self.instance
            if pod.deleting or not (mine or _age(pod, now) > LEFTOVER_AGE):
                continue
            log.info("deleting a probe pod left behind",
                     extra={"fields": {"pod": f"{self._namespace}/{pod.name}",
                                       "phase": pod.phase}})
            with contextlib.suppress(Exception):
                self._client.delete_pod(self._namespace, pod.name, pod.uid, dry_run=False)
