"""The whole test cluster as a user has one: control plane, a real node, CoreDNS as kube-dns.

`RealCluster.start()` brings up, in order: the control plane (harness/cluster.py), the
upstream resolver, the nodes worker-1 (in the cluster namespace) and worker-2 (in a
namespace of its own, routed to it; harness/node.py), and CoreDNS (harness/kubedns.py),
and returns once every CoreDNS replica is Ready behind kube-dns. `stop()` undoes all of
it. The test session starts one (the `real_cluster` fixture); `scripts/test-cluster`
starts one by hand.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from . import kubedns
from .cluster import KUBE_BIN, NODE_NAMES, Cluster, Process, binaries_missing, run_all
from .node import EXPORTER_IMAGE, Node, node_missing

REPO = Path(__file__).resolve().parents[2]


def deploy_deployment() -> dict[str, Any]:
    """The exporter's Deployment as `kubectl apply -k deploy/` renders it."""
    text = subprocess.run([str(KUBE_BIN / "kubectl"), "kustomize", str(REPO / "deploy")],
                          capture_output=True, text=True, check=True, timeout=60).stdout
    for doc in yaml.safe_load_all(text):
        if doc and doc["kind"] == "Deployment":
            deployment: dict[str, Any] = doc
            return deployment
    raise RuntimeError("deploy/ renders no Deployment")


def deploy_image() -> str:
    """The exporter image `kubectl apply -k deploy/` asks for."""
    image: str = deploy_deployment()["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def missing() -> str | None:
    """None when a real cluster can be started here, else why not."""
    return binaries_missing() or node_missing()


class RealCluster:
    def __init__(self, workdir: Path, coredns_bin: Path) -> None:
        self.workdir = workdir
        self.coredns_bin = coredns_bin
        self.cluster = Cluster(workdir / "control-plane")
        self.node = Node(self.cluster, NODE_NAMES[0], workdir / NODE_NAMES[0])
        self.nodes = [self.node]  # the second joins in start(): it needs the namespace
        self.upstream: Process | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        steps = (("control plane", self.cluster.start),
                 ("upstream resolver", self._start_upstream),
                 ("node", self.node.start),
                 ("second node", self._start_second_node),
                 ("CoreDNS", lambda: kubedns.install(self.cluster)),
                 # `kubectl apply -k deploy/` then runs as it is: the node has the image
                 # under the name deploy/ asks for.
                 ("image name", self._tag_deploy_image))
        for name, step in steps:
            began = time.monotonic()
            step()
            self.timings[name] = time.monotonic() - began

    def _start_second_node(self) -> None:
        name = NODE_NAMES[1]
        node = Node.elsewhere(self.cluster, name, self.workdir / name, index=2)
        self.nodes.append(node)
        node.start()

    def _tag_deploy_image(self) -> None:
        image = deploy_image()
        for node in self.nodes:
            node.tag(EXPORTER_IMAGE, image)

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def _start_upstream(self) -> None:
        self.upstream = kubedns.start_upstream(self.cluster, self.coredns_bin)

    def stop(self) -> None:
        """Stop everything, each part even when an earlier one failed."""
        steps = [n.stop for n in reversed(self.nodes)]
        if self.upstream is not None:
            steps.append(self.upstream.stop)
        run_all([*steps, self.cluster.stop])

    # -- reading the cluster ------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        return kubedns.kubectl(self.cluster, *args, stdin=stdin, timeout=timeout).stdout

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        answer = self.cluster.api(
            "GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={selector}")
        assert answer is not None
        items: list[dict[str, Any]] = answer["items"]
        return items

    def coredns_pods(self) -> list[dict[str, Any]]:
        return self.pods("kube-system", "k8s-app%3Dkube-dns")

    def in_pod_network(self, pod: str, args: list[str], namespace: str = "kube-system") -> None:
        """Run `args` (iptables, say) in the pod's own network namespace, on its node."""
        found = self.cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        assert found is not None
        self.node_named(found["spec"]["nodeName"]).in_pod_network(namespace, pod, args)
