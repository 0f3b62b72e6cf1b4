"""The shared vocabulary: what a probe asks (`Query`), over what (`Protocol`), and what
became of it (`Outcome`, `ProbeResult`). Plain data that imports nothing of the project:
the parts that speak of probes import these from here, not from the DNS engine
(probe.py), so a module that only names a result does not depend on the sockets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    """What became of a probe; the values are the `result` label of `dnsprobe_probes_total`."""

    SUCCESS = "success"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    RCODE = "rcode"
    WRONG_ANSWER = "wrong_answer"
    TRUNCATED = "truncated"
    ERROR = "error"


class Protocol(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Query:
    """One question to ask, and what its answer must contain.

    `label` is the value of the `query` metric label: `kubernetes` for the default query,
    otherwise the name as the user wrote it (with `/TYPE` when the type is not A).
    """

    label: str
    qname: str
    rdtype: str = "A"
    expect: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: Outcome
    reason: str
    # Seconds from sending the query (for TCP: from starting to connect) to the arrival
    # of a matching response; None when no response arrived.
    rtt_seconds: float | None = None
    rcode: str | None = None
    answers: tuple[str, ...] = ()
    # Wall-clock time the probe started, seconds since the epoch.
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS
