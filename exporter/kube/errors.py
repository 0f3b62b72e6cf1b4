"""API errors: the client's exception, named (`ApiProblem`: a short reason for metric
labels and a sentence), and predicates on it, so no other module branches on its fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import kubernetes
import urllib3

ApiException = kubernetes.client.ApiException


# -- errors ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiProblem:
    """Why an API call failed: a short `reason` (a metric label) and a sentence."""

    reason: str  # unreachable, timeout, unauthorized, forbidden, not_found, throttled, error
    message: str


def _status_message(exc: kubernetes.client.ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason or "")
    except (ValueError, AttributeError):
        return str(exc.reason or "")


def classify(exc: BaseException, verb: str, resource: str, namespace: str) -> ApiProblem:
    """Name an API failure so that an operator knows what to fix."""
    where = f"{resource} in namespace {namespace}"
    if isinstance(exc, kubernetes.client.ApiException):
        detail = _status_message(exc)
        if exc.status == 401:
            return ApiProblem(
                "unauthorized",
                f"the API server rejected the credentials (401) to {verb} {where}: "
                "the token is invalid or expired",
            )
        if exc.status == 403:
            return ApiProblem(
                "forbidden",
                f"forbidden (403): these credentials may not {verb} {where}; grant the "
                f"'{verb}' verb on '{resource}' in '{namespace}' (a Role and RoleBinding, "
                f"see deploy/): {detail}",
            )
        if exc.status == 404:
            return ApiProblem("not_found", f"{verb} {where}: not found (404): {detail}")
        if exc.status == 429:
            return ApiProblem("throttled", f"{verb} {where}: the API server is throttling "
                                           f"(429, API Priority and Fairness): {detail}")
        if exc.status == 0 or exc.status is None:
            return ApiProblem("unreachable", f"{verb} {where}: {exc.reason}")
        return ApiProblem("error", f"{verb} {where}: HTTP {exc.status}: {detail}")
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    # NewConnectionError is a ConnectTimeoutError to urllib3, but it means refused.
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return ApiProblem("unreachable", f"{verb} {where}: cannot reach the API server: {exc}")
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return ApiProblem("timeout", f"{verb} {where}: the API server did not answer in time")
    if isinstance(exc, urllib3.exceptions.SSLError) and "CERTIFICATE" in str(exc).upper():
        return ApiProblem("error", f"{verb} {where}: the API server's certificate: {exc}")
    # Other TLS errors (EOF during the handshake) are a connection cut short.
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return ApiProblem("unreachable", f"{verb} {where}: cannot reach the API server: {exc}")
    return ApiProblem("error", f"{verb} {where}: {type(exc).__name__}: {exc}")




# -- predicates: what a failed call means, so that no caller reads the client's fields --


def status(exc: BaseException) -> int | None:
    """The HTTP status the API server answered a failed call with; None when it did not
    answer (unreachable, timeout) or the failure was not an API call's."""
    if isinstance(exc, kubernetes.client.ApiException) and exc.status:
        return int(exc.status)
    return None


def forbidden(exc: BaseException) -> bool:
    """403: these credentials may not (RBAC)."""
    return status(exc) == 403


def conflict(exc: BaseException) -> bool:
    """409: the object changed since it was read (resourceVersion), or a precondition (a
    pod's UID) no longer holds."""
    return status(exc) == 409


def gone(exc: BaseException) -> bool:
    """404 or 409 on an act on a pod: it is gone, or was replaced (its UID differs)."""
    return status(exc) in (404, 409)


def refused_by_budget(exc: BaseException) -> bool:
    """429 on an eviction: a PodDisruptionBudget allows no disruption now."""
    return status(exc) == 429
