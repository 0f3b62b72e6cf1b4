"""A small cluster network for the tests: a "node" namespace and CoreDNS "pods".

The node namespace is where the exporter under test runs. It has a bridge (br0,
10.244.0.1/24) with one veth per pod namespace, a route for the Service range onto the
bridge, and no default route: an address that is not a pod's fails right there. A Service
IP is emulated as kube-proxy (iptables mode) does it: DNAT in the node's nat OUTPUT chain
to the pod addresses, chosen at random per connection. The API server, which listens on
the machine's loopback, is reachable from the node namespace at 127.0.0.1:6443 through a
relay; so is the exporter's HTTP port from the tests.

Each pod is a real CoreDNS in its own namespace, on port 53 of its own address, and the
matching Pod object in the test cluster carries that address in its status.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes
import yaml

from exporter.kube import Client as ExporterClient

from . import coredns
from .cluster import Cluster
from .netns import NetNS
from .relay import Relay

POD_PREFIX = "10.244.0."
NODE_ADDRESS = POD_PREFIX + "1"
# Dual-stack pods have an IPv6 address too, on the same bridge.
POD_PREFIX_V6 = "fd00:244::"
NODE_ADDRESS_V6 = POD_PREFIX_V6 + "1"
# The node's address on the network outside the cluster (InternalIP of its Node object),
# the outside namespace's own, and a load balancer's ingress IP that routes via the node.
NODE_OUTSIDE = "192.168.77.1"
OUTSIDE_ADDRESS = "192.168.77.2"
LB_ADDRESS = "192.168.78.10"
API_IN_NODE = "127.0.0.1:6443"
SELECTOR = {"k8s-app": "kube-dns"}
_CHAIN = "CHX-SERVICES"


@dataclass
class Pod:
    name: str
    ip: str
    netns: NetNS
    server: coredns.CoreDNS
    node: str
    ip6: str = ""  # a dual-stack pod's IPv6 address

    @property
    def ips(self) -> list[str]:
        return [self.ip, self.ip6] if self.ip6 else [self.ip]

    def stop(self) -> None:
        self.server.stop()
        self.netns.delete()


@dataclass
class Lab:
    """The node namespace, its pods, and the objects in the test cluster that describe them."""

    cluster: Cluster
    coredns_bin: Path
    workdir: Path
    namespace: str = field(default_factory=lambda: f"t-{uuid.uuid4().hex[:8]}")
    service: str = "kube-dns"
    pods: dict[str, Pod] = field(default_factory=dict)
    cluster_ips: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._hosts = itertools.count(2)
        self._relays: list[Relay] = []
        self._ready: dict[str, bool] = {}
        self._others: list[Pod] = []  # pods in other namespaces
        self._cleanup: list[tuple[str, str, str]] = []  # objects outside our namespaces
        self._raw: ExporterClient | None = None
        self._nodes: set[str] = set()
        self.outside_ns: NetNS | None = None
        self.exposed: list[tuple[str, int, str]] = []  # (address, port, proto) DNATed to pods
        self.node = NetNS("node")
        for args in (
            ["ip", "link", "add", "br0", "type", "bridge"],
            ["ip", "addr", "add", f"{NODE_ADDRESS}/24", "dev", "br0"],
            ["ip", "link", "set", "br0", "up"],
            ["ip", "route", "add", "10.96.0.0/16", "dev", "br0"],
            ["ip", "addr", "add", f"{NODE_ADDRESS_V6}/64", "dev", "br0", "nodad"],
            ["ip", "route", "add", "fd00:96::/112", "dev", "br0"],
            *([tool, "-t", "nat", *rule] for tool in ("iptables", "ip6tables") for rule in (
                ["-N", _CHAIN], ["-A", "OUTPUT", "-j", _CHAIN],
                ["-A", "PREROUTING", "-j", _CHAIN])),
        ):
            self.node.exec(args)
        self.relay_in(API_IN_NODE, f"127.0.0.1:{self.cluster.api_port}")
        # The client's typed models add nothing here: the harness speaks plain JSON bodies.
        self.api: Any = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            str(self.cluster.admin_kubeconfig)
        )
        self.core: Any = cast(Any, kubernetes.client.CoreV1Api(self.api))
        self.rbac: Any = cast(Any, kubernetes.client.RbacAuthorizationV1Api(self.api))
        self._namespaces: list[str] = []  # those the lab made, and deletes
        try:
            self.core.create_namespace({"metadata": {"name": self.namespace}})
            self._namespaces.append(self.namespace)
            self._await_default_account(self.namespace)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:  # an existing namespace (kube-system) is used, not owned
                raise

    def _await_default_account(self, namespace: str) -> None:
        self.cluster.await_default_account(namespace)

    # -- network -----------------------------------------------------------------------

    def relay_in(self, listen: str, connect: str) -> Relay:
        """Listen at `listen` inside the node namespace; connect to `connect` outside it."""
        relay = Relay.start(f"/run/netns/{self.node.name}", listen, "-", connect)
        self._relays.append(relay)
        return relay

    def kubeconfig(self, token: str, name: str = "exporter") -> Path:
        """A kubeconfig for use inside the node namespace, authenticating with `token`."""
        return self.cluster.write_kubeconfig(
            self.workdir / f"{name}.kubeconfig", token, server=f"https://{API_IN_NODE}"
        )

    def admin_kubeconfig(self) -> Path:
        from .cluster import ADMIN_TOKEN

        return self.kubeconfig(ADMIN_TOKEN, "admin")

    def start_pod_network(
        self, behaviour: coredns.Behaviour = coredns.Behaviour.HEALTHY, *,
        dual_stack: bool = False, **options: str
    ) -> tuple[NetNS, str, str, coredns.CoreDNS]:
        """A pod namespace on the bridge and its CoreDNS: (namespace, IPv4, IPv6 or "",
        server); `options` go to coredns.start (delay, lameduck)."""
        host = next(self._hosts)
        ip = f"{POD_PREFIX}{host}"
        ip6 = f"{POD_PREFIX_V6}{host:x}" if dual_stack else ""
        ns = NetNS("pod")
        veth = f"vp{host}"
        self.node.exec(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                        "netns", ns.name])
        self.node.exec(["ip", "link", "set", veth, "master", "br0", "up"])
        ns.exec(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        if ip6:  # nodad: usable at once, not after duplicate address detection
            ns.exec(["ip", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad"])
        ns.exec(["ip", "link", "set", "eth0", "up"])
        server = coredns.start(
            self.coredns_bin, self.workdir / "coredns", behaviour, netns=ns, host=ip, port=53,
            extra_hosts=[ip6] if ip6 else [], **options,  # type: ignore[arg-type]
        )
        return ns, ip, ip6, server

    def route_service(self) -> None:
        """Rewrite the DNAT rules: each Service IP to the Ready pods of its family, as
        kube-proxy does."""
        for tool in ("iptables", "ip6tables"):
            self.node.exec([tool, "-t", "nat", "-F", _CHAIN])
        ready = [p for p in self.pods.values() if self._ready.get(p.name, True)]
        fronts = [(ip, 53, proto) for ip in self.cluster_ips for proto in ("udp", "tcp")]
        for address, port, proto in fronts + self.exposed:
            v6 = ":" in address
            backends = [p.ip6 if v6 else p.ip for p in ready if p.ip6 or not v6]
            for i, ip in enumerate(backends):
                match = ["-d", address, "-p", proto, "--dport", str(port)]
                left = len(backends) - i
                if left > 1:
                    match += ["-m", "statistic", "--mode", "random",
                              "--probability", f"{1 / left:.5f}"]
                to = f"[{ip}]:53" if v6 else f"{ip}:53"
                self.node.exec(["ip6tables" if v6 else "iptables", "-t", "nat", "-A", _CHAIN,
                                *match, "-j", "DNAT", "--to-destination", to])

    # -- Kubernetes objects ---------------------------------------------------------------

    def other_namespace(self) -> str:
        """Another Kubernetes namespace, deleted with the lab."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        self._namespaces.append(name)
        self._await_default_account(name)
        return name

    def ensure_node(self, name: str) -> None:
        try:
            self.core.create_node({"metadata": {"name": name}})
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        self._nodes.add(name)
        self._point_node(name)

    def _point_node(self, name: str) -> None:
        """Write the node's address outside the cluster network (its InternalIP, where
        nodeport mode probes), once there is one, as its kubelet would."""
        if self.outside_ns is None:
            return
        self.core.patch_node_status(name, {"status": {
            "addresses": [{"type": "InternalIP", "address": NODE_OUTSIDE}]}})

    def outside(self) -> NetNS:
        """A namespace outside the cluster network: it reaches the node at NODE_OUTSIDE
        (and LB_ADDRESS through it) and the API server at 127.0.0.1:6443, and no pod or
        Service IP."""
        if self.outside_ns is not None:
            return self.outside_ns
        ns = self.outside_ns = NetNS("outside")
        self.node.exec(["ip", "link", "add", "vout", "type", "veth", "peer", "name", "eth0",
                        "netns", ns.name])
        self.node.exec(["ip", "addr", "add", f"{NODE_OUTSIDE}/24", "dev", "vout"])
        self.node.exec(["ip", "link", "set", "vout", "up"])
        self.node.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # kube-proxy masquerades node-port traffic from outside: pods answer the node.
        self.node.exec(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s",
                        f"{OUTSIDE_ADDRESS}/32", "-o", "br0", "-j", "MASQUERADE"])
        ns.exec(["ip", "addr", "add", f"{OUTSIDE_ADDRESS}/24", "dev", "eth0"])
        ns.exec(["ip", "link", "set", "eth0", "up"])
        ns.exec(["ip", "route", "add", f"{LB_ADDRESS}/32", "via", NODE_OUTSIDE])
        self._relays.append(Relay.start(f"/run/netns/{ns.name}", API_IN_NODE, "-",
                                        f"127.0.0.1:{self.cluster.api_port}"))
        for name in self._nodes:
            self._point_node(name)
        return ns

    def create_exposed_service(self, kind: str, name: str = "kube-dns-external",
                               protocols: tuple[str, ...] = ("UDP", "TCP")) -> dict[str, Any]:
        """A NodePort or LoadBalancer Service in front of the CoreDNS pods, routed as
        kube-proxy does (node port on NODE_OUTSIDE; the LB's ingress IP LB_ADDRESS).
        `protocols` are its ports' (a LoadBalancer may mix UDP and TCP since 1.26)."""
        names = {"UDP": "dns", "TCP": "dns-tcp"}
        body = {
            "metadata": {"name": name},
            "spec": {"type": kind, "selector": SELECTOR, "ports": [
                {"name": names[p], "port": 53, "protocol": p, "targetPort": 53}
                for p in protocols
            ]},
        }
        svc = self.raw.request("POST", f"/api/v1/namespaces/{self.namespace}/services",
                               body=body)
        for port in svc["spec"]["ports"]:
            self.exposed.append((NODE_OUTSIDE, port["nodePort"], port["protocol"].lower()))
        if kind == "LoadBalancer":
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": LB_ADDRESS}]}}
            svc = self.raw.request(
                "PUT", f"/api/v1/namespaces/{self.namespace}/services/{name}/status", body=svc)
            self.exposed += [(LB_ADDRESS, 53, p.lower()) for p in protocols]
        self.route_service()
        return svc

    def create_service(self, namespace: str | None = None, name: str | None = None,
                       selector: dict[str, str] | None = None, dual_stack: bool = False) -> str:
        """The CoreDNS Service (dual-stack: both ClusterIPs, IPv4 first); its IPv4
        ClusterIP."""
        families = {"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]}
        body = {
            "metadata": {"name": name or self.service, "labels": {"k8s-app": "kube-dns"}},
            "spec": {
                **(families if dual_stack else {}),
                "selector": selector or SELECTOR,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": 9153},
                ],
            },
        }
        svc = self.core.create_namespaced_service(namespace or self.namespace, body)
        ip: str = svc.spec.cluster_ip
        if namespace in (None, self.namespace):
            self.cluster_ips = list(svc.spec.cluster_ips or [ip])
            self.route_service()
        return ip

    def add_pod(
        self,
        behaviour: coredns.Behaviour = coredns.Behaviour.HEALTHY,
        *,
        ready: bool = True,
        node: str = "node-a",
        namespace: str | None = None,
        labels: dict[str, str] | None = None,
        dual_stack: bool = False,
        **options: str,
    ) -> Pod:
        """A CoreDNS pod: a namespace, a CoreDNS process and the Pod object, Running
        (dual-stack: an IPv6 address too, in podIPs after the IPv4 one); `options` go to
        coredns.start (delay, lameduck)."""
        ns, ip, ip6, server = self.start_pod_network(behaviour, dual_stack=dual_stack,
                                                     **options)
        name = f"coredns-{ip.rsplit('.', 1)[1]}-{uuid.uuid4().hex[:5]}"
        pod = Pod(name, ip, ns, server, node, ip6)
        self.ensure_node(node)
        self.core.create_namespaced_pod(namespace or self.namespace, {
            "metadata": {"name": name, "labels": labels or SELECTOR},
            "spec": {"nodeName": node, "containers": [{"name": "coredns", "image": "coredns"}]},
        })
        self._patch_status(namespace or self.namespace, name, pod.ips, ready)
        if namespace in (None, self.namespace):
            self.pods[name] = pod
            self._ready[name] = ready
            self.route_service()
        else:
            self._others.append(pod)
        return pod

    def set_ready(self, pod: Pod, ready: bool) -> None:
        self._patch_status(self.namespace, pod.name, pod.ips, ready)
        self._ready[pod.name] = ready
        self.route_service()

    def delete_pod(self, pod: Pod) -> None:
        self.core.delete_namespaced_pod(pod.name, self.namespace, grace_period_seconds=0,
                                        _preload_content=False)
        del self.pods[pod.name]
        self.route_service()
        pod.stop()

    def _patch_status(self, namespace: str, name: str, ips: list[str], ready: bool) -> None:
        status = "True" if ready else "False"
        body: dict[str, Any] = {"status": {
            "phase": "Running",
            "podIP": ips[0],
            "podIPs": [{"ip": ip} for ip in ips],
            "hostIP": NODE_ADDRESS,
            "conditions": [
                {"type": "Ready", "status": status},
                {"type": "ContainersReady", "status": status},
            ],
        }}
        self.core.patch_namespaced_pod_status(name, namespace, body)

    def grant(self, account: str, role: str, rules: list[dict[str, Any]]) -> None:
        """A Role `role` with `rules` in the lab's namespace, bound to ServiceAccount
        `account` there."""
        ns = self.namespace
        self.rbac.create_namespaced_role(ns, {"metadata": {"name": role}, "rules": rules},
                                         _preload_content=False)
        self.rbac.create_namespaced_role_binding(ns, {
            "metadata": {"name": role},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        }, _preload_content=False)

    def service_account_token(self, name: str, rules: list[dict[str, Any]]) -> str:
        """A ServiceAccount in the lab's namespace bound to a Role with `rules`; its token."""
        ns = self.namespace
        self.core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
        self.grant(name, name, rules)
        request = self.core.create_namespaced_service_account_token(
            name, ns, {"spec": {"audiences": [], "expirationSeconds": 3600}}
        )
        token: str = request.status.token
        return token

    @property
    def raw(self) -> ExporterClient:
        """The exporter's own plain-JSON client, as admin (plain bodies, no models)."""
        if self._raw is None:
            self._raw = ExporterClient.connect(str(self.cluster.admin_kubeconfig))
        return self._raw

    def create_pdb(self, min_available: int) -> None:
        """A PodDisruptionBudget over the CoreDNS pods; returns once the disruption
        controller has computed its status."""
        base = f"/apis/policy/v1/namespaces/{self.namespace}/poddisruptionbudgets"
        self.raw.request("POST", base, body={
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "coredns"},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": SELECTOR}},
        })
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.raw.request("GET", f"{base}/coredns").get("status", {})
            if status.get("observedGeneration") and "disruptionsAllowed" in status:
                return
            time.sleep(0.2)  # polling the controller's status: it has no event to wait on
        raise RuntimeError("the disruption controller did not process the PDB")

    def create_deployment(self, rolled_out: bool) -> None:
        """A paused CoreDNS Deployment over the lab's pods, whose status the deployment
        controller writes: with no replicas it is rolled out (0 of 0 updated); with one
        per pod it is mid-rollout (paused, it never makes the ReplicaSet that would update
        them). Paused, it makes no ReplicaSet that could adopt the lab's pods."""
        base = f"/apis/apps/v1/namespaces/{self.namespace}/deployments"
        replicas = 0 if rolled_out else len(self.pods)
        dep = self.raw.request("POST", base, body={
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "coredns"},
            "spec": {"replicas": replicas, "paused": True,
                     "selector": {"matchLabels": SELECTOR},
                     "template": {"metadata": {"labels": SELECTOR}, "spec": {
                         "containers": [{"name": "coredns", "image": "coredns"}]}}},
        })
        generation = dep["metadata"]["generation"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.raw.request("GET", f"{base}/coredns").get("status", {})
            if status.get("observedGeneration") == generation:
                return
            time.sleep(0.2)  # polling the controller's status: it has no event to wait on
        raise RuntimeError("the deployment controller did not process the Deployment")

    def await_allowed(self, user: str, verb: str, resource: str, group: str = "",
                      timeout: float = 10, subresource: str = "",
                      namespace: str | None = None, name: str = "") -> None:
        """Return once the API server's authorizer lets `user` do it (RBAC is cached)."""
        attributes = {"namespace": self.namespace if namespace is None else namespace,
                      "verb": verb, "resource": resource, "group": group,
                      "subresource": subresource, "name": name}
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": user, "resourceAttributes": attributes}}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.raw.request(
                "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review)
            if answer.get("status", {}).get("allowed"):
                return
            time.sleep(0.1)  # polling the authorizer's cache: no event to wait on
        raise RuntimeError(f"{user} still may not {verb} {resource} after {timeout}s")

    def apply_deploy_rbac(self, *paths: Path) -> str:
        """Apply deploy/'s RBAC files (one ServiceAccount among them) with this lab's
        namespace standing for both kube-system and the exporter's namespace; returns a
        token of the ServiceAccount once the authorizer grants what each Role says."""
        docs = [d for path in paths for d in yaml.safe_load_all(path.read_text()) if d]
        account = ""
        waits: list[tuple[str, dict[str, Any]]] = []
        for doc in docs:
            meta, kind = doc["metadata"], doc["kind"]
            if meta.get("namespace") in ("kube-system", "coredns-health-exporter"):
                meta["namespace"] = self.namespace
            else:  # default or cluster-wide: shared by every test, so a name of our own
                meta["name"] = f"{meta['name']}-{self.namespace}"
                if kind.endswith("RoleBinding"):
                    doc["roleRef"]["name"] = meta["name"]
                self._cleanup.append((kind, meta.get("namespace", ""), meta["name"]))
            for subject in doc.get("subjects", []):
                subject["namespace"] = self.namespace
            ns = meta.get("namespace", "")
            if kind in ("Role", "ClusterRole"):
                waits.append((ns, doc["rules"][0]))
            create = {
                "ServiceAccount": lambda d, n: self.core.create_namespaced_service_account(
                    n, d, _preload_content=False),
                "Role": lambda d, n: self.rbac.create_namespaced_role(
                    n, d, _preload_content=False),
                "RoleBinding": lambda d, n: self.rbac.create_namespaced_role_binding(
                    n, d, _preload_content=False),
                "ClusterRole": lambda d, n: self.rbac.create_cluster_role(
                    d, _preload_content=False),
                "ClusterRoleBinding": lambda d, n: self.rbac.create_cluster_role_binding(
                    d, _preload_content=False),
            }.get(kind)
            if create is None:
                raise ValueError(f"unexpected kind {kind} in {', '.join(map(str, paths))}")
            create(doc, ns)
            if kind == "ServiceAccount":
                account = meta["name"]
        user = f"system:serviceaccount:{self.namespace}:{account}"
        for ns, rule in waits:
            resource, _, subresource = rule["resources"][0].partition("/")
            self.await_allowed(user, rule["verbs"][0], resource, group=rule["apiGroups"][0],
                               subresource=subresource, namespace=ns,
                               name=(rule.get("resourceNames") or [""])[0])
        request = self.core.create_namespaced_service_account_token(
            account, self.namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}}
        )
        token: str = request.status.token
        return token

    def close(self) -> None:
        if self.outside_ns is not None:
            self.outside_ns.delete()
        for kind, ns, name in self._cleanup:
            with contextlib.suppress(kubernetes.client.ApiException):
                if kind == "ClusterRole":
                    self.rbac.delete_cluster_role(name, _preload_content=False)
                elif kind == "ClusterRoleBinding":
                    self.rbac.delete_cluster_role_binding(name, _preload_content=False)
                else:
                    delete = {"Role": self.rbac.delete_namespaced_role,
                              "RoleBinding": self.rbac.delete_namespaced_role_binding}[kind]
                    delete(name, ns, _preload_content=False)
        for pod in [*self.pods.values(), *self._others]:
            pod.stop()
        for relay in self._relays:
            relay.stop()
        self.node.delete()
        for namespace in self._namespaces:
            with contextlib.suppress(kubernetes.client.ApiException):
                self.core.delete_namespace(namespace, _preload_content=False)
        self.api.close()
        if self._raw is not None:
            self._raw.close()
