"""The gateway to the Kubernetes API: the only package that imports `kubernetes`.

The official client is synchronous; nothing here runs on the event loop (callers use
asyncio.to_thread). Objects are read as plain JSON and turned into the project's frozen
records (`records.py`), so no other module sees the client's models. Only stable API
versions are used (core/v1, policy/v1, coordination.k8s.io/v1, apps/v1,
authorization.k8s.io/v1, discovery.k8s.io/v1); the supported range is 1.31-1.37.

- `config`: which credentials are used; `client`: the API client; `records`: JSON to
  records; `errors`: the client's exceptions named, with predicates; `watch`: a list kept
  current in a thread of its own.
"""

from .client import Client
from .config import IN_CLUSTER, SERVICE_ACCOUNT_TOKEN, KubeConfigError, find_config
from .errors import (
    ApiException,
    ApiProblem,
    classify,
    conflict,
    forbidden,
    gone,
    refused_by_budget,
    status,
)
from .records import dns_ports, label_selector, node_info, pod_info, service_info
from .watch import Backoff, Changed, Failed, Listed, Recovered, Watcher, WatchEvent

__all__ = [
    "IN_CLUSTER",
    "SERVICE_ACCOUNT_TOKEN",
    "ApiException",
    "ApiProblem",
    "Backoff",
    "Changed",
    "Client",
    "Failed",
    "KubeConfigError",
    "Listed",
    "Recovered",
    "WatchEvent",
    "Watcher",
    "classify",
    "conflict",
    "dns_ports",
    "find_config",
    "forbidden",
    "gone",
    "label_selector",
    "node_info",
    "pod_info",
    "refused_by_budget",
    "service_info",
    "status",
]
