"""The API client: built from a kubeconfig or in-cluster credentials, synchronous (run it
with asyncio.to_thread), plain JSON in and out, stable API versions only.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes
import urllib3

from ..model import PodInfo, ServiceInfo
from .config import IN_CLUSTER, KubeConfigError
from .errors import ApiException
from .records import _dict, _list, _str, label_selector, pod_info, service_info

# Connect and read timeouts (seconds) for list and get calls.
REQUEST_TIMEOUT = (5.0, 30.0)



# A watch asks the server to end it after this long, then resumes where it was; the
# client gives up reading after WATCH_SECONDS + WATCH_GRACE, which bounds how long a
# silently dead connection goes unnoticed.
WATCH_SECONDS = 60
WATCH_GRACE = 15


def _selectors(label_selector: str, field_selector: str) -> dict[str, str]:
    return {k: v for k, v in (("labelSelector", label_selector),
                              ("fieldSelector", field_selector)) if v}


def _api_error(status: int, reason: str | None, text: str) -> ApiException:
    return ApiException(status=status, reason=reason, body=text)


# Items per page of a list (client-go's reflector uses 500).
LIST_PAGE = 100


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

