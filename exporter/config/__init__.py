"""Settings: frozen dataclasses, loaded from flags, environment and a YAML file.

Precedence is flags, then `DNSPROBE_*` environment variables, then the `--config` file,
then the defaults. Validation is strict (unknown keys are errors) and collects every
problem before failing, so an operator fixes a bad config in one go; each message names
where the bad value came from.

- `settings`: the dataclasses, enums and defaults; `values`: a parser per key (KEYS);
  `load`: the command line and the precedence.
"""

from .load import build_parser, load
from .settings import (
    DEFAULT_PORT,
    DEFAULT_QUERY_LABEL,
    ENV_PREFIX,
    RESOLVER_QUERY,
    ConfigError,
    DiscoverySettings,
    HttpSettings,
    LogFormat,
    Mode,
    NodeAddressType,
    ProbeEndpoint,
    ProbePodSettings,
    ProbeSettings,
    Remediation,
    RemediationSettings,
    Settings,
    default_query,
)
from .values import KEYS, parse_duration, parse_query

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_QUERY_LABEL",
    "ENV_PREFIX",
    "KEYS",
    "RESOLVER_QUERY",
    "ConfigError",
    "DiscoverySettings",
    "HttpSettings",
    "LogFormat",
    "Mode",
    "NodeAddressType",
    "ProbeEndpoint",
    "ProbePodSettings",
    "ProbeSettings",
    "Remediation",
    "RemediationSettings",
    "Settings",
    "build_parser",
    "default_query",
    "load",
    "parse_duration",
    "parse_query",
]
