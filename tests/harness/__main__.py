"""Start the test cluster and a few CoreDNS pods by hand, to try the exporter against them.

    scripts/test-cluster [--pods N]

Prints how to run the exporter inside the node namespace and where to read its metrics;
Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from .cluster import ADMIN_TOKEN, Cluster, binaries_missing
from .components import can_use_netns, coredns_binary
from .lab import Lab

EXPORTER_PORT = 9953


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/test-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=3, help="CoreDNS pods to start (3)")
    args = parser.parse_args(argv)
    binary = coredns_binary()
    problems = [p for p in (binaries_missing(), can_use_netns(),
                            None if binary else "CoreDNS not built") if p]
    if problems or binary is None:
        print("cannot start: " + "; ".join(problems) + " (run scripts/install-test-tools)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="coredns-health-exporter-cluster-"))
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = Cluster(workdir / "cluster")
    lab: Lab | None = None
    try:
        cluster.start()
        lab = Lab(cluster, binary, workdir, namespace="kube-system")
        for i in range(args.pods):
            lab.add_pod(node=f"node-{i % 2}")
        lab.create_service()
        kubeconfig = lab.kubeconfig(ADMIN_TOKEN, "exporter")
        first = next(iter(lab.pods.values()))
        metrics = lab.node.expose(f"127.0.0.1:{EXPORTER_PORT}")
        print(f"""test cluster up (logs and kubeconfigs in {workdir})
  API server:      {cluster.server}   (export KUBECONFIG={cluster.admin_kubeconfig})
  CoreDNS pods:    {", ".join(f"{p.name}={p.ip}" for p in lab.pods.values())}
  Service:         kube-system/kube-dns {", ".join(lab.cluster_ips)}

Run the exporter in the node namespace (it has no route out; the API is relayed in):
  ip netns exec {lab.node.name} .venv/bin/coredns-health-exporter serve \\
      --kubeconfig {kubeconfig} --listen 127.0.0.1:{EXPORTER_PORT}
and read its metrics from here:
  curl -s http://{metrics}/metrics | grep dnsprobe_success
Break a pod's UDP:
  ip netns exec {first.netns.name} iptables -A INPUT -p udp --dport 53 -j DROP

Ctrl-C stops everything.""", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if lab is not None:
            lab.close()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
