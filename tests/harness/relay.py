"""A TCP relay between two network namespaces, for the tests.

The exporter under test runs in a namespace with no route out; the test cluster's API
server listens on the machine's loopback, and the tests read the exporter's metrics from
there too. One relay process bridges one direction: it binds its listening socket inside
one namespace, then moves itself into the other to connect. Sockets keep the namespace
they were made in, so after the switch the listener still accepts where it was bound.

Usage: python -m tests.harness.relay LISTEN_NETNS HOST:PORT CONNECT_NETNS HOST:PORT
where a namespace is a path (/run/netns/NAME) or `-` for the one the relay started in.
It prints `listening HOST:PORT` once it accepts connections, and runs until killed.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _serve(listener: socket.socket, target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, sock=listener)
    host, port = listener.getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


@dataclass
class Relay:
    """A running relay process; `address` is where it listens."""

    process: subprocess.Popen[str]
    address: str

    @classmethod
    def start(cls, listen_ns: str, listen: str, connect_ns: str, connect: str) -> Relay:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.relay", listen_ns, listen, connect_ns, connect],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_REPO,
        )
        assert process.stdout is not None
        line = process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            process.kill()
            _, err = process.communicate(timeout=10)
            raise RuntimeError(f"relay {listen} -> {connect} did not start: {err}")
        return cls(process, line[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    listen_ns, listen, connect_ns, connect = argv
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    if listen_ns != "-":
        _setns(listen_ns)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(_split(listen))
    listener.listen(64)
    if connect_ns != "-":
        _setns(connect_ns)
    elif listen_ns != "-":
        _setns(f"/proc/self/fd/{home}")
    os.close(home)
    asyncio.run(_serve(listener, _split(connect)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
