"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

Built by scripts/install-kube-test-cluster (Debian's kubernetes 1.20.2 source, Go 1.19,
etcd-server), cached outside the repository. Token authentication and RBAC are on, as in
a real cluster. There is no kubelet and no scheduler: the tests create Node and Pod
objects and patch their status to point at CoreDNS processes in network namespaces.

`scripts/test-cluster` starts the same cluster by hand (see docs/testing.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from .components import CACHE, stop_process

KUBE_BIN = CACHE / "kube" / "bin"
SERVICE_CIDR = "10.96.0.0/16"
# The ClusterIP the API server gives `default/kubernetes`: the first of SERVICE_CIDR.
KUBERNETES_CLUSTER_IP = "10.96.0.1"
ADMIN_TOKEN = "admin-token-for-tests-only"
CONTROLLERS = "endpoint,endpointslice,disruption,namespace,garbagecollector"


def binaries_missing() -> str | None:
    """None when the cluster can be started here, else what is missing and how to get it."""
    for name in ("kube-apiserver", "kube-controller-manager"):
        if not (KUBE_BIN / name).is_file():
            return f"{KUBE_BIN / name} not built: run scripts/install-kube-test-cluster"
    if shutil.which("etcd") is None:
        return "etcd not installed: run scripts/install-kube-test-cluster (etcd-server)"
    if shutil.which("openssl") is None:
        return "openssl not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _openssl(args: Sequence[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30",
              "-subj", "/CN=coredns-health-exporter-test-ca"], pki)
    _openssl(["req", *ec, "-keyout", "apiserver.key", "-out", "apiserver.csr",
              "-subj", "/CN=kube-apiserver"], pki)
    (pki / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
    )
    _openssl(["x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
              "-CAcreateserial", "-out", "apiserver.crt", "-days", "30",
              "-extfile", "san.ext"], pki)
    _openssl(["genrsa", "-out", "sa.key", "2048"], pki)
    _openssl(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)


class Process:
    """One control-plane process, its output in a log file, stopped by its PID."""

    def __init__(self, name: str, args: Sequence[str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        stop_process(self.popen)

    def await_ready(self, url: str, timeout: float, *, token: str | None = None,
                    context: ssl.SSLContext | None = None) -> None:
        """Return once `url` answers 200; stop the process and raise if it exits first or
        is not ready in time."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(url, headers=headers)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.2)  # polling a server that is starting: there is no event to wait on
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s ({last}):\n{self.tail()}")


class Cluster:
    """etcd + kube-apiserver + kube-controller-manager, all on 127.0.0.1."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pki = workdir / "pki"
        self.etcd_port = free_port()
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.ca_file = self.pki / "ca.crt"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.etcd: Process | None = None
        self.apiserver: Process | None = None
        self.controller_manager: Process | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _make_certs(self.pki)
        (self.workdir / "tokens.csv").write_text(
            f"{ADMIN_TOKEN},admin,admin-uid,system:masters\n"
        )
        self.write_kubeconfig(self.admin_kubeconfig, ADMIN_TOKEN)
        peer = free_port()
        self.etcd = Process("etcd", [
            "etcd", "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
        ], self.workdir / "etcd.log")
        self._await(self.etcd, f"http://127.0.0.1:{self.etcd_port}/health", timeout)
        self.start_apiserver(timeout)
        self.controller_manager = Process("kube-controller-manager", [
            str(KUBE_BIN / "kube-controller-manager"),
            "--kubeconfig", str(self.admin_kubeconfig),
            "--controllers", CONTROLLERS,
            "--leader-elect=false", "--port=0", "--secure-port=0",
            "--concurrent-endpoint-syncs=2",
        ], self.workdir / "kube-controller-manager.log")
        self._await_controllers(timeout)

    def start_apiserver(self, timeout: float = 90) -> None:
        self.apiserver = Process("kube-apiserver", [
            str(KUBE_BIN / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.api_port),
            "--tls-cert-file", str(self.pki / "apiserver.crt"),
            "--tls-private-key-file", str(self.pki / "apiserver.key"),
            "--token-auth-file", str(self.workdir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-key-file", str(self.pki / "sa.pub"),
            "--service-account-signing-key-file", str(self.pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--api-audiences", "https://kubernetes.default.svc",
            "--service-cluster-ip-range", SERVICE_CIDR,
            # No kubelet here: pods are objects the tests make; no token Secrets exist.
            "--disable-admission-plugins", "ServiceAccount",
            "--enable-priority-and-fairness=false",
        ], self.workdir / "kube-apiserver.log")
        self._await(self.apiserver, f"{self.server}/readyz", timeout)

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            self.apiserver.stop()

    def stop(self) -> None:
        for process in (self.controller_manager, self.apiserver, self.etcd):
            if process is not None:
                process.stop()

    def _await(self, process: Process, url: str, timeout: float) -> None:
        process.await_ready(url, timeout, token=ADMIN_TOKEN,
                            context=ssl.create_default_context(cafile=str(self.ca_file)))

    def _await_controllers(self, timeout: float) -> None:
        """Return once the controllers run: the endpoints controller has made the Endpoints
        of a canary Service (the controller manager has no health port here, and its
        informers sync a while after it starts; a test must not race them)."""
        assert self.controller_manager is not None
        context = ssl.create_default_context(cafile=str(self.ca_file))
        base = f"{self.server}/api/v1/namespaces/default"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}

        def call(method: str, path: str, body: object = None) -> bytes:
            """The first line of the answer (a watch's first event, or a whole object)."""
            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(f"{base}/{path}", data, headers, method=method)
            with urllib.request.urlopen(request, timeout=15, context=context) as response:
                line: bytes = response.readline()
                return line

        canary = "controller-canary"
        call("POST", "services", {"metadata": {"name": canary}, "spec": {
            "selector": {"canary": canary}, "ports": [{"port": 1}]}})
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.controller_manager.alive():
                    raise RuntimeError(
                        f"kube-controller-manager exited:\n{self.controller_manager.tail()}")
                # A watch from no resourceVersion starts with the object if it exists; it
                # ends after a few seconds so that a dead controller manager is noticed.
                event = call("GET", f"endpoints?watch=true&timeoutSeconds=5"
                             f"&fieldSelector=metadata.name%3D{canary}")
                if event.strip():
                    return
            raise RuntimeError(f"the endpoints controller did not run within {timeout}s:\n"
                               f"{self.controller_manager.tail()}")
        finally:
            call("DELETE", f"services/{canary}")

    # -- credentials -------------------------------------------------------------------

    def write_kubeconfig(self, path: Path, token: str, server: str | None = None) -> Path:
        """A kubeconfig for `token` (JSON is YAML), for the API at `server` (default: ours)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": server or self.server,
                "certificate-authority": str(self.ca_file),
            }}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config, indent=2))
        os.chmod(path, 0o600)
        return path
