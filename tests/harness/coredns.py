"""Real CoreDNS processes for the tests, each on its own loopback address.

`Behaviour` names what a server does for the cluster zone (answer correctly, SERVFAIL,
answer wrongly, truncate, delay...), built from stock CoreDNS plugins: `file` for a real
authoritative zone, `template` for forced rcodes, `erratic` for drops, delays and
truncation. Every process is stopped by its own PID.
"""

from __future__ import annotations

import enum
import itertools
import os
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .components import stop_process
from .netns import NetNS

CLUSTER_DOMAIN = "cluster.local"
KUBERNETES_NAME = f"kubernetes.default.svc.{CLUSTER_DOMAIN}"
KUBERNETES_IP = "10.96.0.1"
WRONG_IP = "10.96.0.99"
# erratic answers every A query with this (RFC 5737) address.
ERRATIC_IP = "192.0.2.53"
DNS_PORT = 1053

# 127.53.0.0/16: every server gets an address of its own, so tests never share a socket.
_addresses = (f"127.53.{i // 250}.{i % 250 + 2}" for i in itertools.count(os.getpid() % 200 * 50))


class Behaviour(enum.StrEnum):
    HEALTHY = "healthy"
    WRONG_ANSWER = "wrong_answer"
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    TRUNCATE = "truncate"
    SLOW = "slow"
    REFUSED = "refused"
    # A general resolver, as on a laptop: it knows the root zone's servers (`. NS`) and no
    # cluster name.
    RESOLVER = "resolver"


def _zone(kubernetes_ip: str | None) -> str:
    lines = [
        f"$ORIGIN {CLUSTER_DOMAIN}.",
        f"@ 30 IN SOA ns.dns.{CLUSTER_DOMAIN}. hostmaster.{CLUSTER_DOMAIN}. 1 7200 1800 86400 30",
        f"@ 30 IN NS ns.dns.{CLUSTER_DOMAIN}.",
        "ns.dns 30 IN A 10.96.0.10",
    ]
    if kubernetes_ip:
        lines.append(f"kubernetes.default.svc 5 IN A {kubernetes_ip}")
    return "\n".join(lines) + "\n"


def _plugins(behaviour: Behaviour, zone_file: Path, delay: str) -> tuple[str, str]:
    """(zone, plugin block) for a behaviour."""
    if behaviour in (Behaviour.SERVFAIL, Behaviour.REFUSED):
        rcode = behaviour.value.upper()
        return CLUSTER_DOMAIN, f"template IN ANY {CLUSTER_DOMAIN} {{\n    rcode {rcode}\n  }}"
    if behaviour is Behaviour.TRUNCATE:
        return ".", "erratic {\n    truncate 1\n    drop 0\n  }"
    if behaviour is Behaviour.RESOLVER:
        return ".", ('template IN NS . {\n    answer ". 518400 IN NS a.root-servers.net."\n  }'
                     '\n  template IN A . {\n    rcode NXDOMAIN\n  }')
    if behaviour is Behaviour.SLOW:
        return ".", f"erratic {{\n    delay 1 {delay}\n    drop 0\n  }}"
    ip = {Behaviour.HEALTHY: KUBERNETES_IP, Behaviour.WRONG_ANSWER: WRONG_IP}.get(behaviour)
    zone_file.write_text(_zone(ip), encoding="utf-8")
    return CLUSTER_DOMAIN, f"file {zone_file}"


@dataclass
class CoreDNS:
    """One running CoreDNS; `host`/`port` is where it answers."""

    host: str
    port: int
    process: subprocess.Popen[str]
    output: list[str]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, timeout=10)


def start(
    binary: Path,
    workdir: Path,
    behaviour: Behaviour = Behaviour.HEALTHY,
    *,
    netns: NetNS | None = None,
    host: str | None = None,
    port: int = DNS_PORT,
    delay: str = "1500ms",
    extra_hosts: Sequence[str] = (),
    startup_timeout: float = 20.0,
    lameduck: str = "",
) -> CoreDNS:
    """Start CoreDNS and return once it has printed its banner (it is then listening).

    `lameduck` (a duration) adds the health plugin, on port 8080 of `host`, with that
    lameduck: on SIGTERM the server goes on answering for that long, then exits, as a
    CoreDNS pod does when it is deleted."""
    host = host or ("127.0.0.1" if netns else next(_addresses))
    workdir.mkdir(parents=True, exist_ok=True)
    zone, plugins = _plugins(behaviour, workdir / f"db.{host}.{port}", delay)
    if lameduck:
        plugins += f"\n  health {host}:8080 {{\n    lameduck {lameduck}\n  }}"
    corefile = workdir / f"Corefile.{host}.{port}"
    corefile.write_text(
        f"{zone}:{port} {{\n  bind {' '.join([host, *extra_hosts])}\n  {plugins}\n}}\n",
        encoding="utf-8",
    )
    args = [str(binary), "-conf", str(corefile)]
    if netns is not None:
        args = netns.command(args)
    process = subprocess.Popen(
        args,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    started = threading.Event()
    settled = threading.Event()  # the banner was printed, or the output ended

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line.rstrip("\n"))
            if line.startswith("CoreDNS-"):
                started.set()
                settled.set()
        settled.set()

    threading.Thread(target=read, daemon=True).start()
    server = CoreDNS(host, port, process, output)
    settled.wait(startup_timeout)
    if not started.is_set():
        server.stop()
        raise RuntimeError(
            f"CoreDNS did not start on {host}:{port} ({behaviour}):\n" + "\n".join(output)
        )
    return server
