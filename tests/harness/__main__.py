"""Start the test cluster by hand: Kubernetes v1.37.2 with two real nodes, CoreDNS as kube-dns.

    scripts/test-cluster

Progress goes to stderr; once the cluster is up, three lines go to stdout:

    export KUBECONFIG=PATH      the admin's kubeconfig (the API relayed to loopback)
    IMAGE=NAME                  the exporter image the node has (built from deploy/Dockerfile),
                                also under the name deploy/ gives it: `kubectl apply -k
                                deploy/` works as it is
    NODE_NETNS=NAME             the network namespace where Service and pod IPs route

It stays up until SIGINT or SIGTERM, then stops everything it started and leaves no
mount, namespace, cgroup or process behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .components import coredns_binary
from .node import EXPORTER_IMAGE
from .realcluster import RealCluster, missing


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> None:
    print(f"test-cluster: {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/test-cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    binary = coredns_binary()
    problem = missing() or (None if binary else "CoreDNS not built")
    if problem or binary is None:
        _say(f"cannot start: {problem} (run scripts/install-test-tools)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="coredns-health-exporter-cluster-"))
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    real = RealCluster(workdir, binary)
    began = time.monotonic()
    try:
        _say(f"starting in {workdir} (logs there)")
        real.start()
        took = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in real.timings.items())
        _say(f"up in {time.monotonic() - began:.1f}s ({took}); Ctrl-C stops it")
        assert real.cluster.netns is not None
        print(f"export KUBECONFIG={real.cluster.admin_kubeconfig}")
        print(f"IMAGE={EXPORTER_IMAGE}")
        print(f"NODE_NETNS={real.cluster.netns.name}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        # A second Ctrl-C must not cut the tear-down short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopping = time.monotonic()
        real.stop()
        _say(f"stopped in {time.monotonic() - stopping:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
