"""The Alertmanager webhook payload (version 4), parsed into plain `Alert` and `Payload`
records: unknown fields ignored, anything malformed a PayloadError.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

MAX_BODY = 1024 * 1024


class PayloadError(ValueError):
    """Not an Alertmanager version 4 payload; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Alert:
    status: str
    labels: tuple[tuple[str, str], ...]
    starts_at: datetime | None
    starts_at_text: str
    fingerprint: str
    # What raised it: Alertmanager's webhook, or the exporter's own probes (self.py).
    trigger: str = "webhook"

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
    """What remediation reads of a payload (the rest, annotations included, is ignored)."""

    group_key: str  # for the log, with truncated_alerts
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
    starts = raw.get("startsAt", "")
    if not isinstance(starts, str):
        raise PayloadError(f"{where}.startsAt: expected a time string")
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        # Alertmanager always sends one; other senders get one from the labels.
        fingerprint = hashlib.sha256(json.dumps(labels).encode()).hexdigest()[:16]
    return Alert(status, labels, parse_time(starts), starts, fingerprint)


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
        group_key=str(data.get("groupKey", "")),
        truncated_alerts=truncated if isinstance(truncated, int) else 0,
        alerts=tuple(_alert(a, i) for i, a in enumerate(alerts)),
    )



