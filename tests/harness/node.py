"""A real Kubernetes node in the cluster namespace: containerd, runc, CNI, kubelet, kube-proxy.

The container runtime is Debian's containerd (1.6) and runc, started with its own root,
state directory and socket under the node's work directory; pods get their network from
the CNI bridge and host-local plugins (Debian's containernetworking-plugins) on a bridge
`cni0` inside the cluster namespace; kube-proxy (iptables mode) routes Service IPs there.
Images are imported from archives made by scripts/build-test-images: no image is pulled.

Settings that differ from a production node, each for a reason of this machine (see
../shared/REAL-CLUSTER.md and docs/testing.md): cgroup v1 is allowed (`failCgroupV1:
false`; this kernel's cgroups are hybrid), node allocatable is not enforced and hard
eviction is off (no CAP_SYS_RESOURCE, and a test machine's disk must not evict test pods),
containerd restricts oom_score_adj (root here cannot raise it), image garbage collection
never deletes the imported images (they cannot be pulled again).

Stopping a node deletes its pods through the runtime, stops every process it started by
PID (shims by the PIDs containerd recorded), unmounts what they mounted under its work
directory and removes its cgroups, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .cluster import (
    CLUSTER_DNS,
    KUBE_BIN,
    NODE_IP,
    POD_CIDR,
    Cluster,
    Process,
    run_all,
)
from .components import CACHE
from .netns import NetNS

IMAGES = CACHE / "images"
PAUSE_IMAGE = "localhost/coredns-health-exporter-test/pause:3.10"
COREDNS_IMAGE = "localhost/coredns-health-exporter-test/coredns:1.13.1"
EXPORTER_IMAGE = "localhost/coredns-health-exporter:test"
# archive file -> the image it holds
MONITORING_IMAGES = {  # made from scripts/install-monitoring-tools' binaries
    "prometheus.tar": "localhost/coredns-health-exporter-test/prometheus:v3.16.0",
    "alertmanager.tar": "localhost/coredns-health-exporter-test/alertmanager:v0.35.0",
    "prometheus-operator.tar": "localhost/coredns-health-exporter-test/prometheus-operator:v0.85.0",
    "prometheus-config-reloader.tar":
        "localhost/coredns-health-exporter-test/prometheus-config-reloader:v0.85.0",
}
ARCHIVES = {"pause.tar": PAUSE_IMAGE, "coredns.tar": COREDNS_IMAGE,
            "exporter.tar": EXPORTER_IMAGE, **MONITORING_IMAGES}
CNI_BIN = Path("/usr/lib/cni")
NODE_POD_CIDR = "10.244.0.0/24"


def node_missing() -> str | None:
    """None when a node can run here, else what is missing and how to get it."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return ("this machine has cgroup v2 only; the test node is configured for the "
                "hybrid cgroup v1 hierarchies of these machines (docs/testing.md)")
    for tool in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (scripts/install-test-tools installs it)"
    for plugin in ("bridge", "host-local", "loopback", "portmap"):
        if not (CNI_BIN / plugin).is_file():
            return f"CNI plugin {plugin} missing (containernetworking-plugins)"
    for name in ("kubelet", "kube-proxy"):
        if not (KUBE_BIN / name).is_file():
            return f"{KUBE_BIN / name} not built: run scripts/install-kube-test-cluster"
    for archive in ARCHIVES:
        if not (IMAGES / archive).is_file():
            return f"image {IMAGES / archive} not built: run scripts/build-test-images"
    return None


@dataclass
class Node:
    """One node of the cluster: its name, address, pod range, network namespace (the
    cluster's for the first node; one of its own, routed to it, for another: see
    `elsewhere`) and processes."""

    cluster: Cluster
    name: str
    workdir: Path
    ip: str = NODE_IP
    pod_cidr: str = NODE_POD_CIDR
    own_netns: NetNS | None = None
    containerd: Process | None = None
    kubelet: Process | None = None
    kube_proxy: Process | None = None

    @classmethod
    def elsewhere(cls, cluster: Cluster, name: str, workdir: Path, index: int) -> Node:
        """Node number `index` (2, 3, ...) in a network namespace of its own, linked to the
        cluster namespace by a veth pair (10.77.K.1 there, 10.77.K.2 here, K = index - 1),
        with its pods on 10.244.K.0/24 routed both ways; its default route leads into the
        cluster namespace, which has none: no packet leaves."""
        k = index - 1
        ns = NetNS(f"node{index}")
        outer = cluster.netns
        assert outer is not None
        veth = f"chxn{index}"
        try:
            outer.exec(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                        "netns", ns.name])
            outer.exec(["ip", "addr", "add", f"10.77.{k}.1/24", "dev", veth])
            outer.exec(["ip", "link", "set", veth, "up"])
            outer.exec(["ip", "route", "add", f"10.244.{k}.0/24", "via", f"10.77.{k}.2"])
            ns.exec(["ip", "addr", "add", f"10.77.{k}.2/24", "dev", "eth0"])
            ns.exec(["ip", "link", "set", "eth0", "up"])
            ns.exec(["ip", "route", "add", "default", "via", f"10.77.{k}.1"])
        except Exception:
            ns.delete()
            raise
        return cls(cluster, name, workdir, ip=f"10.77.{k}.2", pod_cidr=f"10.244.{k}.0/24",
                   own_netns=ns)

    @property
    def netns(self) -> NetNS:
        netns = self.own_netns or self.cluster.netns
        assert netns is not None
        return netns

    def _start(self, name: str, args: list[str]) -> Process:
        return Process(name, self.netns.enter(args),
                       self.cluster.workdir / f"{name}-{self.name}.log")

    @property
    def cgroup_root(self) -> str:
        """The kubelet's cgroupRoot: this node's own, so that two test clusters on one
        machine (a session and scripts/test-cluster) never share one."""
        return f"/coredns-health-exporter-test-{os.getpid()}-{self.name}"

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`ctr` against this node's containerd, in the namespace the kubelet uses."""
        return subprocess.run(["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Routing between pods, nodes and the control plane.
        for netns in (self.netns, self.cluster.netns):
            assert netns is not None
            netns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._make_cgroup_root()
        self._start_containerd(timeout)
        self._import_images()
        self.kubelet = self._start("kubelet", [
            str(KUBE_BIN / "kubelet"),
            "--config", str(self._kubelet_config()),
            "--kubeconfig", str(self.cluster.node_kubeconfig(self.name)),
            "--hostname-override", self.name, "--node-ip", self.ip,
            "--root-dir", str(self.workdir / "kubelet"),
            "--cert-dir", str(self.workdir / "kubelet-pki"),
            "-v", "2",
        ])
        self.kube_proxy = self._start("kube-proxy", [
            str(KUBE_BIN / "kube-proxy"), "--config", str(self._proxy_config()),
        ])
        self._await_ready(timeout)

    def _make_cgroup_root(self) -> None:
        """The kubelet's cgroupRoot, in every v1 hierarchy (it must exist beforehand);
        a cpuset child starts with no CPUs or memory nodes, so it gets its parent's."""
        for controller in Path("/sys/fs/cgroup").iterdir():
            if controller.name == "unified" or not controller.is_dir():
                continue
            top = controller / self.cgroup_root.lstrip("/")
            top.mkdir(exist_ok=True)
            if controller.name == "cpuset":
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (top / name).write_text((controller / name).read_text())

    def _start_containerd(self, timeout: float) -> None:
        base = self.workdir / "containerd"
        cni = self.workdir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        (cni / "10-chx.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "chx", "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.pod_cidr}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.workdir / "cni-ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=2))
        config = base / "config.toml"
        base.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base / 'opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{base / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
""")
        self.containerd = self._start("containerd", ["containerd", "--config", str(config)])
        deadline = time.monotonic() + timeout
        while self.ctr("version", timeout=10).returncode != 0:
            if not self.containerd.alive():
                raise RuntimeError(f"containerd exited:\n{self.containerd.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd not up in {timeout}s:\n{self.containerd.tail()}")
            time.sleep(0.2)  # polling a socket that is being created: no event to wait on

    def _import_images(self) -> None:
        for archive, image in ARCHIVES.items():
            done = self.ctr("images", "import", "--all-platforms", str(IMAGES / archive),
                            timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"importing {archive} failed: {done.stderr.strip()}")
            if image not in self.ctr("images", "ls", "-q").stdout.split():
                raise RuntimeError(f"{archive} did not hold {image}")
        # The sandbox image is never garbage-collected.
        self.ctr("images", "label", PAUSE_IMAGE, "io.cri-containerd.pinned=pinned")

    def tag(self, source: str, target: str) -> None:
        """Give an imported image a second name (the one a manifest asks for)."""
        done = self.ctr("images", "tag", "--force", source, target)
        if done.returncode != 0:
            raise RuntimeError(f"ctr images tag {source} {target}: {done.stderr.strip()}")

    def pod_pid(self, namespace: str, pod: str) -> int:
        """The PID of the pod's sandbox (its pause process), whose /proc/PID/ns/net is the
        pod's network namespace."""
        labels = {"io.kubernetes.pod.namespace": namespace, "io.kubernetes.pod.name": pod,
                  "io.cri-containerd.kind": "sandbox"}
        query = ",".join(f'labels."{k}"=={v}' for k, v in labels.items())
        sandboxes = self.ctr("containers", "ls", "-q", query).stdout.split()
        tasks = dict(line.split()[:2] for line in self.ctr("tasks", "ls").stdout.splitlines()[1:])
        running = [int(tasks[s]) for s in sandboxes if s in tasks]
        if len(running) != 1:
            raise RuntimeError(f"pod {namespace}/{pod}: {len(running)} running sandboxes")
        return running[0]

    def in_pod_network(self, namespace: str, pod: str, args: list[str]) -> None:
        """Run `args` (iptables, say) in the pod's own network namespace."""
        pid = self.pod_pid(namespace, pod)
        subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", *args], check=True,
                       capture_output=True, text=True, timeout=30)

    @contextlib.contextmanager
    def node_local_dns(self, coredns_bin: Path, address: str, upstreams: list[str],
                       timeout: float = 20) -> Iterator[Process]:
        """A NodeLocal DNSCache on this node, as node-local-dns runs one: a real CoreDNS in
        the node's own network namespace on a link-local `address` (on `lo` here: this
        kernel has no dummy interfaces), caching and forwarding to `upstreams`; pods on
        the node reach it by the node's local delivery. Removed afterwards."""
        config = self.workdir / "node-local-dns.Corefile"
        config.write_text(f""".:53 {{
    bind {address}
    cache 30
    forward . {" ".join(upstreams)}
}}
""")
        self.netns.exec(["ip", "addr", "add", f"{address}/32", "dev", "lo"])
        process: Process | None = None
        try:
            process = self._start("node-local-dns", [str(coredns_bin), "-conf", str(config)])
            deadline = time.monotonic() + timeout
            while "CoreDNS-" not in process.tail():  # its banner: listening
                if not process.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"node-local-dns on {self.name}:\n{process.tail()}")
                time.sleep(0.05)  # polling its log file for the banner
            yield process
        finally:
            if process is not None:
                process.stop()
            self.netns.exec(["ip", "addr", "del", f"{address}/32", "dev", "lo"])

    def _kubelet_config(self) -> Path:
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {self.cluster.upstream_ip}\n")
        path = self.workdir / "kubelet.yaml"
        logs = (self.workdir / "pod-logs").resolve()
        logs.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.ip, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.cluster.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [CLUSTER_DNS], "clusterDomain": "cluster.local",
            "resolvConf": str(resolv),
            "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False, "failSwapOn": False,
            "enforceNodeAllocatable": [], "evictionHard": {},
            "localStorageCapacityIsolation": False,
            "makeIPTablesUtilChains": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "registerNode": True,
            "podCIDR": self.pod_cidr,
            "shutdownGracePeriod": "0s",
            # Its own, not the host's /var/log/pods: the nodes share one filesystem, and
            # a kubelet's container GC removes every pod log directory of a pod it does
            # not know (ShouldPodContentBeRemoved), so worker-2's deleted worker-1's
            # logs, of running containers too, once a minute.
            "podLogsDir": str(logs),
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def _proxy_config(self) -> Path:
        path = self.workdir / "kube-proxy.yaml"
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {
                "kubeconfig": str(self.cluster.component_kubeconfig("kube-proxy"))},
            "mode": "iptables", "hostnameOverride": self.name,
            "clusterCIDR": POD_CIDR,
            "bindAddress": self.ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def _await_ready(self, timeout: float) -> None:
        """Return once the Node object says Ready (the kubelet registered, the runtime and
        the network are up)."""
        assert self.kubelet is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in (self.containerd, self.kubelet, self.kube_proxy):
                if process is not None and not process.alive():
                    raise RuntimeError(f"{process.name} exited:\n{process.tail()}")
            node = self.cluster.api("GET", f"/api/v1/nodes/{self.name}", missing_ok=True)
            conditions = (node or {}).get("status", {}).get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return
            time.sleep(0.3)  # polling the node's status: its first write is the event
        raise RuntimeError(f"node {self.name} not Ready after {timeout}s:\n"
                           f"{self.kubelet.tail()}")

    def stop(self) -> None:
        """Remove every pod's task through the runtime, stop the processes, leave nothing;
        every step runs even when an earlier one failed."""
        pod_netns: list[Path] = []

        def remove_pods() -> None:
            pod_netns.extend(self._pod_network_namespaces())
            if self.containerd is not None and self.containerd.alive():
                self._remove_pods()

        steps = [p.stop for p in (self.kube_proxy, self.kubelet) if p is not None]
        steps.append(remove_pods)
        if self.containerd is not None:
            steps.append(self.containerd.stop)
        steps += [self._kill_shims, self._unmount, self._remove_cgroups]

        def remove_pod_netns() -> None:
            """CNI's bind mounts of the sandboxes' network namespaces (ctr bypasses CRI
            and CNI, which would have removed them)."""
            for path in pod_netns:
                subprocess.run(["ip", "netns", "delete", path.name], capture_output=True,
                               check=False)

        steps.append(remove_pod_netns)
        if self.own_netns is not None:
            steps.append(self.own_netns.delete)
        run_all(steps)

    def _task_pids(self) -> list[int]:
        """The PIDs containerd recorded for its shims and their tasks."""
        state = self.workdir / "containerd" / "state"
        pids = []
        for pid_file in state.glob("io.containerd.runtime.v2.task/*/*/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(pid_file.read_text().strip()))
        return pids

    def _pod_network_namespaces(self) -> list[Path]:
        """The /run/netns entries CNI made for this node's sandboxes: those whose
        namespace is one of our tasks' (matched by inode, so another runtime's are never
        touched)."""
        ours = set()
        for pid in self._task_pids():
            with contextlib.suppress(OSError):
                ours.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
        found = []
        for entry in Path("/run/netns").glob("cni-*"):
            with contextlib.suppress(OSError):
                if entry.stat().st_ino in ours:
                    found.append(entry)
        return found

    def _remove_pods(self) -> None:
        """Kill and remove every task and container, so the shims exit (ctr bypasses CRI,
        so CNI does not remove the sandboxes' network namespaces: stop() does)."""
        tasks = self.ctr("tasks", "ls", "-q").stdout.split()
        for task in tasks:
            self.ctr("tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            self.ctr("tasks", "delete", "--force", task)
        for container in self.ctr("containers", "ls", "-q").stdout.split():
            self.ctr("containers", "delete", container)

    def _ours(self, pid: int) -> bool:
        """Whether PID is still a process of this node's (a PID read from a file may have
        been reused): a shim of this node's containerd, or a process in its cgroups."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return False
        shim = cmdline[0].endswith(b"containerd-shim-runc-v2") and \
            str(self.socket).encode() in cmdline
        return shim or self.cgroup_root in cgroups

    def _kill_shims(self) -> None:
        """The shims outlive containerd by design; end those it recorded, by PID, and any
        process still in this node's cgroups."""
        pids = set(self._task_pids())
        pids.update(self._cgroup_pids())
        for pid in pids:
            if self._ours(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)

    def _cgroup_pids(self) -> list[int]:
        top = Path("/sys/fs/cgroup/pids") / self.cgroup_root.lstrip("/")
        pids = []
        for procs in top.rglob("cgroup.procs") if top.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                pids += [int(line) for line in procs.read_text().split()]
        return pids

    def _unmount(self) -> None:
        """Unmount everything mounted under the work directory, deepest first."""
        root = str(self.workdir.resolve())
        for _ in range(3):
            with open("/proc/self/mountinfo") as f:
                points = [line.split()[4] for line in f]
            ours = sorted({p for p in points if p == root or p.startswith(root + "/")},
                          key=len, reverse=True)
            if not ours:
                return
            for point in ours:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        """Remove the kubelet's cgroups; one that cannot be removed still holds a
        process, and is said."""
        left = []
        for controller in Path("/sys/fs/cgroup").iterdir():
            top = controller / self.cgroup_root.lstrip("/")
            if not top.is_dir():
                continue
            for directory in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if directory.is_dir():
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            try:
                top.rmdir()
            except OSError as exc:
                left.append(f"{top}: {exc.strerror}")
        if left:
            raise RuntimeError("cgroups left behind: " + "; ".join(left))
