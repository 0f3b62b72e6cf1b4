"""A `Watcher` keeps one list of objects current in a thread of its own (list, then
watch from the list's resourceVersion; resume after a watch ends; relist on 410 Gone;
back off with jitter on errors) and hands what it sees to a callback as `Listed`,
`Changed`, `Failed` and `Recovered` events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes
import urllib3

from .client import WATCH_SECONDS, Client, _lines
from .errors import ApiProblem, classify
from .records import _dict, _str

log = logging.getLogger(__name__)


# Back-off after an error: doubling from BACKOFF_MIN to BACKOFF_MAX, with full jitter.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0




class Backoff:
    """Waits between retries of the API: doubling from `low` to `high` seconds, each
    drawn at random below that bound (full jitter), so that replicas do not retry in step."""

    def __init__(self, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX) -> None:
        self.low, self.high = low, high
        self._bound = low

    def next(self) -> float:
        """The next wait, in seconds."""
        wait = random.uniform(0, self._bound)
        self._bound = min(self._bound * 2, self.high)
        return wait

    def reset(self) -> None:
        """After a success: the next failure waits little again."""
        self._bound = self.low


@dataclass(frozen=True, slots=True)
class Listed:
    """The complete current set (after a list or relist)."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Changed:
    type: str  # ADDED, MODIFIED, DELETED
    item: Any


@dataclass(frozen=True, slots=True)
class Failed:
    problem: ApiProblem


@dataclass(frozen=True, slots=True)
class Recovered:
    pass


WatchEvent = Listed | Changed | Failed | Recovered


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""




class Watcher:
    """Keeps one filtered list of `resource` in `namespace` current, in a daemon thread.

    Daemon, because a blocked read cannot be interrupted portably: `stop()` shuts the
    open watch's socket down, and anything still blocked dies with the process instead of
    holding up its exit.
    """

    def __init__(
        self,
        client: Client,
        resource: str,
        namespace: str,
        convert: Callable[[Mapping[str, Any]], Any],
        emit: Callable[[WatchEvent], None],
        *,
        label_selector: str = "",
        field_selector: str = "",
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self._client = client
        self._watch_seconds = watch_seconds
        self.resource = resource
        self.namespace = namespace
        self._convert = convert
        self._emit = emit
        self._selectors = {"label_selector": label_selector, "field_selector": field_selector}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response: urllib3.HTTPResponse | None = None
        self._failing = False
        self._start_version = ""
        self.watches = 0  # watch requests opened (a resumed watch is a new one)
        self.relists = 0  # lists after a 410
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{resource}-{namespace}", daemon=True
        )

    def start(self, resource_version: str = "") -> None:
        """Start watching; from `resource_version` if given (else list first)."""
        self._start_version = resource_version
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._response is not None:
                with contextlib.suppress(Exception):
                    self._response.shutdown()

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            self._emit(Recovered())

    def _fail(self, exc: BaseException, verb: str) -> None:
        self._failing = True
        self._emit(Failed(classify(exc, verb, self.resource, self.namespace)))

    def _run(self) -> None:
        backoff = Backoff()
        version = self._start_version
        while not self._stop.is_set():
            verb = "watch" if version else "list"
            try:
                if not version:
                    items, version = self._client.list_objects(
                        self.resource, self.namespace, convert=self._convert,
                        **self._selectors,
                    )
                    self._ok()
                    self._emit(Listed(tuple(items)))
                version = self._watch(version)
                backoff.reset()
            except _Gone:
                log.info("watch of %s in %s expired (410 Gone): listing again",
                         self.resource, self.namespace)
                self.relists += 1
                version = ""
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._fail(exc, verb)
                self._stop.wait(backoff.next())

    def _watch(self, version: str) -> str:
        """Follow changes from `version` until the server ends the watch; the last version."""
        response = self._client.watch(
            self.resource, self.namespace, version, seconds=self._watch_seconds,
            **self._selectors,
        )
        with self._lock:
            if self._stop.is_set():
                response.release_conn()
                return version
            self._response = response
        self.watches += 1
        self._ok()
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = _str(event.get("type")), _dict(event.get("object"))
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise kubernetes.client.ApiException(
                        status=obj.get("code") or 500, reason=_str(obj.get("message"))
                    )
                version = _str(_dict(obj.get("metadata")).get("resourceVersion")) or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._emit(Changed(kind, self._convert(obj)))
            return version
        finally:
            with self._lock:
                self._response = None
            response.release_conn()

