"""A real, current Kubernetes control plane, inside a network namespace the tests create.

Built by scripts/install-kube-test-cluster (Kubernetes v1.37.2 and etcd from the Go module
proxy), cached outside the repository. The control plane is configured as a real cluster's
is: token authentication, Node and RBAC authorization, the default admission plugins
(ServiceAccount, PodSecurity, ...) plus NodeRestriction, API Priority and Fairness as it
defaults, every default controller (with its own ServiceAccount credentials) and the
scheduler. A real node (harness/node.py) joins it when a test session asks for one.

Everything runs in the cluster namespace: etcd on its loopback, the API server on
NODE_IP:6443, the address it advertises (the `kubernetes` Service's endpoint), on a veth
pair whose both ends are inside, so no packet can leave. The tests reach the API through
a relay on the machine's loopback (`server`).

`scripts/test-cluster` starts the same cluster by hand (see docs/testing.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .components import CACHE, stop_process
from .netns import NetNS
from .relay import Relay

KUBE_VERSION = "v1.37.2"
KUBE_BIN = CACHE / f"kube-{KUBE_VERSION}" / "bin"
SERVICE_CIDR = "10.96.0.0/16"
# The API server allocates IPv6 ClusterIPs too, for dual-stack Services (the lab's); the
# primary family stays IPv4, so `default/kubernetes` and kube-dns are IPv4 alone.
SERVICE_CIDR_V6 = "fd00:96::/112"
POD_CIDR = "10.244.0.0/16"
# The ClusterIP the API server gives `default/kubernetes`: the first of SERVICE_CIDR.
KUBERNETES_CLUSTER_IP = "10.96.0.1"
# The node's address in the cluster namespace (the API server advertises it too), and the
# other end of its veth, where the cluster's upstream resolver listens.
NODE_IP = "10.77.0.1"
UPSTREAM_IP = "10.77.0.2"
API_PORT = 6443
# The kube-dns Service's ClusterIP, the kubelet's clusterDNS.
CLUSTER_DNS = "10.96.0.10"
# Nodes that may join: each has a token of its own identity (system:node:NAME), which the
# Node authorizer and NodeRestriction hold it to.
NODE_NAMES = ("worker-1", "worker-2")
ADMIN_TOKEN = "admin-token-for-tests-only"
# Static tokens of the components, each the identity the default RBAC roles name.
COMPONENT_TOKENS = {
    "kube-controller-manager": ("system:kube-controller-manager", ""),
    "kube-scheduler": ("system:kube-scheduler", ""),
    "kube-proxy": ("system:kube-proxy", ""),
}
KUBELET_CLIENT_CN = "kube-apiserver-kubelet-client"


def binaries_missing() -> str | None:
    """None when the cluster can be started here, else what is missing and how to get it."""
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        if not (KUBE_BIN / name).is_file():
            return f"{KUBE_BIN / name} not built: run scripts/install-kube-test-cluster"
    for tool in ("openssl", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/install-test-tools installs it)"
    if os.geteuid() != 0:
        return "the cluster's network namespace needs root"
    return None


def run_all(steps: Sequence[Callable[[], None]]) -> None:
    """Run every step of a tear-down, even when one fails; then raise the first error."""
    errors: list[BaseException] = []
    for step in steps:
        try:
            step()
        except Exception as exc:  # the rest must still run; the first is raised after
            errors.append(exc)
    if errors:
        raise errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _openssl(args: Sequence[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _sign(pki: Path, name: str, subject: str, ext: str) -> None:
    """`name`.crt/.key, signed by the test CA, with the extension lines `ext`."""
    _openssl(["req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
              "-subj", subject], pki)
    (pki / f"{name}.ext").write_text(ext)
    _openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
              "-CAcreateserial", "-out", f"{name}.crt", "-days", "30",
              "-extfile", f"{name}.ext"], pki)


def _make_certs(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(["req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "30",
              "-subj", "/CN=coredns-health-exporter-test-ca"], pki)
    names = ",".join(f"DNS:{n}" for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local"))
    _sign(pki, "apiserver", "/CN=kube-apiserver",
          f"subjectAltName=IP:127.0.0.1,IP:{NODE_IP},IP:{KUBERNETES_CLUSTER_IP},{names}\n"
          "extendedKeyUsage=serverAuth\n")
    # The API server's client certificate towards kubelets (logs, exec, port-forward).
    _sign(pki, "kubelet-client", f"/CN={KUBELET_CLIENT_CN}", "extendedKeyUsage=clientAuth\n")
    _openssl(["genrsa", "-out", "sa.key", "2048"], pki)
    _openssl(["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], pki)


class Process:
    """One cluster process, its output in a log file, stopped by its PID."""

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
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler in the cluster
    namespace; the API on the machine's loopback through a relay.

    `controllers` and `scheduler` are for the lab's control plane (harness/lab.py), whose
    nodes and pods are objects without a kubelet: there the node lifecycle controller would
    mark its pods not Ready, and the ReplicaSet and DaemonSet controllers and the scheduler
    would make and bind pods that never run. A cluster with real nodes runs them all."""

    @classmethod
    def for_lab(cls, workdir: Path) -> Cluster:
        """The lab's control plane: no node lifecycle, ReplicaSet or DaemonSet controller,
        no scheduler."""
        return cls(workdir, controllers="*,-nodelifecycle,-replicaset,-daemonset",
                   scheduler=False)

    def __init__(self, workdir: Path, controllers: str = "*", scheduler: bool = True) -> None:
        self.workdir = workdir
        self.controllers = controllers
        self.with_scheduler = scheduler
        self.pki = workdir / "pki"
        self.ca_file = self.pki / "ca.crt"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.tokens: dict[str, str] = {}
        self.netns: NetNS | None = None
        self._relay: Relay | None = None
        self.api_port = 0
        self.server = ""
        self.etcd: Process | None = None
        self.apiserver: Process | None = None
        self.controller_manager: Process | None = None
        self.scheduler: Process | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 90) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _make_certs(self.pki)
        self.netns = ns = NetNS("k8s")
        # A veth pair with both ends inside: the node's address and the upstream's, and
        # nothing that leads out of the namespace.
        ns.exec(["ip", "link", "add", "chx0", "type", "veth", "peer", "name", "chx1"])
        ns.exec(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "chx0"])
        ns.exec(["ip", "addr", "add", f"{UPSTREAM_IP}/24", "dev", "chx1"])
        ns.exec(["ip", "link", "set", "chx0", "up"])
        ns.exec(["ip", "link", "set", "chx1", "up"])
        # Service IPs route onto the node's interface, where kube-proxy's rules catch them.
        ns.exec(["ip", "route", "add", SERVICE_CIDR, "dev", "chx0"])
        lines = [f"{ADMIN_TOKEN},admin,admin-uid,system:masters"]
        identities = {**COMPONENT_TOKENS,
                      **{f"node:{n}": (f"system:node:{n}", "system:nodes") for n in NODE_NAMES}}
        for component, (user, group) in identities.items():
            token = self.tokens[component] = f"{component}-token-{os.urandom(8).hex()}"
            lines.append(f'{token},{user},{user}-uid,"{group}"' if group
                         else f"{token},{user},{user}-uid")
        (self.workdir / "tokens.csv").write_text("\n".join(lines) + "\n")
        self._relay = Relay.start("-", "127.0.0.1:0", ns.path, f"{NODE_IP}:{API_PORT}")
        self.server = f"https://{self._relay.address}"
        self.api_port = int(self._relay.address.rsplit(":", 1)[1])
        self.write_kubeconfig(self.admin_kubeconfig, ADMIN_TOKEN)
        self.etcd = self.start_process("etcd", [
            str(KUBE_BIN / "etcd"), "--name", "test", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", "http://127.0.0.1:2379",
            "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "test=http://127.0.0.1:2380",
            "--listen-metrics-urls", "http://127.0.0.1:2381",
            "--unsafe-no-fsync",
        ])
        self._await_in_netns(self.etcd, "http://127.0.0.1:2381/health", timeout)
        self.start_apiserver(timeout)
        # What kubeadm grants: the API server may use every kubelet API (logs, exec,
        # port-forward), authorized by the kubelets' webhook.
        self.api("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "metadata": {"name": "kube-apiserver-kubelet-api-admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": KUBELET_CLIENT_CN}]})
        self.controller_manager = self.start_process("kube-controller-manager", [
            str(KUBE_BIN / "kube-controller-manager"),
            "--kubeconfig", str(self.component_kubeconfig("kube-controller-manager")),
            "--authentication-kubeconfig", str(self.admin_kubeconfig_inside()),
            "--authorization-kubeconfig", str(self.admin_kubeconfig_inside()),
            "--bind-address", "127.0.0.1", "--secure-port", "10257",
            "--controllers", self.controllers, "--use-service-account-credentials",
            "--service-account-private-key-file", str(self.pki / "sa.key"),
            "--root-ca-file", str(self.ca_file),
            "--cluster-signing-cert-file", str(self.ca_file),
            "--cluster-signing-key-file", str(self.pki / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--cluster-cidr", POD_CIDR,
            "--leader-elect=false", "--concurrent-endpoint-syncs=2",
        ])
        if self.with_scheduler:
            self.scheduler = self.start_process("kube-scheduler", [
                str(KUBE_BIN / "kube-scheduler"),
                "--kubeconfig", str(self.component_kubeconfig("kube-scheduler")),
                "--authentication-kubeconfig", str(self.admin_kubeconfig_inside()),
                "--authorization-kubeconfig", str(self.admin_kubeconfig_inside()),
                "--bind-address", "127.0.0.1", "--secure-port", "10259",
                "--leader-elect=false",
            ])
            self._await_in_netns(self.scheduler, "https://127.0.0.1:10259/healthz", timeout,
                                 verify=False)
        self._await_controllers(timeout)

    def start_apiserver(self, timeout: float = 90) -> None:
        self.apiserver = self.start_process("kube-apiserver", [
            str(KUBE_BIN / "kube-apiserver"),
            "--etcd-servers", "http://127.0.0.1:2379",
            "--bind-address", "0.0.0.0", "--advertise-address", NODE_IP,
            "--secure-port", str(API_PORT),
            "--tls-cert-file", str(self.pki / "apiserver.crt"),
            "--tls-private-key-file", str(self.pki / "apiserver.key"),
            "--client-ca-file", str(self.ca_file),
            "--token-auth-file", str(self.workdir / "tokens.csv"),
            "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction",
            "--service-account-key-file", str(self.pki / "sa.pub"),
            "--service-account-signing-key-file", str(self.pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--api-audiences", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", f"{SERVICE_CIDR},{SERVICE_CIDR_V6}",
            "--kubelet-client-certificate", str(self.pki / "kubelet-client.crt"),
            "--kubelet-client-key", str(self.pki / "kubelet-client.key"),
            # As kubeadm configures it: a node's own name need not resolve.
            "--kubelet-preferred-address-types", "InternalIP,ExternalIP,Hostname",
        ])
        self._await_api(self.apiserver, timeout)

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            self.apiserver.stop()

    def stop(self) -> None:
        """Stop everything, each step even when an earlier one failed."""
        steps = [p.stop for p in (self.scheduler, self.controller_manager, self.apiserver,
                                  self.etcd) if p is not None]
        if self._relay is not None:
            steps.append(self._relay.stop)
        if self.netns is not None:
            steps.append(self.netns.delete)
        run_all(steps)

    # -- inside the cluster namespace -----------------------------------------------------

    def start_process(self, name: str, args: Sequence[str], log_name: str = "") -> Process:
        """A process inside the cluster namespace, its output in WORKDIR/LOG_NAME.log."""
        assert self.netns is not None
        return Process(name, self.netns.enter(args),
                       self.workdir / f"{log_name or name}.log")

    @property
    def upstream_ip(self) -> str:
        """Where the cluster's upstream resolver listens (the node's resolv.conf)."""
        return UPSTREAM_IP

    def api(self, method: str, path: str, body: object = None, *,
            missing_ok: bool = False) -> dict[str, Any] | None:
        """One call to the API as admin, plain JSON; None for a 404 when `missing_ok`."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}",
                   "Content-Type": "application/json"}
        request = urllib.request.Request(f"{self.server}{path}", data, headers, method=method)
        context = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                answer: dict[str, Any] = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from exc

    def _await_api(self, process: Process, timeout: float) -> None:
        process.await_ready(f"{self.server}/readyz", timeout, token=ADMIN_TOKEN,
                            context=ssl.create_default_context(cafile=str(self.ca_file)))

    def _await_in_netns(self, process: Process, url: str, timeout: float,
                        verify: bool = True) -> None:
        """Wait for a URL that only answers inside the cluster namespace, through a relay
        made for the wait."""
        assert self.netns is not None
        host_port = url.split("/")[2]
        relay = Relay.start("-", "127.0.0.1:0", self.netns.path, host_port)
        try:
            context: ssl.SSLContext | None = None
            if url.startswith("https"):
                context = ssl.create_default_context()
                if not verify:  # the component's self-signed serving certificate
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            process.await_ready(url.replace(host_port, relay.address), timeout,
                                context=context)
        finally:
            relay.stop()

    @contextlib.contextmanager
    def exposed(self, address: str) -> Iterator[str]:
        """An address on the machine's loopback leading to `address` in the cluster
        namespace (a pod IP, a Service IP), for as long as the context lasts."""
        assert self.netns is not None
        relay = Relay.start("-", "127.0.0.1:0", self.netns.path, address)
        try:
            yield relay.address
        finally:
            relay.stop()

    def _await_controllers(self, timeout: float) -> None:
        """Return once the controllers run: the endpoints controller has made the Endpoints
        of a canary Service, and the ServiceAccount controller the `default` accounts of
        default and kube-system (the controller manager's informers sync a while after it
        starts; a test must not race them, and pods are refused in a namespace without its
        `default` account)."""
        assert self.controller_manager is not None
        call = self._first_line
        canary = "controller-canary"
        call("POST", "default/services", {"metadata": {"name": canary}, "spec": {
            "selector": {"canary": canary}, "ports": [{"port": 1}]}})
        deadline = time.monotonic() + timeout
        try:
            for watched in (f"default/endpoints?fieldSelector=metadata.name%3D{canary}",
                            "default/serviceaccounts?fieldSelector=metadata.name%3Ddefault",
                            "kube-system/serviceaccounts?fieldSelector=metadata.name%3Ddefault"):
                while True:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"the controllers did not run within {timeout}s ({watched}):\n"
                            f"{self.controller_manager.tail()}")
                    if not self.controller_manager.alive():
                        raise RuntimeError(
                            f"kube-controller-manager exited:\n{self.controller_manager.tail()}")
                    # A watch from no resourceVersion starts with the object if it exists;
                    # it ends after a few seconds so that a dead controller is noticed.
                    if call("GET", f"{watched}&watch=true&timeoutSeconds=5").strip():
                        break
        finally:
            call("DELETE", f"default/services/{canary}")

    def await_default_account(self, namespace: str, timeout: float = 30) -> None:
        """Return once the ServiceAccount controller has made `default` in `namespace` (a
        new one): until then ServiceAccount admission refuses every pod there."""
        watched = (f"{namespace}/serviceaccounts?fieldSelector=metadata.name%3Ddefault"
                   f"&watch=true&timeoutSeconds={int(timeout)}")
        if not self._first_line("GET", watched, timeout=timeout + 5).strip():
            raise RuntimeError(f"no default ServiceAccount in {namespace} after {timeout}s")

    def _first_line(self, method: str, path: str, body: object = None,
                    timeout: float = 15) -> bytes:
        """The first line of an admin call under /api/v1/namespaces/ (a watch's first
        event, or a whole object)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.server}/api/v1/namespaces/{path}", data,
                                         headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            line: bytes = response.readline()
            return line

    # -- credentials -------------------------------------------------------------------

    def admin_kubeconfig_inside(self) -> Path:
        """The admin's kubeconfig for processes inside the cluster namespace."""
        path = self.workdir / "admin-inside.kubeconfig"
        if not path.exists():
            self.write_kubeconfig(path, ADMIN_TOKEN, server=f"https://{NODE_IP}:{API_PORT}")
        return path

    def node_kubeconfig(self, node: str) -> Path:
        """The kubeconfig of node `node`'s kubelet (its own identity)."""
        return self.component_kubeconfig(f"node:{node}")

    def component_kubeconfig(self, component: str) -> Path:
        return self.write_kubeconfig(self.workdir / f"{component.replace(':', '-')}.kubeconfig",
                                     self.tokens[component],
                                     server=f"https://{NODE_IP}:{API_PORT}")

    def write_kubeconfig(self, path: Path, token: str, server: str | None = None) -> Path:
        """A kubeconfig for `token` (JSON is YAML), for the API at `server` (default: the
        relay on the machine's loopback)."""
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
