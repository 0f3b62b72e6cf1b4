"""Self-remediation (`--self-remediate`): the exporter judges a CoreDNS pod sick from its
own probes, without Prometheus or Alertmanager, and sends it through the remediator's
guards and acts, exactly as an alert from the webhook (trigger `self`).

The rule, per pod, from the results the scheduler records (the store):

1. suspect: every one of its UDP checks (one per query) failed in SUSPECT_AFTER results in
   a row, while another pod passed one of those queries in its latest result. A pod that
   still answers some query is not UDP-dead; a query every pod fails is a shared cause:
   the upstreams (an external name fails, the cluster's own passes), the network, the
   API's answer; never one pod's fault, nothing restarted.
2. escalate: ESCALATION probes of that check at once, each on a socket of its own (fresh
   source ports, as clients send); one answer that passes clears the pod.
3. the remediator: its guards (cooldown, min-ready, rollout, the Lease shared across
   replicas, dry-run) and its own confirmation, two more probes, as for an alert.

Why these numbers (docs/performance.md, "Self-remediation"): with independent loss p on
every probe, a healthy pod is evicted only when 2 + 8 + 2 probes in a row all fail
(p^12 per suspicion), while a UDP-dead pod is evicted about two intervals after it died.
A pod that answers slowly but within the timeout passes every probe: never suspect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from ..config import Settings
from ..dns.engine import probe
from ..metrics.store import ResultStore
from ..model import Check, Kind, ProbeResult, Protocol
from .alerts import Alert, Payload
from .remediator import ApiUnavailable, Remediator

log = logging.getLogger(__name__)

SUSPECT_AFTER = 2  # failed UDP results in a row
ESCALATION = 8  # probes at once of a suspect
POLL = 1.0  # seconds between looks at the results
# Seconds a pod decided on is left alone while it keeps failing (a skip for cooldown or
# min-ready is decided again after this, not at every round).
HOLD = 60.0
ALERT_NAME = "CoreDNSPodUDPFailing"


@dataclass
class _Streak:
    """A UDP check's failures in a row, counted once per result."""

    failed: int = 0
    since: float = 0.0  # when the first failure of the streak was probed (unix time)
    seen: float = 0.0  # started_at of the newest result counted


class Verdict(NamedTuple):
    suspects: list[Check]  # one check per suspect pod
    shared: frozenset[str]  # the queries every pod fails over UDP: a shared cause
    passing: frozenset[str]  # the queries some pod passes over UDP in its latest result


@dataclass
class Tracker:
    """The pure part: results in, suspects out. No I/O, tested on its own."""

    streaks: dict[Check, _Streak] = field(default_factory=dict)

    def observe(self, latest: dict[Check, ProbeResult]) -> None:
        """Count each UDP pod check's new result (by its start time) into its streak."""
        current = {c for c in latest if _watched(c)}
        for check in [c for c in self.streaks if c not in current]:
            del self.streaks[check]
        for check in current:
            result = latest[check]
            streak = self.streaks.setdefault(check, _Streak())
            if result.started_at <= streak.seen:
                continue  # the same result as at the last look
            streak.seen = result.started_at
            if result.ok:
                streak.failed, streak.since = 0, 0.0
            else:
                if streak.failed == 0:
                    streak.since = result.started_at
                streak.failed += 1

    def suspects(self, latest: dict[Check, ProbeResult]) -> Verdict:
        """One check per suspect pod, the queries every pod fails, those some pod passes.

        A pod is suspect when every one of its UDP checks failed SUSPECT_AFTER results in a
        row (its UDP answers nothing) while another pod passes one of those queries. A pod
        that answers some query is not UDP-dead: an external name failing there while it
        still passes elsewhere is a cache expiring first (the upstreams are down), not a
        reason to restart it. A query that every pod fails is a shared cause."""
        passing: dict[str, set[str]] = {}
        for c in latest:
            if _watched(c) and latest[c].ok:
                passing.setdefault(c.query.label, set()).add(c.target.pod)
        by_pod: dict[str, list[Check]] = {}
        for c in self.streaks:
            by_pod.setdefault(c.target.pod, []).append(c)
        found: list[Check] = []
        for pod, checks in by_pod.items():
            if all(self.streaks[c].failed >= SUSPECT_AFTER for c in checks):
                answered = [c for c in checks if passing.get(c.query.label, set()) - {pod}]
                found += answered[:1]
        shared = frozenset(c.query.label for c, s in self.streaks.items()
                           if s.failed >= SUSPECT_AFTER and not passing.get(c.query.label))
        return Verdict(found, shared, frozenset(passing))


def _watched(check: Check) -> bool:
    return check.target.kind is Kind.POD and check.protocol is Protocol.UDP


class SelfRemediation:
    """Looks at the results every POLL seconds; escalates a suspect; hands a sick pod to
    the remediator as an alert with trigger `self`."""

    def __init__(self, settings: Settings, store: ResultStore, remediator: Remediator) -> None:
        self._settings = settings
        self._store = store
        self._remediator = remediator
        self._tracker = Tracker()
        self._held: dict[str, float] = {}  # pod -> monotonic time until it is left alone
        self._shared: frozenset[str] = frozenset()  # the queries every pod fails

    async def run(self) -> None:
        log.info("self-remediation on", extra={"fields": {
            "suspect_after": SUSPECT_AFTER, "escalation": ESCALATION,
            "mode": self._settings.remediation.mode.value}})
        while True:
            try:
                await self.look()
            except Exception:  # a bug here must not end the rounds or the exporter
                log.exception("self-remediation: a look at the results failed")
            await asyncio.sleep(POLL)

    async def look(self) -> None:
        latest = self._store.latest()
        self._tracker.observe(latest)
        suspects, shared, passing = self._tracker.suspects(latest)
        if shared != self._shared:
            self._shared = shared
            self._say_shared(shared, passing)
        now = time.monotonic()
        for check in suspects:
            pod = check.target.pod
            if self._held.get(pod, 0.0) > now:
                continue
            streak = self._tracker.streaks[check]
            if await self._answers(check):
                log.info("self-remediation: a suspect pod answered when probed again",
                         extra={"fields": {"pod": pod, "failed_in_a_row": streak.failed}})
                streak.failed, streak.since = 0, 0.0
                continue
            self._held[pod] = now + HOLD
            await self._decide(check, streak.since)

    @staticmethod
    def _say_shared(shared: frozenset[str], passing: frozenset[str]) -> None:
        if not shared:
            return
        if passing:
            log.warning("self-remediation: every CoreDNS pod fails some queries over UDP "
                        "while they answer others: an upstream failure (the resolvers "
                        "CoreDNS forwards to), nothing is restarted for it",
                        extra={"fields": {"failing": sorted(shared),
                                          "passing": sorted(passing)}})
        else:
            log.warning("self-remediation: every CoreDNS pod fails over UDP, a shared "
                        "cause (upstreams, the network): nothing is restarted for it",
                        extra={"fields": {"failing": sorted(shared)}})

    async def _answers(self, check: Check) -> bool:
        """Any of ESCALATION probes at once passes."""
        endpoint, timeout = check.target.endpoint, self._settings.probe.timeout
        results = await asyncio.gather(*(
            probe(endpoint.host, endpoint.port, Protocol.UDP, check.query, timeout)
            for _ in range(ESCALATION)))
        return any(r.ok for r in results)

    async def _decide(self, check: Check, since: float) -> None:
        started = datetime.fromtimestamp(since, UTC)
        text = started.isoformat(timespec="microseconds").replace("+00:00", "Z")
        target = check.target
        alert = Alert(
            status="firing",
            labels=tuple(sorted({"alertname": ALERT_NAME, "namespace": target.namespace,
                                 "pod": target.pod}.items())),
            starts_at=started, starts_at_text=text, fingerprint=f"self/{target.pod}",
            trigger="self")
        try:
            await self._remediator.handle(Payload(group_key="self", truncated_alerts=0,
                                                  alerts=(alert,)))
        except ApiUnavailable as exc:
            log.warning("self-remediation: the Kubernetes API is unavailable; the pod is "
                        "judged again later", extra={"fields": {"pod": target.pod,
                                                                "error": str(exc)}})
