"""Network namespaces the tests create, use and delete.

A namespace here has only a loopback interface and no route anywhere else, so whatever
runs inside can reach nothing but itself: a wrong address fails locally. iptables rules
inside it (dropping UDP/53, say) touch nothing outside.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence

from .relay import Relay

_counter = itertools.count()


def _run(args: Sequence[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


class NetNS:
    def __init__(self, purpose: str) -> None:
        self.name = f"chx-{os.getpid()}-{next(_counter)}-{purpose}"[:60]
        _run(["ip", "netns", "add", self.name])
        self.exec(["ip", "link", "set", "lo", "up"])
        self._relays: list[Relay] = []

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def enter(self, args: Sequence[str]) -> list[str]:
        """`args` wrapped to run inside this namespace with nsenter, which changes the
        network namespace only (`ip netns exec` also remounts /sys, which hides the cgroup
        mounts a kubelet and a container runtime need)."""
        return ["nsenter", f"--net={self.path}", "--", *args]

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` wrapped to run inside this namespace (ip netns exec execs, keeping the PID)."""
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, args: Sequence[str]) -> None:
        _run(self.command(args))

    def run(self, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def drop(self, protocol: str, port: int) -> None:
        """Silently drop inbound `protocol` packets to `port`, as a broken pod network does."""
        self.exec(["iptables", "-A", "INPUT", "-p", protocol, "--dport", str(port), "-j", "DROP"])

    def expose(self, address: str) -> str:
        """An address on the machine's loopback relayed to `address` in this namespace
        (the tests' way in; the relay is stopped with the namespace)."""
        relay = Relay.start("-", "127.0.0.1:0", self.path, address)
        self._relays.append(relay)
        return relay.address

    def reach_out(self, listen: str, connect: str) -> None:
        """Listen at `listen` inside this namespace and connect to `connect` on the
        machine's loopback (the API server, for an exporter outside the cluster)."""
        self._relays.append(Relay.start(self.path, listen, "-", connect))

    def delete(self) -> None:
        for relay in self._relays:
            relay.stop()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)
