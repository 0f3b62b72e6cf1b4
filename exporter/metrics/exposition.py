"""The `/metrics` body: per-check series rendered directly, the rest by prometheus-client.

prometheus-client's `generate_latest()` builds a Python object per sample and formats it
generically: about 0.5 s for a histogram with 2,000 label sets, all of it blocking the
event loop (and so the probes). The per-check families are rendered here instead, straight
from the result store, and streamed:

- each check's label text is built once and kept while the check lives;
- a scrape first takes a snapshot of every check's values, as the templates take them
  (per check, all from one moment: a check's success, histogram and counters always
  agree), then writes the families piece by piece, one `%` a piece of about 64 KiB,
  handing the event loop back between pieces, so a scrape never holds probes up for
  more than a piece;
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
from collections.abc import AsyncIterator
from typing import NamedTuple

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
# (the same bytes at every `%s`), then each sample's value. A piece of the body is this
# template repeated for as many checks as fill it, formatted by one `%`: in bytes from
# the start (formatting str and encoding after cost half as much again) and with no join
# of per-check pieces, for the 10 MB a 1,000-pod cluster's scrape is.
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


# The values a family's template takes, for every check in order: label text, then the
# sample's value, for each sample (in `_DURATIONS`: each bucket's, the count, the sum).
_Values = list[bytes | int | float]
_DURATION_VALUES = 2 * len(_LE) + 4
_PROBE_VALUES = 2 * len(OUTCOMES)


class _Snapshot(NamedTuple):
    """Every check's values at one moment (a check's success, histogram and counters
    always agree), one list per family, and the length of the first check's labels."""

    success: _Values
    durations: _Values
    probes: _Values
    label_length: int


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
        snapshot = await self._snapshot()
        for family, values in zip(_FAMILIES, snapshot[:3], strict=True):
            yield _header(family.name, family.kind, family.help_text, openmetrics)
            async for piece in family.pieces(values, snapshot.label_length):
                yield piece
        yield _header("dnsprobe_target_info", "gauge", TARGET_INFO_HELP, openmetrics)
        async for chunk in self._target_info():
            yield chunk
        # Last: the registry's families are few, and OpenMetrics' `# EOF`, which its
        # encoder appends, must end the body.
        yield encoder(self._registry)

    async def _snapshot(self) -> _Snapshot:
        states = self._store.states()
        success: _Values = []
        durations: _Values = []
        probes: _Values = []
        last = len(_LE) - 1
        for start in range(0, len(states), CHUNK * 4):
            if start:
                await asyncio.sleep(0)
            for check, state in states[start : start + CHUNK * 4]:
                text = state.labels
                if not text:  # kept with the check's state, and gone with it
                    text = state.labels = label_text(TARGET_LABELS, check.label_values()).encode()
                success += (text, state.last.ok)
                values: _Values = [text] * _DURATION_VALUES
                cumulative = list(itertools.accumulate(state.bucket_counts))
                values[1 : 2 * len(_LE) : 2] = cumulative
                values[-3] = cumulative[last]
                values[-1] = state.rtt_sum
                durations += values
                values = [text] * _PROBE_VALUES
                values[1::2] = state.outcome_counts
                probes += values
        return _Snapshot(success, durations, probes, len(states[0][1].labels) if states else 0)

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


class _Family(NamedTuple):
    """A per-check family: its header and its template."""

    name: str
    kind: str
    help_text: str
    template: bytes

    async def pieces(self, values: _Values, label_length: int) -> AsyncIterator[bytes]:
        """The family's series from every check's values, about PIECE bytes at a time,
        the loop's turn between."""
        per_check = self.template.count(b"%")  # the templates have no literal %
        # As many checks as fill a piece, sized by the first check's labels.
        per_piece = max(1, PIECE // (len(self.template) + per_check // 2 * label_length))
        full, step = self.template * per_piece, per_piece * per_check
        for start in range(0, len(values), step):
            piece = values[start : start + step]
            template = full if len(piece) == step else self.template * (len(piece) // per_check)
            yield template % tuple(piece)
            await asyncio.sleep(0)


# The per-check families in the order they are written.
_FAMILIES = (
    _Family("dnsprobe_success", "gauge", SUCCESS_HELP, _SUCCESS),
    _Family("dnsprobe_duration_seconds", "histogram", DURATION_HELP, _DURATIONS),
    _Family("dnsprobe_probes_total", "counter", PROBES_HELP, _PROBES),
)
