"""The true round trips, from the wire: a packet capture on the loopback interface.

    python -m bench.capture PORT SECONDS OUT

An AF_PACKET socket on `lo` sees every UDP datagram to and from PORT, each stamped by
the kernel (SO_TIMESTAMPNS, CLOCK_REALTIME) as it crosses the interface. A query and its
response are paired by client address, client port, server address and DNS ID; OUT gets
one JSON object: {"pairs": [[server, query_ns, response_ns], ...], "packets": n}. Runs in a
process of its own, so the prober under test pays nothing for it. Needs root.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26


def udp_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF: IPv4 UDP to or from `port`, first fragments only; the kernel drops
    the rest (the TCP probes' packets above all) before they cost this process anything."""
    return [
        (0x28, 0, 0, 12),      # 0: ldh [12]            ethertype
        (0x15, 0, 9, 0x0800),  # 1: jeq IPv4, else drop
        (0x30, 0, 0, 23),      # 2: ldb [23]            IP protocol
        (0x15, 0, 7, 17),      # 3: jeq UDP, else drop
        (0x28, 0, 0, 20),      # 4: ldh [20]            fragment offset
        (0x45, 5, 0, 0x1FFF),  # 5: jset -> drop
        (0xB1, 0, 0, 14),      # 6: ldxb 4*([14]&0xf)   IP header length
        (0x48, 0, 0, 14),      # 7: ldh [x+14]          source port
        (0x15, 3, 0, port),    # 8: jeq port -> accept
        (0x48, 0, 0, 16),      # 9: ldh [x+16]          destination port
        (0x15, 1, 0, port),    # 10: jeq port -> accept, else drop
        (0x06, 0, 0, 0),       # 11: drop
        (0x06, 0, 0, 0x40000),  # 12: accept
    ]


def attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER (the kernel copies the program)."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(buffer)))
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33  # Linux; root may exceed rmem_max
TIMESPEC = struct.Struct("@ll")


def capture(port: int, seconds: float) -> dict[str, object]:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    attach(sock, udp_port_filter(port))
    sock.bind(("lo", 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.settimeout(0.2)
    queries: dict[tuple[bytes, int, bytes, bytes], int] = {}
    responses: dict[tuple[bytes, int, bytes, bytes], int] = {}
    packets = 0
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bounded in time
        try:
            data, ancillary, _, _ = sock.recvmsg(128, socket.CMSG_SPACE(TIMESPEC.size))
        except TimeoutError:
            continue
        # Ethernet (14 bytes on lo), IPv4, UDP, then the DNS ID.
        if len(data) < 14 + 20 + 8 + 2 or data[12:14] != b"\x08\x00" or data[23] != 17:
            continue
        ihl = (data[14] & 0x0F) * 4
        udp = 14 + ihl
        sport, dport = struct.unpack_from("!HH", data, udp)
        if port not in (sport, dport):
            continue
        stamp = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                s, ns = TIMESPEC.unpack_from(payload)
                stamp = s * 1_000_000_000 + ns
        packets += 1
        src, dst, qid = data[26:30], data[30:34], data[udp + 8 : udp + 10]
        # Each datagram on lo shows up twice (outgoing, then incoming): keep the first.
        if dport == port:
            queries.setdefault((src, sport, dst, qid), stamp)
        else:
            responses.setdefault((dst, dport, src, qid), stamp)
    pairs = [
        [socket.inet_ntoa(key[2]), sent, responses[key]]
        for key, sent in queries.items()
        if key in responses
    ]
    return {"pairs": pairs, "packets": packets}


def start(port: int, seconds: float, out: Path) -> subprocess.Popen[str]:
    """Run a capture in a process of its own; returns once it is capturing."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.capture", str(port), str(seconds), str(out)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        child.wait(10)
        sys.exit("bench: the packet capture did not start (it needs root)")
    return child


def main() -> None:
    port, seconds, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    out.write_text(json.dumps(capture(port, seconds)))


if __name__ == "__main__":
    main()
