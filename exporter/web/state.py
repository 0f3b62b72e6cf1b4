"""What the handlers share: the parts built before the server starts (settings, the store
and its exposition, the webhook's token), and the parts that depend on how CoreDNS is
reached, which the composition root builds once the mode is decided (`Late`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from aiohttp import web

from ..config import Settings
from ..discovery.watch import Discovery
from ..metrics.exposition import Exposition
from ..metrics.store import ResultStore
from ..probing.scheduler import Scheduler
from ..remediation.remediator import NoRemediation, Remediator
from ..remediation.selfheal import SelfRemediation
from .auth import TokenFile

log = logging.getLogger(__name__)

T = TypeVar("T")

# Requests handled at once: the webhook's (Alertmanager sends a few), /probe's (far above
# what Prometheus sends: one per scrape target per interval).
MAX_WEBHOOK_INFLIGHT = 8
MAX_PROBE_INFLIGHT = 64


class Late(Generic[T]):
    """A value that exists from some moment on, set once: handlers read it (None until
    then) or wait for it a bounded time."""

    def __init__(self) -> None:
        self._value: T | None = None
        self._set = asyncio.Event()

    def set(self, value: T) -> None:
        assert self._value is None, "set once"
        self._value = value
        self._set.set()

    def get(self) -> T | None:
        return self._value

    async def wait(self, timeout: float) -> T | None:
        if self._value is None:
            try:
                await asyncio.wait_for(self._set.wait(), timeout)
            except TimeoutError:
                return None
        return self._value


@dataclass(frozen=True)
class Parts:
    """Everything that depends on the mode, each part complete: the scheduler with its
    transport, the discovery of that mode (None for static targets), the remediator with
    its way to confirm (or the static exporter's NoRemediation), and the self-remediation
    over the same remediator when it is on."""

    mode: str  # a Mode's value, or "static"
    scheduler: Scheduler
    remediator: Remediator | NoRemediation
    discovery: Discovery | None = None
    self_remediation: SelfRemediation | None = None  # --self-remediate, in-cluster mode

    @property
    def ready(self) -> bool:
        """Static targets are ready at once; discovered ones once discovery has synced."""
        return self.discovery is None or self.discovery.synced


@dataclass
class InFlight:
    """One endpoint's requests handled at once, bounded: beyond `limit`, 503 with
    Retry-After (a flood neither fills memory nor queues without end), said once in the
    log per flood."""

    name: str
    limit: int
    retry_after: int  # seconds
    what: str
    close: bool = False  # close the connection of a refused request
    count: int = 0
    told: bool = False

    def refuse(self) -> web.Response | None:
        """The 503 when `limit` are in flight already, else None."""
        if self.count < self.limit:
            return None
        if not self.told:
            self.told = True
            log.warning(f"{self.name}: too many requests at once; answering 503 until some end",
                        extra={"fields": {"in_flight": self.count}})
        headers = {"Retry-After": str(self.retry_after)} | (
            {"Connection": "close"} if self.close else {})
        return web.Response(status=503, text=f"busy: too many {self.what} at once\n",
                            headers=headers)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self.told = False


@dataclass
class AppState:
    settings: Settings
    source: str  # what is probed and why, a sentence (the plan's)
    exposition: Exposition
    store: ResultStore
    token: TokenFile
    parts: Late[Parts]
    started_at: float = field(default_factory=time.time)
    # Requests in flight: the webhook's (bodies read, or waiting for the remediator), and
    # /probe's (each holds a socket up to its timeout).
    webhook: InFlight = field(default_factory=lambda: InFlight(
        "webhook", MAX_WEBHOOK_INFLIGHT, retry_after=10, what="webhook requests",
        close=True))
    probe: InFlight = field(default_factory=lambda: InFlight(
        "/probe", MAX_PROBE_INFLIGHT, retry_after=1, what="/probe requests"))

    @property
    def ready(self) -> bool:
        parts = self.parts.get()
        return parts is not None and parts.ready


STATE = web.AppKey("state", AppState)
