"""CoreDNS as the cluster DNS, the way kubeadm installs it, and its upstream resolver.

A Deployment `coredns` in kube-system behind the Service `kube-dns` (ClusterIP
CLUSTER_DNS), with kubeadm's RBAC, a PodDisruptionBudget, and a kubeadm-style Corefile
(errors, health with lameduck, ready, kubernetes, prometheus, forward to the node's
resolv.conf, cache, loop, reload, loadbalance): answers for `*.svc.cluster.local` come from
the real API. The upstream the pods forward to is another real CoreDNS, a process in the
cluster namespace at the other end of the node's veth, answering one name (hosts plugin)
and NXDOMAIN for every other: nothing is ever forwarded out of the namespace.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .cluster import CLUSTER_DNS, KUBE_BIN, Cluster, Process
from .node import COREDNS_IMAGE

UPSTREAM_NAME = "upstream.example.test"
UPSTREAM_ANSWER = "10.77.0.100"
REPLICAS = 3

COREFILE = """\
.:53 {
    errors
    health {
        lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    prometheus :9153
    forward . /etc/resolv.conf {
        max_concurrent 1000
    }
    cache 30
    loop
    reload
    loadbalance
}
"""

MANIFEST = f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: coredns, namespace: kube-system}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: "system:coredns"}}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: "system:coredns"}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}}
subjects: [{{kind: ServiceAccount, name: coredns, namespace: kube-system}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: coredns, namespace: kube-system}}
data:
  Corefile: |
{"".join(f"    {line}" + chr(10) for line in COREFILE.splitlines())}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: kube-system
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: {REPLICAS}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 1}}
  selector:
    matchLabels: {{k8s-app: kube-dns}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      priorityClassName: system-cluster-critical
      serviceAccountName: coredns
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchExpressions:
                    - {{key: k8s-app, operator: In, values: [kube-dns]}}
      dnsPolicy: Default
      containers:
        - name: coredns
          image: {COREDNS_IMAGE}
          imagePullPolicy: Never
          args: [-conf, /etc/coredns/Corefile]
          ports:
            - {{containerPort: 53, name: dns, protocol: UDP}}
            - {{containerPort: 53, name: dns-tcp, protocol: TCP}}
            - {{containerPort: 9153, name: metrics, protocol: TCP}}
          livenessProbe:
            httpGet: {{path: /health, port: 8080}}
            initialDelaySeconds: 60
            timeoutSeconds: 5
            failureThreshold: 5
          readinessProbe:
            httpGet: {{path: /ready, port: 8181}}
            periodSeconds: 2
          resources:
            requests: {{cpu: 20m, memory: 32Mi}}
            limits: {{memory: 170Mi}}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {{add: [NET_BIND_SERVICE], drop: [ALL]}}
            readOnlyRootFilesystem: true
          volumeMounts:
            - {{name: config-volume, mountPath: /etc/coredns, readOnly: true}}
      volumes:
        - name: config-volume
          configMap:
            name: coredns
            items: [{{key: Corefile, path: Corefile}}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  clusterIP: {CLUSTER_DNS}
  selector: {{k8s-app: kube-dns}}
  ports:
    - {{name: dns, port: 53, protocol: UDP}}
    - {{name: dns-tcp, port: 53, protocol: TCP}}
    - {{name: metrics, port: 9153, protocol: TCP}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{name: coredns, namespace: kube-system}}
spec:
  minAvailable: {REPLICAS - 1}
  selector:
    matchLabels: {{k8s-app: kube-dns}}
"""


def kubectl(cluster: Cluster, *args: str, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The pinned kubectl, as admin, against the cluster; raises with its output on failure."""
    done = subprocess.run(
        [str(KUBE_BIN / "kubectl"), "--kubeconfig", str(cluster.admin_kubeconfig), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
    return done


def start_upstream(cluster: Cluster, coredns_bin: Path) -> Process:
    """The resolver CoreDNS pods forward to: a CoreDNS process at UPSTREAM_IP:53."""
    config = cluster.workdir / "upstream.Corefile"
    config.write_text(f""".:53 {{
    bind {cluster.upstream_ip}
    hosts {{
        {UPSTREAM_ANSWER} {UPSTREAM_NAME}
    }}
}}
""")
    return cluster.start_process("upstream-dns", [str(coredns_bin), "-conf", str(config)])


def install(cluster: Cluster, timeout: float = 180) -> None:
    """Apply CoreDNS and wait until its rollout is complete (every replica Ready)."""
    kubectl(cluster, "apply", "-f", "-", stdin=MANIFEST)
    kubectl(cluster, "-n", "kube-system", "rollout", "status", "deployment/coredns",
            f"--timeout={int(timeout)}s", timeout=timeout + 10)
