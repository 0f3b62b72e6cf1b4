"""The `/metrics` body: per-check series rendered directly, the rest by prometheus-client.

prometheus-client's `generate_latest()` builds a Python object per sample and formats it
generically: about 0.5 s for a histogram with 2,000 label sets, all of it blocking the
event loop (and so the probes). The per-check families are rendered here instead, straight
from the result store, and streamed:

- each check's label text is built once and kept while the check lives;
- a scrape first takes a snapshot of every check's counts (per check, all from one
  moment: a check's success, histogram and counters always agree), then writes the
  families chunk by chunk, handing the event loop back between chunks, so a scrape never
  holds probes up for more than a chunk;
- no body-sized string is ever built: with 1,000 pods the body is about 10 MB, and
  allocating and copying strings that size blocks the loop for tens of milliseconds and
  leaves the process that much bigger.

Process-level metrics (build info, rounds, remediations, process_* and python_*) stay
ordinary prometheus-client metrics in the registry, written last; with OpenMetrics their
`# EOF` ends the body.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ..model import TARGET_LABELS, Target
from .store import BUCKETS, OUTCOMES, ResultStore

# Checks (or targets) read between two yields to the event loop: about a millisecond.
CHUNK = 100
# Bytes of series written at once before the loop gets a turn. Pieces stay below glibc's
# mmap threshold (128 KiB): larger ones are mapped and unmapped on every scrape, and their
# page faults cost more than the rendering (with 330 KB pieces, a third of a scrape).
PIECE = 64 * 1024

_LE = [*(repr(b) for b in BUCKETS), "+Inf"]  # as Go and prometheus-client print `le`
_TARGET_NAMES = TARGET_LABELS[:6]  # without protocol and query

# One check's lines of a family, as one bytes template: `%s` takes the check's label text
# (the same bytes at every `%s`), then each sample's value. One `%` a family and check,
# in bytes from the start: formatting line by line and encoding after cost half as much
# again, for the 10 MB a 1,000-pod cluster's scrape is.
_SUCCESS = b"dnsprobe_success{%s} %d\n"
_DURATIONS = (
    "".join(f'dnsprobe_duration_seconds_bucket{{%s,le="{le}"}} %d\n' for le in _LE)
    + "dnsprobe_duration_seconds_count{%s} %d\ndnsprobe_duration_seconds_sum{%s} %r\n"
).encode()
_PROBES = "".join(
    f'dnsprobe_probes_total{{%s,result="{outcome}"}} %d\n' for outcome in OUTCOMES
).encode()

OPENMETRICS = "application/openmetrics-text"

SUCCESS_HELP = "1 if the most recent probe of this target, protocol and query passed, else 0."
DURATION_HELP = "Round-trip time of probes that got a response (TCP includes the handshake)."
PROBES_HELP = "Probes by outcome."
TARGET_INFO_HELP = "One per pod target; label ready is the pod's Ready condition."


def escape(value: str) -> str:
    """A label value as the exposition formats quote it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True))


def _header(name: str, kind: str, help_text: str, openmetrics: bool) -> bytes:
    # OpenMetrics names a counter family without its `_total`; the text format with it.
    family = name.removesuffix("_total") if openmetrics and kind == "counter" else name
    return f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n".encode()


# One check's series values at the moment of the snapshot: its labels, whether it passed,
# its bucket counts, its round-trip sum and its outcome counts. A tuple: a scrape makes
# one for every check.
_Row = tuple[bytes, bool, list[int], float, list[int]]


class Exposition:
    """Streams the store's checks and pod targets, then the registry."""

    def __init__(self, store: ResultStore, registry: CollectorRegistry) -> None:
        self._store = store
        self._registry = registry
        self._target_labels: dict[Target, str] = {}

    @staticmethod
    def content_type(accept: str) -> str:
        """The format a request with this Accept header gets."""
        return choose_encoder(accept)[1]

    async def render(self, accept: str = "") -> bytes:
        """The whole body at once (for tests and small stores; /metrics streams)."""
        return b"".join([chunk async for chunk in self.stream(accept)])

    async def stream(self, accept: str = "") -> AsyncIterator[bytes]:
        """The body in pieces of at most a chunk's worth of series each."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith(OPENMETRICS)
        rows = await self._snapshot()
        for family, kind, help_text, render in _FAMILIES:
            yield _header(family, kind, help_text, openmetrics)
            pieces: list[bytes] = []
            size = 0
            for row in rows:
                text = render(row)
                pieces.append(text)
                size += len(text)
                if size >= PIECE:
                    yield b"".join(pieces)
                    pieces, size = [], 0
                    await asyncio.sleep(0)
            if pieces:
                yield b"".join(pieces)
        yield _header("dnsprobe_target_info", "gauge", TARGET_INFO_HELP, openmetrics)
        async for chunk in self._target_info():
            yield chunk
        # Last: the registry's families are few, and OpenMetrics' `# EOF`, which its
        # encoder appends, must end the body.
        yield encoder(self._registry)

    async def _snapshot(self) -> list[_Row]:
        states = self._store.states()
        rows: list[_Row] = []
        for start in range(0, len(states), CHUNK * 4):
            if start:
                await asyncio.sleep(0)
            for check, state in states[start : start + CHUNK * 4]:
                text = state.labels
                if not text:  # kept with the check's state, and gone with it
                    text = state.labels = label_text(TARGET_LABELS, check.label_values()).encode()
                rows.append((text, state.last.ok, state.bucket_counts[:], state.rtt_sum,
                             state.outcome_counts[:]))
        return rows

    async def _target_info(self) -> AsyncIterator[bytes]:
        pods = self._store.ready()
        known, labels = self._target_labels, {}
        for start in range(0, len(pods), CHUNK * 4):
            lines = []
            for target, ready in pods[start : start + CHUNK * 4]:
                text = known.get(target)
                if text is None:
                    # protocol and query do not apply to a pod: empty, as DESIGN.md says.
                    text = label_text(_TARGET_NAMES, target.label_values())
                    text += ',protocol="",query=""'
                labels[target] = text
                ready_text = "true" if ready else "false"
                lines.append(f'dnsprobe_target_info{{{text},ready="{ready_text}"}} 1\n')
            yield "".join(lines).encode()
            await asyncio.sleep(0)
        self._target_labels = labels


def _success(row: _Row) -> bytes:
    return _SUCCESS % (row[0], row[1])


def _durations(row: _Row) -> bytes:
    # (labels, value) for each bucket, then the count, then the sum.
    values: list[bytes | int | float] = [row[0]] * (2 * len(_LE) + 4)
    cumulative = list(itertools.accumulate(row[2]))
    values[1 : 2 * len(_LE) : 2] = cumulative
    values[-3] = cumulative[-1]
    values[-1] = row[3]
    return _DURATIONS % tuple(values)


def _probes(row: _Row) -> bytes:
    values: list[bytes | int] = [row[0]] * (2 * len(OUTCOMES))
    values[1::2] = row[4]
    return _PROBES % tuple(values)


# The per-check families in the order they are written, and how a row renders in each.
_FAMILIES: tuple[tuple[str, str, str, Callable[[_Row], bytes]], ...] = (
    ("dnsprobe_success", "gauge", SUCCESS_HELP, _success),
    ("dnsprobe_duration_seconds", "histogram", DURATION_HELP, _durations),
    ("dnsprobe_probes_total", "counter", PROBES_HELP, _probes),
)
