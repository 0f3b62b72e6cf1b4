"""The Alertmanager webhook: authentication, the payload (version 4), and the handler.

Order of checks, each before any work of the next: a token must be configured (else 503,
said once in the log), the bearer token must match (401), the body must fit in 1 MiB
(413), and be an Alertmanager version 4 payload (400). Then every alert gets a decision
(`remediate.py`); the answer is 200 once the decisions are recorded, or 503 when the
Kubernetes API could not be reached, so that Alertmanager retries.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024


class PayloadError(ValueError):
    """Not an Alertmanager version 4 payload; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Alert:
    status: str
    labels: tuple[tuple[str, str], ...]
    annotations: tuple[tuple[str, str], ...]
    starts_at: datetime | None
    starts_at_text: str
    fingerprint: str

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")

    @property
    def name(self) -> str:
        return self.label("alertname")

    @property
    def episode(self) -> str:
        """One firing episode of one alert: Alertmanager repeats it, we act on it once."""
        return f"{self.fingerprint}@{self.starts_at_text}"


@dataclass(frozen=True, slots=True)
class Payload:
    receiver: str
    status: str
    group_key: str
    truncated_alerts: int
    alerts: tuple[Alert, ...]


def parse_time(text: str) -> datetime | None:
    """RFC 3339 as Alertmanager and Kubernetes write it (nanoseconds and 'Z' included)."""
    if not text:
        return None
    value = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in value:  # Python takes at most 6 fraction digits
        head, _, rest = value.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        value = f"{head}.{digits[:6]}{zone}"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _string_map(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise PayloadError(f"{where}: expected an object of strings")
    out = []
    for k, v in value.items():
        if not isinstance(v, str):
            raise PayloadError(f"{where}.{k}: expected a string")
        out.append((str(k), v))
    return tuple(sorted(out))


def _alert(raw: object, index: int) -> Alert:
    where = f"alerts[{index}]"
    if not isinstance(raw, dict):
        raise PayloadError(f"{where}: expected an object")
    status = raw.get("status")
    if status not in ("firing", "resolved"):
        raise PayloadError(f"{where}.status: expected 'firing' or 'resolved', got {status!r}")
    labels = _string_map(raw.get("labels"), f"{where}.labels")
    annotations = _string_map(raw.get("annotations"), f"{where}.annotations")
    starts = raw.get("startsAt", "")
    if not isinstance(starts, str):
        raise PayloadError(f"{where}.startsAt: expected a time string")
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        # Alertmanager always sends one; other senders get one from the labels.
        fingerprint = hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16]
    return Alert(status, labels, annotations, parse_time(starts), starts, fingerprint)


def parse_payload(body: bytes) -> Payload:
    """Parse an Alertmanager webhook body (version 4); unknown fields are ignored."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("expected a JSON object")
    version = data.get("version")
    if version != "4":
        raise PayloadError(f"version: expected \"4\" (Alertmanager's webhook), got {version!r}")
    alerts = data.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("alerts: expected a list")
    truncated = data.get("truncatedAlerts", 0)
    return Payload(
        receiver=str(data.get("receiver", "")),
        status=str(data.get("status", "")),
        group_key=str(data.get("groupKey", "")),
        truncated_alerts=truncated if isinstance(truncated, int) else 0,
        alerts=tuple(_alert(a, i) for i, a in enumerate(alerts)),
    )


class TokenFile:
    """The bearer token, re-read whenever its file changes (a rotated Secret)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._problem: str | None = None
        self._told: str | None = None

    def current(self) -> str | None:
        """The token, or None (then `problem` says why) when there is none to check."""
        if self.path is None:
            self._problem = "no --webhook-token-file configured: the webhook is disabled"
            return None
        try:
            st = os.stat(self.path)  # follows the symlinks of a Secret volume
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                token = self.path.read_text(encoding="utf-8").strip()
                self._stamp, self._token = stamp, token or None
                self._problem = None if token else f"{self.path} is empty"
        except OSError as exc:
            self._stamp, self._token = None, None
            self._problem = f"cannot read {self.path}: {exc.strerror}"
        return self._token

    @property
    def problem(self) -> str | None:
        return self._problem

    def tell_once(self) -> None:
        """Log why the webhook answers 503, once per reason."""
        if self._problem and self._problem != self._told:
            self._told = self._problem
            log.warning("webhook answering 503", extra={"fields": {"reason": self._problem}})


def authorized(header: str, token: str) -> bool:
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())
