"""A stand-in for the kubelet (and the scheduler) of the test cluster's nodes.

The test cluster has no kubelet, so three things the exporter's outside-the-cluster modes
use cannot happen there: a pod that is created never runs, and the API server's
`pods/log` and `pods/portforward` subresources, which it proxies to the kubelet of the
pod's node, have nobody to proxy to. This process is that kubelet, kept small, built to
what the real one does in Kubernetes 1.20 (pkg/kubelet/server, cri/streaming/portforward):

- The API server finds it through the Node objects: an address of the preferred type
  (`Hostname` comes first) and `status.daemonEndpoints.kubeletEndpoint.Port`. The lab
  writes both; the API server's own authorization (RBAC on pods/log, pods/portforward)
  happens before anything reaches this process, as in a real cluster.
- `GET /containerLogs/{namespace}/{pod}/{container}`: the container's output, stdout and
  stderr interleaved as the container runtime records them.
- `GET /portForward/{namespace}/{pod}?port=N` upgraded to a WebSocket (subprotocol
  `v4.channel.k8s.io`, or none): per port, data channel 2i and error channel 2i+1, each
  starting with the port as 2 bytes little endian; bytes on the data channel go to the
  port inside the pod; a failure to connect is written to the error channel. SPDY, which
  kubectl prefers, is not spoken.
- Pods: a pod without a node is bound to NODE (the scheduler's part); a bound Pending pod
  whose image it can run is run: the image of this project, whose entrypoint is the
  console script, runs as `python -m exporter` with the pod's args, in the node's network
  namespace (this process runs there), as this process's user: the test interpreter
  lives where the pod's runAsUser could not read it. Its status goes
  Running, then Succeeded or Failed with the exit code; activeDeadlineSeconds is kept.
  Pods of any other image (the lab's CoreDNS pods, whose status the lab writes) are left
  alone.

Usage: python -m tests.harness.kubelet KUBECONFIG CERT KEY NODE
Prints `listening HOST:PORT` once it serves; runs until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from exporter import kube

RUNNABLE_IMAGE = "coredns-health-exporter"
# The image tests give probe pods (--probe-pod-image): one the stand-in kubelet runs.
TEST_IMAGE = f"{RUNNABLE_IMAGE}:test"
SUBPROTOCOLS = ("v4.channel.k8s.io",)
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    def __init__(self, client: kube.Client, node: str, address: str) -> None:
        self.client = client
        self.node = node
        self.address = address  # the pods' hostIP/podIP: this node's (host network)
        self.logs: dict[tuple[str, str, str], bytes] = {}
        self._started: set[str] = set()  # pod UIDs run (or running)
        self._lock = threading.Lock()

    # -- pods ---------------------------------------------------------------------------

    def seen(self, event: kube.WatchEvent) -> None:
        """Watch callback (in the watcher's thread): bind and run what is ours to run."""
        items = event.items if isinstance(event, kube.Listed) else (
            (event.item,) if isinstance(event, kube.Changed) and event.type != "DELETED"
            else ())
        for obj in items:
            meta, spec = obj.get("metadata", {}), obj.get("spec", {})
            containers = spec.get("containers") or [{}]
            image = str(containers[0].get("image", ""))
            if RUNNABLE_IMAGE not in image.rsplit("/", 1)[-1].split(":")[0]:
                continue
            if obj.get("status", {}).get("phase") not in (None, "", "Pending"):
                continue
            with self._lock:
                if meta["uid"] in self._started:
                    continue
                self._started.add(meta["uid"])
            threading.Thread(target=self._run, args=(obj,), daemon=True).start()

    def _run(self, obj: dict[str, Any]) -> None:
        meta, spec = obj["metadata"], obj["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        base = f"/api/v1/namespaces/{ns}/pods/{name}"
        container = spec["containers"][0]
        if not spec.get("nodeName"):
            self.client.request("POST", f"{base}/binding", body={
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}})
        started = _now()
        self._status(base, "Running", {"running": {"startedAt": started}}, started)
        command = list(container.get("command") or [])
        if command[:1] == ["coredns-health-exporter"]:
            command = [sys.executable, "-m", "exporter", *command[1:]]
        command += list(container.get("args") or [])
        deadline = spec.get("activeDeadlineSeconds")
        try:
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=_REPO,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _REPO, "HOME": "/"},
            )
        except OSError as exc:  # the runtime's ContainerCannotRun
            with contextlib.suppress(kube.ApiException):
                self._status(base, "Failed", {"terminated": {
                    "exitCode": 128, "reason": "ContainerCannotRun", "message": str(exc),
                    "startedAt": started, "finishedAt": _now()}}, started)
            return
        try:
            output, _ = process.communicate(timeout=deadline)
            reason = "Completed" if process.returncode == 0 else "Error"
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            reason = "DeadlineExceeded"
        self.logs[(ns, name, container["name"])] = output
        phase = "Succeeded" if process.returncode == 0 and reason == "Completed" else "Failed"
        with contextlib.suppress(kube.ApiException):  # deleted meanwhile
            self._status(base, phase, {"terminated": {
                "exitCode": process.returncode, "reason": reason, "startedAt": started,
                "finishedAt": _now()}}, started)

    def _status(self, base: str, phase: str, state: dict[str, Any], started: str) -> None:
        pod = self.client.request("GET", base)
        name = pod["spec"]["containers"][0]["name"]
        pod["status"] = {
            "phase": phase, "hostIP": self.address, "podIP": self.address,
            "podIPs": [{"ip": self.address}], "startTime": started,
            "containerStatuses": [{"name": name, "image": pod["spec"]["containers"][0]["image"],
                                   "imageID": "", "ready": phase == "Running",
                                   "restartCount": 0, "state": state}],
        }
        self.client.request("PUT", f"{base}/status", body=pod)

    # -- HTTP ---------------------------------------------------------------------------

    async def container_logs(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["pod"],
               request.match_info["container"])
        if key not in self.logs:
            return web.Response(status=404, text=f"container {key[2]} of pod {key[0]}/"
                                                 f"{key[1]} has no log on this node")
        return web.Response(body=self.logs[key], content_type="text/plain")

    async def port_forward(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["pod"]
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=400, text="this kubelet speaks WebSocket port-forward "
                                                 "only")
        try:
            ports = [int(p) for v in request.query.getall("port", []) for p in v.split(",")]
        except ValueError:
            return web.Response(status=400, text="unable to parse the port")
        if not ports:
            return web.Response(status=400, text='query parameter "port" is required')
        pod = await asyncio.to_thread(self.client.get, f"/api/v1/namespaces/{ns}/pods/{name}")
        if pod is None:
            return web.Response(status=404, text=f"pod {ns}/{name} not found")
        ip, uid = pod.get("status", {}).get("podIP", ""), pod["metadata"]["uid"]
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS)
        await ws.prepare(request)
        writers: dict[int, asyncio.StreamWriter] = {}
        pumps = []
        for i, port in enumerate(ports):
            prefix = port.to_bytes(2, "little")
            await ws.send_bytes(bytes([2 * i]) + prefix)
            await ws.send_bytes(bytes([2 * i + 1]) + prefix)
            try:
                reader, writer = await asyncio.open_connection(ip, port)
            except OSError as exc:
                await ws.send_bytes(bytes([2 * i + 1]) + (
                    f"error forwarding port {port} to pod {name}, uid {uid}: {exc}").encode())
                continue
            writers[2 * i] = writer
            pumps.append(asyncio.create_task(self._pump(reader, ws, 2 * i)))
        if not writers:
            await ws.close()
            return ws
        async for message in ws:
            if message.type is WSMsgType.BINARY and message.data[:1]:
                target = writers.get(message.data[0])
                if target is not None:
                    target.write(message.data[1:])
                    await target.drain()
        for writer in writers.values():
            writer.close()
        for pump in pumps:
            pump.cancel()
        return ws

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, ws: web.WebSocketResponse,
                    channel: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await ws.send_bytes(bytes([channel]) + data)
        await ws.close()


async def serve(kubelet: Kubelet, cert: str, key: str) -> None:
    app = web.Application()
    app.router.add_get("/containerLogs/{ns}/{pod}/{container}", kubelet.container_logs)
    app.router.add_get("/portForward/{ns}/{pod}", kubelet.port_forward)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"listening {host}:{port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    kubeconfig, cert, key, node, address = argv
    client = kube.Client.connect(kubeconfig)
    kubelet = Kubelet(client, node, address)
    kube.Watcher(client, "pods", "", lambda obj: obj, kubelet.seen).start()
    asyncio.run(serve(kubelet, cert, key))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
