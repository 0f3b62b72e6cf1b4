"""`--web-config-file` (also `--web.config.file`): the web configuration file of
Prometheus' exporter-toolkit, as its exporters read it: TLS (`tls_server_config`), the
response headers (`http_server_config.headers`), basic auth (`basic_auth_users`, bcrypt).

Read strictly: an unknown key, or a value of the wrong kind, is an error naming the key,
as every other setting. Relative paths are the config file's directory's, as the
toolkit's. Where Python's ssl cannot do what a key asks, the key is refused with the
reason rather than silently ignored:

- `client_auth_type` RequestClientCert and RequireAnyClientCert (RequireClientCert) ask
  for a certificate without verifying it; Python's ssl verifies every certificate it asks
  for. VerifyClientCertIfGiven and RequireAndVerifyClientCert are what client
  authentication means, and work.
- `cipher_suites` set the TLS 1.2 suites (IANA names, mapped to OpenSSL's); TLS 1.3 suites
  are OpenSSL's defaults, their names accepted and nothing changed, as in Go.
- `curve_preferences`: Python sets one curve for ECDHE; the first is used.
- `http_server_config.http2`: aiohttp serves HTTP/1.1; true or false, nothing changes.
- `rate_limit` is not implemented: an error, not a silent no-op.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# IANA names of Go's secure suites (tls.CipherSuites()) -> OpenSSL's names.
TLS12_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
}
TLS13_CIPHERS = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                 "TLS_CHACHA20_POLY1305_SHA256"}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1",
          "X25519": "X25519"}
# The response headers the toolkit lets one set, and the values allowed (None: any).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None, "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"), "X-XSS-Protection": None,
    "Content-Security-Policy": None}


class ClientAuth(enum.StrEnum):
    NONE = "NoClientCert"
    IF_GIVEN = "VerifyClientCertIfGiven"
    REQUIRED = "RequireAndVerifyClientCert"


UNVERIFIED = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")


class WebConfigError(Exception):
    """The file cannot be used; `problems` names each key that is wrong."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__(f"web config {path}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TLSServer:
    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str = ""  # inline PEM, used when cert_file is not given
    key: str = ""
    client_auth: ClientAuth = ClientAuth.NONE
    client_ca_file: Path | None = None
    client_ca: str = ""
    client_allowed_sans: tuple[str, ...] = ()
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: tuple[str, ...] = ()  # OpenSSL names of the TLS 1.2 suites; () = defaults
    curve: str = ""  # OpenSSL name; "" = defaults

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class WebConfig:
    path: Path
    tls: TLSServer | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)


_TLS_KEYS = {"cert_file", "key_file", "cert", "key", "client_auth_type", "client_ca_file",
             "client_ca", "client_allowed_sans", "min_version", "max_version",
             "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}


def load(path: Path) -> WebConfig:
    """Read and check the file; WebConfigError lists every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WebConfigError(path, [f"cannot be read: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WebConfigError(path, [f"not valid YAML: {exc}"]) from exc
    return parse(path, data if data is not None else {})


def parse(path: Path, data: Any) -> WebConfig:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise WebConfigError(path, ["expected a mapping of tls_server_config, "
                                    "http_server_config and basic_auth_users"])
    for key in sorted(set(data) - {"tls_server_config", "http_server_config",
                                   "basic_auth_users", "rate_limit"}):
        problems.append(f"unknown key {key!r}")
    if "rate_limit" in data:
        problems.append("rate_limit: not supported by this exporter (put a rate limit in "
                        "front of it, or leave the key out)")
    tls = _tls(path.parent, _mapping(data, "tls_server_config", problems), problems)
    headers = _headers(_mapping(data, "http_server_config", problems), problems)
    users = _users(data.get("basic_auth_users"), problems)
    if problems:
        raise WebConfigError(path, problems)
    return WebConfig(path, tls, users, headers)


def _mapping(data: Mapping[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key}: expected a mapping")
        return {}
    return value


def _text(section: str, data: Mapping[str, Any], key: str, problems: list[str]) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(f"{section}.{key}: expected a string")
        return ""
    return value


def _texts(section: str, data: Mapping[str, Any], key: str, problems: list[str]
           ) -> list[str]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{section}.{key}: expected a list of strings")
        return []
    return value


def _tls(base: Path, data: Mapping[str, Any], problems: list[str]) -> TLSServer | None:
    s = "tls_server_config"
    for key in sorted(set(data) - _TLS_KEYS):
        problems.append(f"{s}: unknown key {key!r}")

    def path(key: str) -> Path | None:
        text = _text(s, data, key, problems)
        return (base / text) if text else None

    cert_file, key_file, ca_file = path("cert_file"), path("key_file"), path("client_ca_file")
    cert, key, ca = (_text(s, data, k, problems) for k in ("cert", "key", "client_ca"))
    auth_text = _text(s, data, "client_auth_type", problems)
    enabled = any((cert_file, key_file, ca_file, cert, key, ca, auth_text))
    if not enabled:
        return None
    if not (cert_file or cert):
        problems.append(f"{s}: missing one of cert or cert_file")
    if not (key_file or key):
        problems.append(f"{s}: missing one of key or key_file")
    auth = ClientAuth.NONE
    if auth_text in UNVERIFIED:
        problems.append(
            f"{s}.client_auth_type: {auth_text} asks for a client certificate without "
            "verifying it, which Python's ssl does not do; use VerifyClientCertIfGiven or "
            "RequireAndVerifyClientCert (with client_ca_file)")
    elif auth_text:
        try:
            auth = ClientAuth(auth_text)
        except ValueError:
            problems.append(f"{s}.client_auth_type: expected one of "
                            f"{', '.join(c.value for c in ClientAuth)}, got {auth_text!r}")
    if (ca_file or ca) and auth is ClientAuth.NONE and auth_text not in UNVERIFIED:
        problems.append(f"{s}: client CA's have been configured without a Client Auth Policy "
                        "(client_auth_type)")
    if auth is not ClientAuth.NONE and not (ca_file or ca):
        problems.append(f"{s}.client_auth_type: {auth.value} needs client_ca_file (or "
                        "client_ca) to verify the certificates against")

    def version(key: str, default: ssl.TLSVersion) -> ssl.TLSVersion:
        text = _text(s, data, key, problems)
        if not text:
            return default
        if text not in TLS_VERSIONS:
            problems.append(f"{s}.{key}: expected one of {', '.join(TLS_VERSIONS)}, "
                            f"got {text!r}")
            return default
        return TLS_VERSIONS[text]

    low = version("min_version", ssl.TLSVersion.TLSv1_2)
    high = version("max_version", ssl.TLSVersion.TLSv1_3)
    if low > high:
        problems.append(f"{s}: min_version is above max_version")
    ciphers: list[str] = []
    for name in _texts(s, data, "cipher_suites", problems):
        if name in TLS12_CIPHERS:
            ciphers.append(TLS12_CIPHERS[name])
        elif name not in TLS13_CIPHERS:
            problems.append(f"{s}.cipher_suites: unknown cipher {name!r}")
    curves = _texts(s, data, "curve_preferences", problems)
    for name in curves:
        if name not in CURVES:
            problems.append(f"{s}.curve_preferences: unknown curve {name!r} (expected "
                            f"{', '.join(CURVES)})")
    prefer = data.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.append(f"{s}.prefer_server_cipher_suites: expected true or false")
    sans = tuple(_texts(s, data, "client_allowed_sans", problems))
    if sans and auth is ClientAuth.NONE:
        problems.append(f"{s}.client_allowed_sans: needs client certificates "
                        "(client_auth_type)")
    return TLSServer(
        cert_file=cert_file, key_file=key_file, cert=cert, key=key, client_auth=auth,
        client_ca_file=ca_file, client_ca=ca, client_allowed_sans=sans,
        min_version=low, max_version=high, ciphers=tuple(ciphers),
        curve=CURVES.get(curves[0], "") if curves else "")


def _headers(data: Mapping[str, Any], problems: list[str]) -> dict[str, str]:
    s = "http_server_config"
    for key in sorted(set(data) - {"http2", "headers"}):
        problems.append(f"{s}: unknown key {key!r}")
    if "http2" in data and not isinstance(data["http2"], bool):
        problems.append(f"{s}.http2: expected true or false")
    raw = data.get("headers") or {}
    if not isinstance(raw, dict):
        problems.append(f"{s}.headers: expected a mapping of header to value")
        return {}
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if name not in HEADERS:
            problems.append(f"{s}.headers: HTTP header {name!r} can not be configured "
                            f"(only {', '.join(HEADERS)})")
            continue
        allowed = HEADERS[name]
        if not isinstance(value, str) or (allowed is not None and value not in allowed):
            want = f"one of {', '.join(allowed)}" if allowed else "a string"
            problems.append(f"{s}.headers: invalid value for {name}: expected {want}, "
                            f"got {value!r}")
            continue
        headers[name] = value
    return headers


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("basic_auth_users: expected a mapping of user name to bcrypt hash")
        return {}
    users: dict[str, bytes] = {}
    for name, hashed in raw.items():
        if not isinstance(name, str) or not isinstance(hashed, str):
            problems.append(f"basic_auth_users.{name}: expected a bcrypt hash (a string)")
            continue
        if not _bcrypt_hash(hashed):
            problems.append(f"basic_auth_users.{name}: not a bcrypt hash ($2a$, $2b$ or "
                            "$2y$, e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
            continue
        users[name] = hashed.encode()
    return users


def _bcrypt_hash(text: str) -> bool:
    parts = text.split("$")
    return (len(parts) == 4 and parts[0] == "" and parts[1] in ("2a", "2b", "2y")
            and parts[2].isdigit() and 4 <= int(parts[2]) <= 31 and len(parts[3]) == 53)
