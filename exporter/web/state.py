"""What the handlers share: the parts built before the server starts (settings, the store
and its exposition, the webhook's token), and the parts that depend on how CoreDNS is
reached, which the composition root builds once the mode is decided (`Late`).
"""

from __future__ import annotations

import asyncio
import time
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

T = TypeVar("T")


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
class AppState:
    settings: Settings
    source: str  # what is probed and why, a sentence (the plan's)
    exposition: Exposition
    store: ResultStore
    token: TokenFile
    parts: Late[Parts]
    started_at: float = field(default_factory=time.time)
    # The webhook's requests in flight, and whether the log has said it is too many.
    webhook_inflight: int = 0
    webhook_busy_told: bool = False
    # The same for /probe.
    probe_inflight: int = 0
    probe_busy_told: bool = False

    @property
    def ready(self) -> bool:
        parts = self.parts.get()
        return parts is not None and parts.ready


STATE = web.AppKey("state", AppState)
