"""The value parsers: each returns the value or raises ValueError with a short reason, and
KEYS, the table of every key the flags, the environment and the file share.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from ..model import Endpoint, Protocol, Query, parse_endpoint
from .settings import (
    DEFAULT_QUERY_LABEL,
    LogFormat,
    Mode,
    NodeAddressType,
    ProbeEndpoint,
    Remediation,
)

# --- value parsers: each returns the value or raises ValueError with a short reason ---

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def parse_duration(value: object) -> float:
    """Seconds from a number (`1.5`) or a Go-style duration (`500ms`, `5m`, `1h30m`)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in _DURATION_RE.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(
                    f"expected a duration such as 1.5, 500ms, 30s or 5m, got {value!r}"
                ) from None
    else:
        raise ValueError(f"expected a duration, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a non-negative duration, got {value!r}")
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}")
    return seconds


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {value!r}")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}, got {value!r}")
        return value

    return parse


def _choice(enum_type: type[enum.StrEnum]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        try:
            return enum_type(str(value))
        except ValueError:
            allowed = ", ".join(e.value for e in enum_type)
            raise ValueError(f"expected one of {allowed}, got {value!r}") from None

    return parse


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _dns_label(value: object) -> str:
    text = _string(value)
    if len(text) > 63 or not _DNS_LABEL_RE.match(text):
        raise ValueError(f"{text!r} is not a valid Kubernetes name (RFC 1123 label)")
    return text


def _domain(value: object) -> str:
    text = _string(value).rstrip(".").lower()
    labels = text.split(".")
    if len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{value!r} is not a valid domain name")
    return text


def _node_name(value: object) -> str:
    text = _string(value)
    labels = text.split(".")
    if len(text) > 253 or not all(_DNS_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"{text!r} is not a valid Kubernetes node name (RFC 1123 subdomain)")
    return text


def _ip_endpoint(value: object) -> Endpoint:
    """IP[:PORT] (IPv6 as [IP]:PORT), port 53 by default."""
    return parse_endpoint(_string(value), 53)  # an IP: names are refused there


def _protocols(value: object) -> tuple[Protocol, ...]:
    text = str(value).strip().lower()
    if text == "both":
        return (Protocol.UDP, Protocol.TCP)
    if text in ("udp", "tcp"):
        return (Protocol(text),)
    raise ValueError(f"expected udp, tcp or both, got {value!r}")


def _listen(value: object) -> tuple[str, int]:
    text = _string(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected HOST:PORT or :PORT, got {value!r}")
    host = host.strip("[]")
    return host, _int_in(0, 65535)(port)


def _servers(value: object) -> tuple[Endpoint, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected a list of HOST[:PORT], got {value!r}")
    problems, endpoints = [], []
    for item in items:
        try:
            endpoints.append(parse_endpoint(str(item), 53))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(endpoints)


_RDTYPES = ("A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "CAA", "HTTPS", "SVCB")


def parse_query(text: str, expect: Sequence[str] = ()) -> Query:
    """A `NAME[/TYPE]` query; the metric label is the text as given (type omitted if A)."""
    name, _, rdtype = text.strip().partition("/")
    rdtype = (rdtype or "A").upper()
    if rdtype not in _RDTYPES:
        raise ValueError(f"query {text!r}: type must be one of {', '.join(_RDTYPES)}")
    qname = name.strip().rstrip(".").lower()
    labels = qname.split(".")
    if not qname or len(qname) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        raise ValueError(f"query {text!r}: {name!r} is not a valid domain name")
    label = qname if rdtype == "A" else f"{qname}/{rdtype}"
    return Query(label=label, qname=qname + ".", rdtype=rdtype, expect=tuple(expect))


def _queries(value: object) -> tuple[Query, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of queries (NAME[/TYPE] or {name, type, expect})")
    problems: list[str] = []
    queries: list[Query] = []
    for i, item in enumerate(value):
        try:
            if isinstance(item, str):
                queries.append(parse_query(item))
            elif isinstance(item, dict):
                unknown = set(item) - {"name", "type", "expect"}
                if unknown:
                    raise ValueError(
                        f"item {i}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                        "(allowed: name, type, expect)"
                    )
                name = _string(item.get("name"))
                rdtype = str(item.get("type", "A"))
                expect = item.get("expect", [])
                if isinstance(expect, str):
                    expect = [expect]
                if not isinstance(expect, list) or not all(isinstance(e, str) for e in expect):
                    raise ValueError(f"item {i}: expect must be a list of strings")
                queries.append(parse_query(f"{name}/{rdtype}", expect))
            else:
                raise ValueError(f"item {i}: expected NAME[/TYPE] or a mapping, got {item!r}")
        except ValueError as exc:
            problems.append(str(exc))
    labels = [q.label for q in queries]
    if DEFAULT_QUERY_LABEL in labels:
        problems.append(f"the query label {DEFAULT_QUERY_LABEL!r} is taken by the default query")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        problems.append(f"duplicate queries: {', '.join(duplicates)}")
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(queries)


def _path(value: object) -> str:
    return _string(value)


_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*$", re.IGNORECASE)


def _image(value: object) -> str:
    text = _string(value)
    if not _IMAGE_RE.match(text) or len(text) > 512:
        raise ValueError(f"expected a container image reference, got {value!r}")
    return text


# Every key the config file, the environment and the flags share: name -> parser.
KEYS: dict[str, Callable[[object], Any]] = {
    "server": _servers,
    "kubeconfig": _path,
    "namespace": _dns_label,
    "service": _dns_label,
    "dns-port": _int_in(1, 65535),
    "node-name": _node_name,
    "node-local-dns": _ip_endpoint,
    "cluster-domain": _domain,
    "resolv-conf": _path,
    "query": _queries,
    "protocol": _protocols,
    "timeout": _positive_duration,
    "interval": _positive_duration,
    "concurrency": _int_in(1, 10000),
    "listen": _listen,
    "probe-endpoint": _choice(ProbeEndpoint),
    "web-config-file": _path,
    "remediation": _choice(Remediation),
    "webhook-token-file": _path,
    "min-ready": _int_in(0, 1000),
    "cooldown": parse_duration,
    "allow-delete": _bool,
    "self-remediate": _bool,
    "log-format": _choice(LogFormat),
    "mode": _choice(Mode),
    "node-address-type": _choice(NodeAddressType),
    "probe-pod-namespace": _dns_label,
    "probe-pod-image": _image,
}
# Keys that only make sense from the command line or a file, not the environment.
_NO_ENV = {"query"}



