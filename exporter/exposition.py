"""The `/metrics` body: per-check series rendered directly, the rest by prometheus-client.

prometheus-client's `generate_latest()` builds a Python object per sample and formats it
generically: about 0.5 s for a histogram with 2,000 label sets, all of it blocking the
event loop (and so the probes). The per-check families here are rendered straight from
the result store instead: each check's label text is built once and kept while the check
lives, every value is an int except the histogram sum, and the work is done in chunks
that hand the event loop back between them, so a scrape never holds probes up for more
than a chunk. A chunk renders all three families of its checks at once: a check's
success, histogram and counters in one scrape always come from the same moment.

Process-level metrics (build info, rounds, remediations, process_* and python_*) stay
ordinary prometheus-client metrics in the registry, rendered after these; with OpenMetrics
its `# EOF` ends the body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .collector import BUCKETS, OUTCOMES, ResultStore
from .targets import TARGET_LABELS, Check, Target

# Checks rendered between two yields to the event loop (about a millisecond of work).
CHUNK = 100

_LE = [*(repr(b) for b in BUCKETS), "+Inf"]  # as Go and prometheus-client print `le`
_TARGET_NAMES = TARGET_LABELS[:6]  # without protocol and query

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


def _header(name: str, kind: str, help_text: str, openmetrics: bool) -> str:
    # OpenMetrics names a counter family without its `_total`; the text format with it.
    family = name.removesuffix("_total") if openmetrics and kind == "counter" else name
    return f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n"


class Exposition:
    """Renders the store's checks and discovery's pod targets, then the registry."""

    def __init__(
        self,
        store: ResultStore,
        pod_ready: Mapping[Target, bool],
        registry: CollectorRegistry,
    ) -> None:
        self._store = store
        self._pod_ready = pod_ready
        self._registry = registry
        self._check_labels: dict[Check, str] = {}
        self._target_labels: dict[Target, str] = {}

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The body and its content type for a request with this Accept header."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith(OPENMETRICS)
        parts = [await self._checks(openmetrics), await self._targets(openmetrics)]
        # Rendered last: the registry's own families are few, and OpenMetrics' `# EOF`
        # that it appends must end the body.
        parts.append(encoder(self._registry).decode())
        return "".join(parts).encode(), content_type

    async def _checks(self, openmetrics: bool) -> str:
        states = self._store.states()
        known, labels = self._check_labels, {}
        success = [_header("dnsprobe_success", "gauge", SUCCESS_HELP, openmetrics)]
        duration = [_header("dnsprobe_duration_seconds", "histogram", DURATION_HELP, openmetrics)]
        probes = [_header("dnsprobe_probes_total", "counter", PROBES_HELP, openmetrics)]
        for start in range(0, len(states), CHUNK):
            if start:
                await asyncio.sleep(0)
            # Lines are joined per chunk, so a scrape holds few small strings at a time.
            s: list[str] = []
            d: list[str] = []
            p: list[str] = []
            for check, state in states[start : start + CHUNK]:
                text = known.get(check)
                if text is None:
                    text = label_text(TARGET_LABELS, check.label_values())
                labels[check] = text
                s.append(f"dnsprobe_success{{{text}}} {1 if state.last.ok else 0}\n")
                cumulative = 0
                for le, count in zip(_LE, state.bucket_counts, strict=True):
                    cumulative += count
                    d.append(f'dnsprobe_duration_seconds_bucket{{{text},le="{le}"}} {cumulative}\n')
                d.append(f"dnsprobe_duration_seconds_count{{{text}}} {cumulative}\n")
                d.append(f"dnsprobe_duration_seconds_sum{{{text}}} {state.rtt_sum!r}\n")
                for outcome, count in zip(OUTCOMES, state.outcome_counts, strict=True):
                    p.append(f'dnsprobe_probes_total{{{text},result="{outcome}"}} {count}\n')
            success.append("".join(s))
            duration.append("".join(d))
            probes.append("".join(p))
        self._check_labels = labels  # checks gone since the last scrape are forgotten
        return "".join(success) + "".join(duration) + "".join(probes)

    async def _targets(self, openmetrics: bool) -> str:
        pods = list(self._pod_ready.items())
        known, labels = self._target_labels, {}
        lines = [_header("dnsprobe_target_info", "gauge", TARGET_INFO_HELP, openmetrics)]
        for start in range(0, len(pods), CHUNK * 4):
            if start:
                await asyncio.sleep(0)
            for target, ready in pods[start : start + CHUNK * 4]:
                text = known.get(target)
                if text is None:
                    # protocol and query do not apply to a pod: empty, as DESIGN.md says.
                    text = label_text(_TARGET_NAMES, target.label_values())
                    text += ',protocol="",query=""'
                labels[target] = text
                ready_text = "true" if ready else "false"
                lines.append(f'dnsprobe_target_info{{{text},ready="{ready_text}"}} 1\n')
        self._target_labels = labels
        return "".join(lines)
