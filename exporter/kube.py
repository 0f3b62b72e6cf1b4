"""The gateway to the Kubernetes API: the only module that may import `kubernetes`.

The official client is synchronous; nothing here runs on the event loop. A `Watcher`
keeps one list of objects current in a thread of its own (list, then watch from the
list's resourceVersion; resume after a watch ends; relist on 410 Gone; back off on
errors) and hands what it sees to a callback as `Listed`, `Changed`, `Failed` and
`Recovered` events. Objects are read as plain JSON and turned into the small frozen
records of `targets.py` right here, so no other module sees the client's models.

Only stable API versions are used (core/v1, policy/v1, coordination.k8s.io/v1, apps/v1,
authorization.k8s.io/v1), all served since Kubernetes 1.22; the supported range is 1.31-1.37.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from .model import Protocol
from .targets import NodeInfo, PodInfo, ServiceInfo

log = logging.getLogger(__name__)

# Where a pod finds its service-account credentials.
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

# Connect and read timeouts (seconds) for list and get calls.
REQUEST_TIMEOUT = (5.0, 30.0)
# A watch asks the server to end it after this long, then resumes where it was; the
# client gives up reading after WATCH_SECONDS + WATCH_GRACE, which bounds how long a
# silently dead connection goes unnoticed.
WATCH_SECONDS = 60
WATCH_GRACE = 15
# Back-off after an error: doubling from BACKOFF_MIN to BACKOFF_MAX, with full jitter.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0


ApiException = kubernetes.client.ApiException


class KubeConfigError(Exception):
    """A Kubernetes configuration was named but cannot be used."""


def find_config(kubeconfig: str | None) -> str | None:
    """Describe the Kubernetes config that would be used, or None when there is none.

    Order: `--kubeconfig`, then in-cluster credentials, then `$KUBECONFIG`, then
    `~/.kube/config`, as DESIGN.md says.
    """
    if kubeconfig:
        if not Path(kubeconfig).is_file():
            raise KubeConfigError(f"--kubeconfig {kubeconfig}: no such file")
        return kubeconfig
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.is_file():
        return IN_CLUSTER
    for candidate in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if candidate and Path(candidate).is_file():
            return candidate
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


IN_CLUSTER = "in-cluster service account"


# -- API objects -> records -------------------------------------------------------------


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def service_info(obj: Mapping[str, Any]) -> ServiceInfo:
    """A Service (JSON) as a record: its ClusterIPs, DNS port and selector.

    ClusterIPs come from `spec.clusterIPs` (dual-stack), else `spec.clusterIP`; a headless
    Service ("None") has none. The DNS port is the UDP port named `dns`, else any UDP
    port, else the TCP port named `dns-tcp`, else port 53 if listed.
    """
    meta, spec = _dict(obj.get("metadata")), _dict(obj.get("spec"))
    ips = [_str(ip) for ip in _list(spec.get("clusterIPs"))] or [_str(spec.get("clusterIP"))]
    ips = [ip for ip in ips if ip and ip != "None"]
    ports = [_dict(p) for p in _list(spec.get("ports"))]

    def pick(proto: str, name: str | None) -> int | None:
        for p in ports:
            if (p.get("protocol") or "TCP") == proto and (name is None or p.get("name") == name):
                port = p.get("port")
                if isinstance(port, int):
                    return port
        return None

    port = pick("UDP", "dns") or pick("UDP", None) or pick("TCP", "dns-tcp")
    if port is None and any(p.get("port") == 53 for p in ports):
        port = 53
    selector = {str(k): _str(v) for k, v in _dict(spec.get("selector")).items()}
    ingress = [_str(_dict(i).get("ip"))
               for i in _list(_dict(_dict(obj.get("status")).get("loadBalancer")).get("ingress"))]
    return ServiceInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        cluster_ips=tuple(ips),
        port=port,
        selector=tuple(sorted(selector.items())),
        type=_str(spec.get("type")) or "ClusterIP",
        dns_ports=dns_ports(ports),
        ingress=tuple(ip for ip in ingress if ip),
    )


def dns_ports(ports: Sequence[Mapping[str, Any]]) -> tuple[tuple[Protocol, int, int], ...]:
    """A Service's DNS ports as (protocol, port, nodePort or 0): UDP and TCP ports that are
    named `dns`/`dns-tcp`, or whose port or targetPort is 53 or is named so."""
    found: list[tuple[Protocol, int, int]] = []
    for p in ports:
        protocol, port, target = (p.get("protocol") or "TCP"), p.get("port"), p.get("targetPort")
        if protocol not in ("UDP", "TCP") or not isinstance(port, int):
            continue
        named = {p.get("name"), target} & {"dns", "dns-tcp"}
        if named or 53 in (port, target):
            node_port = p.get("nodePort")
            found.append((Protocol(protocol.lower()), port,
                          node_port if isinstance(node_port, int) else 0))
    return tuple(found)


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    """A Node (JSON) as a record: its name and status.addresses."""
    addresses = [_dict(a) for a in _list(_dict(obj.get("status")).get("addresses"))]
    return NodeInfo(
        name=_str(_dict(obj.get("metadata")).get("name")),
        addresses=tuple((_str(a.get("type")), _str(a.get("address"))) for a in addresses),
    )


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """A Pod (JSON) as a record: its IPs (dual-stack), node, Ready condition, phase."""
    meta, spec, status = (_dict(obj.get(k)) for k in ("metadata", "spec", "status"))
    ips = [_str(_dict(p).get("ip")) for p in _list(status.get("podIPs"))]
    ips = [ip for ip in ips if ip] or ([_str(status["podIP"])] if status.get("podIP") else [])
    ready = any(
        _dict(c).get("type") == "Ready" and _dict(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )
    return PodInfo(
        namespace=_str(meta.get("namespace")),
        name=_str(meta.get("name")),
        uid=_str(meta.get("uid")),
        ips=tuple(ips),
        node=_str(spec.get("nodeName")),
        ready=ready,
        phase=_str(status.get("phase")),
        labels=tuple(sorted((str(k), _str(v)) for k, v in _dict(meta.get("labels")).items())),
        deleting=bool(meta.get("deletionTimestamp")),
        created=_str(meta.get("creationTimestamp")),
        state=_container_state(_list(status.get("containerStatuses"))),
    )


def _container_state(statuses: list[Any]) -> str:
    state = _dict(_dict(statuses[0]).get("state")) if statuses else {}
    for kind, value in state.items():
        detail = _dict(value)
        if kind == "terminated":
            return (f"terminated: exit code {detail.get('exitCode')} "
                    f"({_str(detail.get('reason'))}) {_str(detail.get('message'))}").strip()
        parts = [kind, _str(detail.get("reason")), _str(detail.get("message"))]
        return ": ".join(p for p in parts if p)
    return ""


def label_selector(selector: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in selector)


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


# -- the client ------------------------------------------------------------------------


class Client:
    """An API client built from a kubeconfig or in-cluster credentials."""

    def __init__(self, api: kubernetes.client.ApiClient, source: str) -> None:
        self.api = api
        self.source = source
        self._stream_ssl: ssl.SSLContext | None = None

    @classmethod
    def connect(cls, source: str) -> Client:
        """Load credentials (no network traffic); KubeConfigError when they are unusable."""
        config = kubernetes.client.Configuration()
        try:
            if source == IN_CLUSTER:
                kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=config
                )
            else:
                kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=source, client_configuration=config
                )
        except Exception as exc:  # the loader raises many kinds; all mean "unusable"
            raise KubeConfigError(f"cannot use the Kubernetes config {source}: {exc}") from exc
        return cls(kubernetes.client.ApiClient(config), source)

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def list_objects(
        self, resource: str, namespace: str, *, label_selector: str = "",
        field_selector: str = "", convert: Callable[[Mapping[str, Any]], Any] = lambda i: i,
    ) -> tuple[list[Any], str]:
        """(items, resourceVersion of the list) of a core/v1 resource; each item is the
        object's JSON, or what `convert` makes of it.

        Read in pages of LIST_PAGE items, as client-go's reflector does: all pages come
        from one consistent snapshot, and no response is big enough for parsing it to
        leave the process megabytes larger for good (a 1,000-pod list is about 3 MB of
        JSON, and several times that as Python objects).
        """
        query = _selectors(label_selector, field_selector) | {"limit": str(LIST_PAGE)}
        items: list[Any] = []
        while True:
            body = self.request("GET", _collection(resource, namespace), query=query)
            items += [convert(_with_namespace(_dict(i), namespace))
                      for i in _list(body.pop("items", None))]
            metadata = _dict(body.get("metadata"))
            token = _str(metadata.get("continue"))
            if not token:
                return items, _str(metadata.get("resourceVersion"))
            query["continue"] = token

    def watch(
        self, resource: str, namespace: str, resource_version: str, *,
        label_selector: str = "", field_selector: str = "", seconds: int = WATCH_SECONDS,
    ) -> urllib3.HTTPResponse:
        """Open a watch (the response streams one JSON event per line).

        Raw, like every other call here: the generated CoreV1Api class alone would add
        about 20 MB to the process."""
        query = _selectors(label_selector, field_selector) | {
            "watch": "true", "resourceVersion": resource_version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(seconds),
        }
        response: urllib3.HTTPResponse = self._call(
            "GET", _collection(resource, namespace), query, None,
            (REQUEST_TIMEOUT[0], seconds + WATCH_GRACE),
        ).response
        if not 200 <= response.status <= 299:
            text = response.data.decode("utf-8", errors="replace")
            response.release_conn()
            raise _api_error(response.status, response.reason, text)
        return response

    # -- plain requests (remediation) -------------------------------------------------

    def request(
        self, method: str, path: str, *, query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One API request with JSON in and out; ApiException for any non-2xx answer."""
        text = self._send(method, path, query or {}, body)
        data = json.loads(text) if text else {}
        return data if isinstance(data, dict) else {}

    def read_text(self, path: str, query: Mapping[str, str] | None = None) -> str:
        """GET a plain-text resource (a pod's log); ApiException for any non-2xx answer."""
        return self._send("GET", path, query or {}, None, accept="*/*")

    def _send(self, method: str, path: str, query: Mapping[str, str],
              body: Mapping[str, Any] | None, accept: str = "application/json") -> str:
        response = self._call(method, path, query, body, REQUEST_TIMEOUT, accept)
        response.read()
        text = (response.data or b"").decode("utf-8", errors="replace")
        if not 200 <= response.status <= 299:
            raise _api_error(response.status, response.reason, text)
        return str(text)

    def _call(
        self, method: str, path: str, query: Mapping[str, str],
        body: Mapping[str, Any] | None, timeout: tuple[float, float],
        accept: str = "application/json",
    ) -> Any:
        """Send one request; the client's response wrapper, its body not yet read."""
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = "application/json"
        params = self.api.param_serialize(
            method=method, resource_path=path, query_params=list(query.items()),
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        return self.api.call_api(*params, _request_timeout=timeout)

    def allowed(self, verb: str, resource: str, namespace: str = "", *, group: str = "",
                subresource: str = "") -> tuple[bool, str]:
        """Whether these credentials may do it, by SelfSubjectAccessReview (which every
        authenticated user may create), and the authorizer's reason if it gave one."""
        attributes = {"verb": verb, "resource": resource, "group": group}
        if namespace:
            attributes["namespace"] = namespace
        if subresource:
            attributes["subresource"] = subresource
        answer = self.request(
            "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body={"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}},
        )
        status = _dict(answer.get("status"))
        return bool(status.get("allowed")), _str(status.get("reason"))

    def create_pod(self, namespace: str, body: Mapping[str, Any]) -> PodInfo:
        return pod_info(self.request("POST", f"/api/v1/namespaces/{namespace}/pods",
                                     body=body))

    def wait_pod(
        self, namespace: str, name: str, done: Callable[[PodInfo], bool], seconds: float,
        stop: threading.Event,
    ) -> PodInfo | None:
        """Follow one pod until `done(pod)`, its deletion (None), `seconds` or `stop`; the
        pod as last seen. Watches run a few seconds each, so `stop` is noticed soon."""
        deadline = time.monotonic() + seconds
        selector = f"metadata.name={name}"
        version, pod = "", None
        while not stop.is_set() and time.monotonic() < deadline:
            if not version:
                items, version = self.list_objects("pods", namespace, field_selector=selector,
                                                   convert=pod_info)
                pod = items[0] if items else None
                if pod is None or done(pod):
                    return pod
            left = max(1, min(5, int(deadline - time.monotonic())))
            response = self.watch("pods", namespace, version, field_selector=selector,
                                  seconds=left)
            try:
                for line in _lines(response):
                    event = json.loads(line)
                    kind, obj = _str(event.get("type")), _dict(event.get("object"))
                    if kind == "ERROR":
                        version = ""  # expired (410) or refused: list again
                        break
                    version = _str(_dict(obj.get("metadata")).get("resourceVersion")) or version
                    if kind == "DELETED":
                        return None
                    if kind in ("ADDED", "MODIFIED"):
                        pod = pod_info(obj)
                        if done(pod):
                            return pod
            finally:
                response.release_conn()
        return pod

    def pod_log(self, namespace: str, name: str, container: str) -> str:
        return self.read_text(f"/api/v1/namespaces/{namespace}/pods/{name}/log",
                              {"container": container})

    def stream_endpoint(self, path: str) -> tuple[str, ssl.SSLContext | None, dict[str, str]]:
        """What a WebSocket client needs to open `path` (a pod's portforward): the wss://
        URL, the TLS context of these credentials, and the Authorization header."""
        config = self.api.configuration
        url = str(config.host).rstrip("/").replace("https://", "wss://", 1).replace(
            "http://", "ws://", 1) + path
        if url.startswith("wss://") and self._stream_ssl is None:
            context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
            if not config.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
            self._stream_ssl = context  # made once: loading the CA costs milliseconds
        headers: dict[str, str] = {}
        auth = _dict(config.auth_settings().get("BearerToken"))  # refreshes an exec token
        if auth.get("value"):
            headers[_str(auth.get("key")) or "authorization"] = _str(auth["value"])
        return url, self._stream_ssl, headers

    def get(self, path: str) -> dict[str, Any] | None:
        """GET one object; None when it does not exist (404), ApiException otherwise."""
        try:
            return self.request("GET", path)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_pod(self, namespace: str, name: str) -> PodInfo | None:
        """The pod now, or None when it does not exist."""
        obj = self.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        return None if obj is None else pod_info(obj)

    def get_service(self, namespace: str, name: str) -> ServiceInfo | None:
        obj = self.get(f"/api/v1/namespaces/{namespace}/services/{name}")
        return None if obj is None else service_info(obj)

    def list_pods(self, namespace: str, selector: tuple[tuple[str, str], ...]) -> list[PodInfo]:
        items, _ = self.list_objects("pods", namespace, label_selector=label_selector(selector))
        return [pod_info(i) for i in items]

    def list_deployments(self, namespace: str) -> list[Mapping[str, Any]]:
        body = self.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments")
        return [_dict(i) for i in _list(body.get("items"))]

    def evict(self, namespace: str, name: str, uid: str, *, dry_run: bool) -> None:
        """POST an Eviction for the pod with this UID (a precondition: a replacement pod of
        the same name is never hit). policy/v1: served since Kubernetes 1.22."""
        options: dict[str, Any] = {"preconditions": {"uid": uid}}
        if dry_run:
            options["dryRun"] = ["All"]
        body = {
            "apiVersion": "policy/v1", "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
            "deleteOptions": options,
        }
        self.request("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/eviction", body=body)

    def delete_pod(self, namespace: str, name: str, uid: str, *, dry_run: bool) -> None:
        body: dict[str, Any] = {"preconditions": {"uid": uid}}
        query = {"dryRun": "All"} if dry_run else None
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body,
                     query=query)

    def create_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=body)

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}")

    def write_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create the Lease (no resourceVersion) or replace it (with one: 409 if stale)."""
        base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        meta = _dict(body.get("metadata"))
        if meta.get("resourceVersion"):
            return self.request("PUT", f"{base}/{meta['name']}", body=body)
        return self.request("POST", base, body=body)


def _collection(resource: str, namespace: str) -> str:
    """The core/v1 path of a resource: namespaced, or cluster-wide when namespace is ""."""
    return f"/api/v1/namespaces/{namespace}/{resource}" if namespace else f"/api/v1/{resource}"


def _with_namespace(obj: Mapping[str, Any], namespace: str) -> Mapping[str, Any]:
    # List items carry their namespace, but be sure: records need it.
    meta = _dict(obj.get("metadata"))
    if meta.get("namespace"):
        return obj
    return {**obj, "metadata": {**meta, "namespace": namespace}}


def _lines(response: urllib3.HTTPResponse) -> Iterator[bytes]:
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())
    if buffer.strip():
        yield buffer


# -- watching --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    """The complete current set (after a list or relist)."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Changed:
    type: str  # ADDED, MODIFIED, DELETED
    item: Any


@dataclass(frozen=True, slots=True)
class Failed:
    problem: ApiProblem


@dataclass(frozen=True, slots=True)
class Recovered:
    pass


WatchEvent = Listed | Changed | Failed | Recovered


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): relist."""


def _selectors(label_selector: str, field_selector: str) -> dict[str, str]:
    return {k: v for k, v in (("labelSelector", label_selector),
                              ("fieldSelector", field_selector)) if v}


def _api_error(status: int, reason: str | None, text: str) -> ApiException:
    return ApiException(status=status, reason=reason, body=text)


# Items per page of a list (client-go's reflector uses 500).
LIST_PAGE = 100


class Watcher:
    """Keeps one filtered list of `resource` in `namespace` current, in a daemon thread.

    Daemon, because a blocked read cannot be interrupted portably: `stop()` shuts the
    open watch's socket down, and anything still blocked dies with the process instead of
    holding up its exit.
    """

    def __init__(
        self,
        client: Client,
        resource: str,
        namespace: str,
        convert: Callable[[Mapping[str, Any]], Any],
        emit: Callable[[WatchEvent], None],
        *,
        label_selector: str = "",
        field_selector: str = "",
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self._client = client
        self._watch_seconds = watch_seconds
        self.resource = resource
        self.namespace = namespace
        self._convert = convert
        self._emit = emit
        self._selectors = {"label_selector": label_selector, "field_selector": field_selector}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response: urllib3.HTTPResponse | None = None
        self._failing = False
        self._start_version = ""
        self.watches = 0  # watch requests opened (a resumed watch is a new one)
        self.relists = 0  # lists after a 410
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{resource}-{namespace}", daemon=True
        )

    def start(self, resource_version: str = "") -> None:
        """Start watching; from `resource_version` if given (else list first)."""
        self._start_version = resource_version
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._response is not None:
                with contextlib.suppress(Exception):
                    self._response.shutdown()

    def _ok(self) -> None:
        if self._failing:
            self._failing = False
            self._emit(Recovered())

    def _fail(self, exc: BaseException, verb: str) -> None:
        self._failing = True
        self._emit(Failed(classify(exc, verb, self.resource, self.namespace)))

    def _run(self) -> None:
        delay = BACKOFF_MIN
        version = self._start_version
        while not self._stop.is_set():
            verb = "watch" if version else "list"
            try:
                if not version:
                    items, version = self._client.list_objects(
                        self.resource, self.namespace, convert=self._convert,
                        **self._selectors,
                    )
                    self._ok()
                    self._emit(Listed(tuple(items)))
                version = self._watch(version)
                delay = BACKOFF_MIN
            except _Gone:
                log.info("watch of %s in %s expired (410 Gone): listing again",
                         self.resource, self.namespace)
                self.relists += 1
                version = ""
            except Exception as exc:
                if self._stop.is_set():
                    return
                self._fail(exc, verb)
                self._stop.wait(random.uniform(0, delay))
                delay = min(delay * 2, BACKOFF_MAX)

    def _watch(self, version: str) -> str:
        """Follow changes from `version` until the server ends the watch; the last version."""
        response = self._client.watch(
            self.resource, self.namespace, version, seconds=self._watch_seconds,
            **self._selectors,
        )
        with self._lock:
            if self._stop.is_set():
                response.release_conn()
                return version
            self._response = response
        self.watches += 1
        self._ok()
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = _str(event.get("type")), _dict(event.get("object"))
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise kubernetes.client.ApiException(
                        status=obj.get("code") or 500, reason=_str(obj.get("message"))
                    )
                version = _str(_dict(obj.get("metadata")).get("resourceVersion")) or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._emit(Changed(kind, self._convert(obj)))
            return version
        finally:
            with self._lock:
                self._response = None
            response.release_conn()
