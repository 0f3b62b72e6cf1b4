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
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .collector import ProcessMetrics, ResultStore
from .config import ProbeSettings
from .model import Outcome, ProbeResult, Query
from .probe import ProbeHandle, probe, start_probe
from .targets import Check, Target, expand_checks

log = logging.getLogger(__name__)

# Sleeps shorter than this are not worth a timer: the check starts now.
_MIN_SLEEP = 0.001
# Results kept for the status page and /probe-style history.
HISTORY = 100


# Probes a check some other way than over the network directly (the API server's
# port-forward): the check and the timeout in, the result out.
Transport = Callable[[Check, float], Coroutine[Any, Any, ProbeResult]]


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
    def __init__(
        self, settings: ProbeSettings, store: ResultStore, metrics: ProcessMetrics | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._checks: list[Check] = []  # by start offset
        self._ordered: list[Check] = []  # targets x protocols x queries, as given
        self._offsets: dict[Check, float] = {}
        self._seed = random.getrandbits(32)
        self._semaphore = asyncio.Semaphore(settings.concurrency)
        self._inflight: set[ProbeHandle] = set()
        self._idle = asyncio.Event()  # set when no probe is in flight
        self._idle.set()
        self.targets: list[Target] = []
        self.transport: Transport | None = None
        self.history: deque[tuple[Check, ProbeResult]] = deque(maxlen=HISTORY)

    @property
    def checks(self) -> list[Check]:
        """Current checks in target order, then protocol, then query."""
        return list(self._ordered)

    def set_targets(self, targets: Sequence[Target], queries: tuple[Query, ...]) -> None:
        """Replace what is probed; series of checks no longer present vanish at once."""
        checks = expand_checks(list(targets), self._settings.protocols, queries)
        spread = max(0.0, self._settings.interval - self._settings.timeout)
        self._offsets = {check: self._fraction(check) * spread for check in checks}
        self._checks = sorted(checks, key=self._offsets.__getitem__)
        self._ordered = checks
        self.targets = list(targets)
        self._store.retain(checks)

    def offset(self, check: Check) -> float:
        """Seconds after each round's start at which `check` is probed."""
        return self._offsets[check]

    def _fraction(self, check: Check) -> float:
        key = "\0".join(check.label_values()).encode()
        return (zlib.crc32(key, self._seed) & 0xFFFFFFFF) / 2**32

    async def _probe(self, check: Check) -> ProbeResult:
        endpoint = check.target.endpoint
        try:
            if self.transport is not None:
                result = await self.transport(check, self._settings.timeout)
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
        """Record a result obtained elsewhere (a probe pod's)."""
        self._record(check, result)

    def forget(self) -> None:
        """Drop every check's results (their series vanish until the next results): when
        a round could not probe, no result is better than a stale one."""
        self._store.clear()

    def _record(self, check: Check, result: ProbeResult) -> None:
        previous = self._store.last(check)
        if not self._store.record(check, result):
            return  # its target is gone: no result, no history, no log line
        self.history.append((check, result))
        if (previous.outcome if previous else Outcome.SUCCESS) is not result.outcome:
            # Once per change, not per probe: a dead target must not flood the log.
            endpoint = check.target.endpoint
            log.log(
                logging.INFO if result.ok else logging.WARNING,
                "probe outcome changed",
                extra={"fields": {
                    "address": endpoint.address, "kind": check.target.kind.value,
                    "pod": check.target.pod, "protocol": check.protocol.value,
                    "query": check.query.label, "outcome": result.outcome.value,
                    "reason": result.reason,
                }},
            )

    async def run_once(self) -> list[tuple[Check, ProbeResult]]:
        """Probe every check now (no spread), bounded by the concurrency limit."""

        async def one(check: Check) -> tuple[Check, ProbeResult]:
            async with self._semaphore:
                return check, await self._probe(check)

        return list(await asyncio.gather(*(one(c) for c in self._ordered)))

    async def run(self) -> None:
        """Probe rounds until cancelled."""
        loop = asyncio.get_running_loop()
        interval = self._settings.interval
        start = loop.time()
        k = 0
        while True:
            round_start = start + k * interval
            if self._metrics:
                self._metrics.rounds.inc()
            for check in list(self._checks):
                delay = round_start + self._offsets.get(check, 0.0) - loop.time()
                if delay > _MIN_SLEEP:
                    await asyncio.sleep(delay)
                await self._semaphore.acquire()
                self._dispatch(check)
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

    def _dispatch(self, check: Check) -> None:
        """Start one probe in a slot already taken; its callback records the result and
        frees the slot. No task per probe: rounds of thousands of probes stay cheap."""
        endpoint = check.target.endpoint
        handle: ProbeHandle | None = None

        def done(result: ProbeResult) -> None:
            if handle is not None:
                self._inflight.discard(handle)
            self._semaphore.release()
            if not self._inflight:
                self._idle.set()
            try:
                self._record(check, result)
            except Exception:  # the rounds go on whatever one result does
                log.exception("recording the probe of %s failed", endpoint.address)

        try:
            if self.transport is not None:
                handle = self._start_task(check, done)
            else:
                handle = start_probe(endpoint.host, endpoint.port, check.protocol, check.query,
                                     self._settings.timeout, done)
        except Exception as exc:  # a bug in one probe must not stop the rounds
            done(self._internal_error(check, exc))
            return
        if not handle.finished:  # else done() has run already
            self._inflight.add(handle)
            self._idle.clear()

    def _start_task(self, check: Check, done: Callable[[ProbeResult], None]) -> _TaskHandle:
        assert self.transport is not None
        task = asyncio.create_task(self.transport(check, self._settings.timeout))

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
