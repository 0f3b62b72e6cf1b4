"""The kernel's clocks for a probe's latency: receive timestamps on UDP and TCP sockets
(SO_TIMESTAMPNS), and the TCP handshake's round trip (TCP_INFO), so that an event loop
busy with other probes delays when a response is read, not the latency reported.
"""

from __future__ import annotations

import _socket
import socket
import struct
import sys

# Kernel receive timestamps: SO_TIMESTAMPNS makes recvmsg() return, as ancillary data, a
# struct timespec (CLOCK_REALTIME) taken when the packet reached the socket layer. Python
# does not name the option; 35 is its value on Linux, except on a few architectures
# (alpha, hppa, mips, sparc) where the option is refused and probes fall back to
# user-space clocks.
SO_TIMESTAMPNS: int | None = getattr(
    socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None
)
TIMESPEC = struct.Struct("@ll")
ANCILLARY = socket.CMSG_SPACE(TIMESPEC.size)


def enable_timestamps(sock: _socket.socket) -> None:
    if SO_TIMESTAMPNS is not None:
        try:  # noqa: SIM105 - on every probe: a plain try costs less than suppress()
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:  # refused: the user-space clock is used
            pass


# struct tcp_info: eight u8 fields, then u32 fields of which tcpi_rtt (microseconds) is
# the 16th. Right after the handshake it holds the SYN to SYN-ACK round trip.
_TCPI_RTT = struct.Struct("@I")
_TCPI_RTT_OFFSET = 8 + 15 * 4


def handshake_rtt(sock: _socket.socket, fallback: float) -> float:
    """The connection's round trip in seconds as the kernel measured it; `fallback` (the
    user-space time to connect) where TCP_INFO is not available or plausible."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        (rtt_us,) = _TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)
    except (OSError, AttributeError, struct.error):
        return fallback
    return rtt_us / 1e6 if 0 < rtt_us / 1e6 <= fallback else fallback
