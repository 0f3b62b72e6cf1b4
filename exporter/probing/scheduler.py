"""Probe rounds: interval, spread, bounded concurrency, latest results.

Rounds start on a fixed grid (start + k * interval), so they do not drift. Within a round
each check starts at its own stable offset, spread over the part of the interval that
leaves room for the timeout: load is even instead of a burst at the top of each round,
and a check's probes never overlap each other. The offsets are seeded per process, so two
replicas do not probe in lockstep (the jitter). A semaphore bounds probes in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import typing
import zlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from ..config import ProbeSettings
from ..dns.engine import ProbeHandle, probe, start_probe
from ..metrics.store import ProcessMetrics, ResultStore
from ..model import Check, Outcome, ProbeResult, Query, Target, expand_checks

log = logging.getLogger(__name__)

# Checks due within this many seconds of now start now, together: the scheduler wakes at
# most once per tick instead of once per probe, and the loop handles the probes' sockets
# in batches. A check starts up to a tick early, by about the same amount every round.
# Measured (1,000 UDP checks a second, in-process, uvloop): 178 us of CPU a probe with a
# wake-up per probe, 151 with a 5 ms tick, 138 with 10 ms.
_TICK = 0.01


# Probes a check some other way than over the network directly (the API server's
# port-forward): the check and the timeout in, the result out.
Transport = Callable[[Check, float], Coroutine[Any, Any, ProbeResult]]


class RoundFailed(Exception):
    """A whole round could not be probed (a probe pod that failed); the message says why."""


class Rounds(typing.Protocol):
    """Probes a whole round at once, elsewhere (a probe pod): every check in, the results
    it got out. RoundFailed when the round gave nothing."""

    @property
    def name(self) -> str:
        """What makes the rounds, for the log ("probe pod")."""

    @property
    def min_interval(self) -> float:
        """Seconds between rounds at the least (a round may be costly)."""

    async def round(self, checks: Sequence[Check]) -> dict[Check, ProbeResult]: ...


class _TaskHandle:
    """A probe run as a task (a transport's), as a ProbeHandle."""

    def __init__(self, task: asyncio.Task[ProbeResult]) -> None:
        self._task = task

    @property
    def finished(self) -> bool:
        return self._task.done()

    def cancel(self) -> None:
        self._task.cancel()


class Scheduler:
    """Runs the probe rounds over one transport, chosen when it is built: directly (the
    default), per check through `transport` (a port-forward), or a whole round at a time
    through `rounds` (a probe pod)."""

    def __init__(
        self, settings: ProbeSettings, store: ResultStore, metrics: ProcessMetrics | None = None,
        *, transport: Transport | None = None, rounds: Rounds | None = None,
        source_node: str = "",
    ) -> None:
        """`source_node`: the node this exporter runs on, when known (--node-name): its
        log lines say from where a target failed."""
        assert transport is None or rounds is None, "one transport"
        self._settings = settings
        self._source_node = source_node
        self._store = store
        self._metrics = metrics
        self._transport = transport
        self._rounds = rounds
        self._checks: list[Check] = []  # by start offset
        self._ordered: list[Check] = []  # targets x protocols x queries, as given
        self._offsets: dict[Check, float] = {}
        self._seed = random.getrandbits(32)
        self._semaphore = asyncio.Semaphore(settings.concurrency)  # run_once's bound
        # The rounds' bound: len(self._inflight) against settings.concurrency, waited on
        # through this future when full (a semaphore's acquire and release on every
        # probe were a twentieth of its CPU).
        self._room: asyncio.Future[None] | None = None
        self._inflight: set[ProbeHandle] = set()
        self._idle = asyncio.Event()  # set when no probe is in flight
        self._idle.set()
        self.targets: list[Target] = []
        self.queries: tuple[Query, ...] = ()

    @property
    def checks(self) -> list[Check]:
        """Current checks in target order, then protocol, then query."""
        return list(self._ordered)

    def set_targets(self, targets: Sequence[Target], queries: tuple[Query, ...],
                    ready: Mapping[Target, bool] | None = None) -> None:
        """Replace what is probed (and, for pod targets, their Ready condition); series of
        checks no longer present vanish at once."""
        checks = expand_checks(list(targets), self._settings.protocols, queries)
        spread = max(0.0, self._settings.interval - self._settings.timeout)
        self._offsets = {check: self._fraction(check) * spread for check in checks}
        self._checks = sorted(checks, key=self._offsets.__getitem__)
        self._ordered = checks
        self.targets = list(targets)
        self.queries = queries
        self._store.retain(checks, ready)

    def offset(self, check: Check) -> float:
        """Seconds after each round's start at which `check` is probed."""
        return self._offsets[check]

    def _fraction(self, check: Check) -> float:
        key = "\0".join(check.label_values()).encode()
        return (zlib.crc32(key, self._seed) & 0xFFFFFFFF) / 2**32

    async def _probe(self, check: Check) -> ProbeResult:
        endpoint = check.target.endpoint
        try:
            if self._transport is not None:
                result = await self._transport(check, self._settings.timeout)
            else:
                result = await probe(endpoint.host, endpoint.port, check.protocol, check.query,
                                     self._settings.timeout)
        except Exception as exc:  # a bug in one probe must not stop the rounds
            result = self._internal_error(check, exc)
        self._record(check, result)
        return result

    def _internal_error(self, check: Check, exc: Exception) -> ProbeResult:
        log.error("probe of %s failed unexpectedly", check.target.endpoint.address,
                  exc_info=exc)
        return ProbeResult(Outcome.ERROR, f"internal error: {exc!r}")

    def record(self, check: Check, result: ProbeResult) -> None:
        """Record a result obtained elsewhere."""
        self._record(check, result)

    def _record(self, check: Check, result: ProbeResult) -> None:
        previous = self._store.last(check)
        if not self._store.record(check, result):
            return  # its target is gone: no result, no log line
        if (previous.outcome if previous else Outcome.SUCCESS) is not result.outcome:
            # Once per change, not per probe: a dead target must not flood the log.
            endpoint = check.target.endpoint
            fields = {
                "address": endpoint.address, "kind": check.target.kind.value,
                "pod": check.target.pod, "node": check.target.node,
                "protocol": check.protocol.value, "query": check.query.label,
                "outcome": result.outcome.value, "reason": result.reason,
            }
            if self._source_node:
                fields["source_node"] = self._source_node
            log.log(logging.INFO if result.ok else logging.WARNING, "probe outcome changed",
                    extra={"fields": fields})

    async def run_once(self) -> list[tuple[Check, ProbeResult]]:
        """Probe every check now (no spread), bounded by the concurrency limit; a round
        elsewhere gives the checks it has results for (RoundFailed when none)."""
        if self._rounds is not None:
            results = await self._rounds.round(self._ordered)
            return [(c, results[c]) for c in self._ordered if c in results]

        async def one(check: Check) -> tuple[Check, ProbeResult]:
            async with self._semaphore:
                return check, await self._probe(check)

        return list(await asyncio.gather(*(one(c) for c in self._ordered)))

    async def run(self) -> None:
        """Probe rounds until cancelled."""
        if self._rounds is not None:
            await self._run_elsewhere(self._rounds)
            return
        loop = asyncio.get_running_loop()
        interval = self._settings.interval
        limit = self._settings.concurrency
        start = loop.time()
        k = 0
        while True:
            round_start = start + k * interval
            if self._metrics:
                self._metrics.rounds.inc()
            for check in list(self._checks):
                delay = round_start + self._offsets.get(check, 0.0) - loop.time()
                if delay > _TICK:
                    await asyncio.sleep(delay)
                while len(self._inflight) >= limit:
                    self._room = loop.create_future()
                    await self._room
                self._dispatch(check, loop)
            k += 1
            now = loop.time()
            if now > start + k * interval:
                missed = int((now - start) / interval) + 1 - k
                log.warning(
                    "probe round overran its interval: %d round(s) skipped "
                    "(raise --concurrency or --interval)",
                    missed,
                )
                if self._metrics:
                    self._metrics.round_overruns.inc(missed)
                k += missed
            await asyncio.sleep(max(0.0, start + k * interval - loop.time()))

    def _dispatch(self, check: Check, loop: asyncio.AbstractEventLoop) -> None:
        """Start one probe (there is room for it); its callback records the result and
        makes room. No task per probe: rounds of thousands of probes stay cheap."""
        endpoint = check.target.endpoint
        handle: ProbeHandle | None = None

        def done(result: ProbeResult) -> None:
            if handle is not None:
                self._inflight.discard(handle)
            room = self._room
            if room is not None and not room.done():
                room.set_result(None)
            if not self._inflight:
                self._idle.set()
            try:
                self._record(check, result)
            except Exception:  # the rounds go on whatever one result does
                log.exception("recording the probe of %s failed", endpoint.address)

        try:
            if self._transport is not None:
                handle = self._start_task(check, done)
            else:
                handle = start_probe(endpoint.host, endpoint.port, check.protocol, check.query,
                                     self._settings.timeout, done, loop=loop)
        except Exception as exc:  # a bug in one probe must not stop the rounds
            done(self._internal_error(check, exc))
            return
        if not handle.finished:  # else done() has run already
            self._inflight.add(handle)
            self._idle.clear()

    def _start_task(self, check: Check, done: Callable[[ProbeResult], None]) -> _TaskHandle:
        assert self._transport is not None
        task = asyncio.create_task(self._transport(check, self._settings.timeout))

        def finished(task: asyncio.Task[ProbeResult]) -> None:
            if task.cancelled():
                return
            exc = task.exception()
            done(self._internal_error(check, exc) if isinstance(exc, Exception)
                 else task.result())

        task.add_done_callback(finished)
        return _TaskHandle(task)

    async def drain(self) -> None:
        """Let in-flight probes finish (each is bounded by the timeout), then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.timeout + 1.0):
                await self._idle.wait()
        for handle in list(self._inflight):
            handle.cancel()
        self._inflight.clear()

    async def _run_elsewhere(self, rounds: Rounds) -> None:
        """Rounds made elsewhere, one at a time, every `--interval` (at least the
        transport's min_interval); the first as soon as there are checks. A round that
        fails leaves no result at all (series vanish): none is better than a stale one."""
        loop = asyncio.get_running_loop()
        every = max(self._settings.interval, rounds.min_interval)
        if every > self._settings.interval:
            log.info("%s rounds: a round every %gs (--interval %gs is shorter than such a "
                     "round is worth)", rounds.name, every, self._settings.interval)
        failing = False
        while True:
            started = loop.time()
            checks = list(self._ordered)
            if not checks:  # discovery has not found any target yet
                await asyncio.sleep(min(1.0, every))
                continue
            if self._metrics:
                self._metrics.rounds.inc()
            try:
                results = await rounds.round(checks)
            except RoundFailed as exc:
                self._store.clear()
                if not failing:
                    log.warning(f"{rounds.name} round failed; the checks have no results "
                                "until a round succeeds", extra={"fields": {"error": str(exc)}})
                failing = True
            else:
                if failing:
                    log.info(f"{rounds.name} rounds work again")
                failing = False
                for check in checks:
                    result = results.get(check)
                    if result is not None:
                        self._record(check, result)
            await asyncio.sleep(max(0.0, started + every - loop.time()))
