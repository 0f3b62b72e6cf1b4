"""DNS probes over UDP and TCP: the only module that speaks DNS.

A probe sends one query to one server over one transport and returns a `ProbeResult`:
an outcome, the rcode, the answer values, the round-trip time and a reason a person can
read. It knows nothing about metrics, HTTP or Kubernetes.

Sockets are plain non-blocking sockets driven by the event loop: dnspython's own async
query path costs several times more CPU per probe, and a connected UDP socket is what
lets the kernel report ICMP port-unreachable as `ConnectionRefusedError` and drop
datagrams from any other source address. dnspython builds each distinct query once;
responses are read by `read_response`, whose fast path handles the messages a healthy
CoreDNS sends and hands anything else to dnspython.

Latency is measured from the kernel's receive timestamp of the response (SO_TIMESTAMPNS,
CLOCK_REALTIME) back to the wall-clock time taken just before sending: an event loop busy
with other probes or a scrape delays when a response is read, not the latency reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from .model import Outcome, ProbeResult, Protocol, Query

# Largest DNS message over TCP (two-byte length prefix) and the UDP receive buffer.
_MAX_MESSAGE = 65535


class _Trace:
    """Collects a probe's log lines for `/probe?debug=true`; a no-op when not asked for."""

    __slots__ = ("_lines", "_t0")

    def __init__(self, lines: list[str] | None) -> None:
        self._lines = lines
        self._t0 = time.perf_counter()

    def __bool__(self) -> bool:
        return self._lines is not None

    def __call__(self, message: str) -> None:
        if self._lines is not None:
            elapsed_ms = (time.perf_counter() - self._t0) * 1000
            self._lines.append(f"{elapsed_ms:9.3f}ms {message}")


@functools.lru_cache(maxsize=4096)
def _template(qname: str, rdtype: str) -> bytes:
    message = dns.message.make_query(qname, rdtype)
    message.id = 0
    return message.to_wire()


def build_query(query: Query) -> tuple[int, bytes]:
    """A fresh random ID and the query's wire form: recursion desired, no EDNS, as a stub
    resolver sends it. dnspython builds each distinct query once; a probe only stamps
    its ID into a copy, which keeps per-probe CPU low."""
    template = _template(query.qname, query.rdtype)
    qid = int.from_bytes(os.urandom(2), "big")
    return qid, qid.to_bytes(2, "big") + template[2:]


@functools.lru_cache(maxsize=64)
def _rdtype(text: str) -> dns.rdatatype.RdataType:
    return dns.rdatatype.from_text(text)


@functools.lru_cache(maxsize=4096)
def _normalise(rdtype: int, value: str) -> str:
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Response:
    """What a probe needs from a DNS response."""

    flags: int
    rcode: int  # with the EDNS extended bits
    # Values of the answer section's records of the asked type, in order, without repeats.
    answers: tuple[str, ...]


def read_response(wire: bytes, rdtype: int) -> Response:
    """Read a response's flags, rcode and answer values of `rdtype`.

    Raises `dns.exception.DNSException` for a message dnspython rejects. The fast path
    (A and AAAA questions) reads the wire directly, checking everything dnspython checks
    for the record types it meets there; a message with anything else in it (another
    record type or class, EDNS options, another opcode, odd compression) is read by
    dnspython, so both paths agree on what is malformed.
    """
    if rdtype in _FAST_TYPES:
        fast = _read_fast(wire, rdtype)
        if fast is not None:
            return fast
    message = dns.message.from_wire(wire)
    answers = (
        rdata.to_text() for rrset in message.answer if rrset.rdtype == rdtype for rdata in rrset
    )
    return Response(int(message.flags), int(message.rcode()), tuple(dict.fromkeys(answers)))


_A, _NS, _CNAME, _SOA, _PTR, _AAAA, _OPT = 1, 2, 5, 6, 12, 28, 41
_FAST_TYPES = frozenset({_A, _AAAA})
_NAME_RDATA = frozenset({_NS, _CNAME, _PTR})
_MAX_POINTER_HOPS = 16  # as dnspython's MAX_COMPRESSION_POINTER_CHAIN
_RR_HEADER = struct.Struct("!HHIH")
_COUNTS = struct.Struct("!HHHH")


class _Unusual(Exception):
    """The fast path does not vouch for this message: dnspython reads it."""


def _name_end(wire: bytes, i: int, end: int) -> int:
    """Offset just past the (possibly compressed) name at `i`, validated as dnspython does:
    labels under 64 bytes, pointers strictly backwards and not into the name itself, at
    most 16 hops, 255 bytes in all, nothing read beyond `end`."""
    after = -1
    biggest = start = i
    hops = 0
    length = 1
    while True:
        if i >= end:
            raise _Unusual
        count = wire[i]
        if count == 0:
            return i + 1 if after < 0 else after
        if count < 64:
            i += 1 + count
            length += 1 + count
            if i > end or length > 255:
                raise _Unusual
        elif count >= 192:
            if i + 1 >= end:
                raise _Unusual
            target = (count & 0x3F) << 8 | wire[i + 1]
            if after < 0:
                after = i + 2
            hops += 1
            if target >= biggest or hops > _MAX_POINTER_HOPS:
                raise _Unusual
            end = start  # the target must lie before the part of the name already read
            biggest = i = start = target
        else:
            raise _Unusual


def _read_fast(wire: bytes, rdtype: int) -> Response | None:
    end = len(wire)
    if end < 12:
        return None
    flags = wire[2] << 8 | wire[3]
    if flags & 0x7800:  # opcode other than QUERY
        return None
    qdcount, *sections = _COUNTS.unpack_from(wire, 4)
    answers: list[str] = []
    rcode = flags & 0x0F
    opt = False
    try:
        i = 12
        for _ in range(qdcount):
            i = _name_end(wire, i, end) + 4
        for section, count in enumerate(sections):
            for _ in range(count):
                owner = i
                i = _name_end(wire, i, end)
                if i + 10 > end:
                    return None
                rtype, rclass, ttl, rdlen = _RR_HEADER.unpack_from(wire, i)
                i += 10
                rd_end = i + rdlen
                if rd_end > end:
                    return None
                if rtype == _OPT:
                    # Only in the additional section, once, owned by the root, no options.
                    if section != 2 or opt or wire[owner] != 0 or rdlen:
                        return None
                    opt = True
                    rcode |= ttl >> 20 & 0xFF0
                elif rclass != 1:
                    return None
                elif rtype in (_A, _AAAA):
                    if rdlen != (4 if rtype == _A else 16):
                        return None
                    if section == 0 and rtype == rdtype:
                        family = socket.AF_INET if rtype == _A else socket.AF_INET6
                        answers.append(socket.inet_ntop(family, wire[i:rd_end]))
                elif rtype in _NAME_RDATA:
                    if _name_end(wire, i, rd_end) != rd_end:
                        return None
                elif rtype == _SOA:
                    if _name_end(wire, _name_end(wire, i, rd_end), rd_end) + 20 != rd_end:
                        return None
                else:
                    return None
                i = rd_end
    except _Unusual:
        return None
    if i != end:
        return None
    return Response(flags, rcode, tuple(dict.fromkeys(answers)))


def evaluate(
    query: Query, response: Response, protocol: Protocol
) -> tuple[Outcome, str, tuple[str, ...]]:
    """Judge a response to `query`: outcome, reason, and the answer values of the asked type.

    Pure: passes when the rcode is NOERROR, the answer section holds at least one record
    of the asked type, and every expected value is among them. A UDP response with TC set
    is `truncated` whatever else it holds: a client would have to retry over TCP.
    """
    answers = response.answers
    if protocol is Protocol.UDP and response.flags & dns.flags.TC:
        reason = "response truncated (TC set): clients must retry over TCP"
        return Outcome.TRUNCATED, reason, answers
    if response.rcode != dns.rcode.NOERROR:
        return Outcome.RCODE, f"rcode {_rcode_text(response.rcode)}", answers
    if not answers:
        return (
            Outcome.WRONG_ANSWER,
            f"NOERROR but no {query.rdtype} record in the answer section",
            answers,
        )
    if query.expect:
        rdtype = _rdtype(query.rdtype)
        got = {_normalise(rdtype, a) for a in answers}
        missing = [e for e in query.expect if _normalise(rdtype, e) not in got]
        if missing:
            return (
                Outcome.WRONG_ANSWER,
                f"expected {', '.join(missing)} in the answer, got {', '.join(answers)}",
                answers,
            )
    return Outcome.SUCCESS, f"NOERROR, {query.rdtype} {', '.join(answers)}", answers


def _rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))


@functools.lru_cache(maxsize=65536)
def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


async def probe(
    host: str,
    port: int,
    protocol: Protocol,
    query: Query,
    timeout: float,
    trace: list[str] | None = None,
) -> ProbeResult:
    """Send `query` to `host`:`port` over `protocol` and judge the answer.

    Never raises for anything the network or the server does; cancellation propagates
    (and closes the probe's socket). `trace`, when given, receives the probe's log lines.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[ProbeResult] = loop.create_future()

    def done(outcome: ProbeResult) -> None:
        if not result.done():
            result.set_result(outcome)

    handle = start_probe(host, port, protocol, query, timeout, done, trace)
    try:
        return await result
    finally:
        handle.cancel()  # a no-op once done


def start_probe(
    host: str,
    port: int,
    protocol: Protocol,
    query: Query,
    timeout: float,
    done: Callable[[ProbeResult], None],
    trace: list[str] | None = None,
) -> ProbeHandle:
    """Start a probe on the running event loop; `done` gets its result, exactly once.

    A UDP probe is driven by loop callbacks alone (no task, no coroutine): this is the
    path the scheduler takes thousands of times a second. `done` is called from a loop
    callback, or before this returns when the probe cannot start (a bad address, no
    socket to be had). `ProbeHandle.cancel()` abandons the probe without calling `done`.
    """
    exchange = _Exchange(query, protocol, timeout, done, _Trace(trace))
    exchange.start(asyncio.get_running_loop(), host, port)
    return exchange


class ProbeHandle(typing.Protocol):
    @property
    def finished(self) -> bool:
        """True once `done` was called or the probe was cancelled."""

    def cancel(self) -> None:
        """Abandon the probe: close its socket, and never call `done`."""


def _ignore(result: ProbeResult) -> None:
    """The callback of a probe that has finished or was cancelled."""


def _unreachable(exc: OSError) -> tuple[Outcome, str]:
    """The outcome and reason for a socket error: unreachable, or some other error."""
    if isinstance(exc, ConnectionRefusedError):
        return Outcome.UNREACHABLE, "port unreachable (connection refused)"
    if exc.errno in _UNREACHABLE_ERRNOS:
        return Outcome.UNREACHABLE, f"unreachable: {exc.strerror or exc}"
    return Outcome.ERROR, f"socket error: {exc}"


def _trace_response(log: _Trace, data: bytes, rtt: float, outcome: Outcome, reason: str) -> None:
    message = dns.message.from_wire(data)  # it parsed once already
    log(
        f"response after {rtt * 1000:.3f}ms: rcode {dns.rcode.to_text(message.rcode())}, "
        f"flags {dns.flags.to_text(message.flags)}, {len(message.answer)} answer RRset(s)"
    )
    for rrset in message.answer:
        log(f"  answer: {rrset.to_text()}")
    log(f"outcome {outcome}: {reason}")


_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EHOSTDOWN}
)


class _MalformedResponse(Exception):
    def __init__(self, message: str, rtt: float) -> None:
        super().__init__(message)
        self.rtt = rtt


class _Closed(Exception):
    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"connection closed after {got} of {wanted} bytes")


# Rcodes with which a server may omit the question (as dnspython's is_response allows).
_QUESTIONLESS_RCODES = frozenset(
    {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}
)

# Kernel receive timestamps: SO_TIMESTAMPNS makes recvmsg() return, as ancillary data, a
# struct timespec (CLOCK_REALTIME) taken when the packet reached the socket layer. Python
# does not name the option; 35 is its value on Linux, except on a few architectures
# (alpha, hppa, mips, sparc) where the option is refused and probes fall back to
# user-space clocks.
_SO_TIMESTAMPNS: int | None = getattr(
    socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None
)
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def _enable_timestamps(sock: socket.socket) -> None:
    if _SO_TIMESTAMPNS is not None:
        with contextlib.suppress(OSError):  # refused: the user-space clock is used
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)


# struct tcp_info: eight u8 fields, then u32 fields of which tcpi_rtt (microseconds) is
# the 16th. Right after the handshake it holds the SYN to SYN-ACK round trip.
_TCPI_RTT = struct.Struct("@I")
_TCPI_RTT_OFFSET = 8 + 15 * 4


def _handshake_rtt(sock: socket.socket, fallback: float) -> float:
    """The connection's round trip in seconds as the kernel measured it; `fallback` (the
    user-space time to connect) where TCP_INFO is not available or plausible."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        (rtt_us,) = _TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)
    except (OSError, AttributeError, struct.error):
        return fallback
    return rtt_us / 1e6 if 0 < rtt_us / 1e6 <= fallback else fallback


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


class _Exchange:
    """One probe: a query and its response on a socket of its own.

    UDP runs on loop callbacks: send, a reader for the socket, a timer for the timeout,
    and whichever fires first finishes the probe. TCP, with its connect and partial
    reads, runs as a task under `asyncio.timeout`. Reads go through recvmsg() to get the
    kernel's receive timestamp; the round trip is that timestamp minus the wall-clock
    time taken just before sending. When the kernel gives no timestamp, or a clock step
    makes it implausible (later than the read itself), the monotonic user-space measure
    is used instead.
    """

    __slots__ = (
        "_done", "_fd", "_finished", "_handshake", "_ignored", "_log", "_loop", "_protocol",
        "_query", "_rdtype", "_rx_ns", "_sent", "_sent_ns", "_sock", "_started_at", "_task",
        "_timeout", "_timer", "_wire", "data", "response", "rtt",
    )

    def __init__(
        self,
        query: Query,
        protocol: Protocol,
        timeout: float,
        done: Callable[[ProbeResult], None],
        log: _Trace,
    ) -> None:
        self._query = query
        self._protocol = protocol
        self._timeout = timeout
        self._done = done
        self._log = log
        self._started_at = time.time()
        self._rdtype = _rdtype(query.rdtype)
        self._ignored: list[str] = []
        self._sock: socket.socket | None = None
        self._fd = -1  # registered with the loop's selector
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        self._sent_ns = 0
        self._sent = 0.0
        self._rx_ns: int | None = None
        self._handshake = 0.0  # TCP: the connection's round trip, added to the query's
        self._wire = b""
        self.data = b""
        self.response: Response | None = None
        self.rtt = 0.0

    # -- life cycle ------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self._loop = loop
        qid, self._wire = build_query(self._query)
        query, protocol = self._query, self._protocol
        if self._log:
            self._log(
                f"sending {query.rdtype} {query.qname} id={qid} to {host} port {port} "
                f"over {protocol}, timeout {self._timeout:g}s"
            )
        try:
            family = _family(host)
        except ValueError:
            self._fail(Outcome.ERROR, f"not an IP address: {host!r}")
            return
        try:
            sock = socket.socket(
                family, socket.SOCK_DGRAM if protocol is Protocol.UDP else socket.SOCK_STREAM
            )
        except OSError as exc:  # out of file descriptors, most likely: say so, do not crash
            self._fail(Outcome.ERROR, f"cannot open a socket: {exc}")
            return
        self._sock = sock
        sock.setblocking(False)
        _enable_timestamps(sock)
        if protocol is Protocol.TCP:
            self._task = loop.create_task(self._tcp(host, port))
            return
        try:
            # connect() on UDP only sets the peer: the kernel then drops datagrams from
            # other sources and reports ICMP port-unreachable on the next receive.
            sock.connect((host, port))
            self._start_clock()
            sock.send(self._wire)
        except OSError as exc:
            self._fail(*_unreachable(exc))
            return
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._udp_readable)
        self._timer = loop.call_later(self._timeout, self._expired)

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Abandon the probe: close its socket, and never call `done`."""
        if not self._finished:
            self._finished = True
            self._done = _ignore
            if self._task is not None:
                self._task.cancel()
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            self._sock.close()

    def _finish(self, result: ProbeResult) -> None:
        if not self._finished:
            self._finished = True
            self._close()
            done, self._done = self._done, _ignore
            # Dropping `done` breaks the cycle a callback that refers back to this handle
            # makes: thousands of probes a second then leave no garbage for the cyclic
            # collector, whose full passes would stall the event loop.
            done(result)

    def _fail(self, outcome: Outcome, reason: str, rtt: float | None = None) -> None:
        self._log(reason)
        self._finish(ProbeResult(outcome, reason, rtt_seconds=rtt, started_at=self._started_at))

    def _expired(self) -> None:
        reason = f"no response within {self._timeout:g}s"
        if self._ignored:
            reason += (
                f" (ignored {len(self._ignored)} non-matching datagram(s): {self._ignored[-1]})"
            )
        self._fail(Outcome.TIMEOUT, reason)

    def _answered(self) -> None:
        response = self.response
        assert response is not None
        outcome, reason, answers = evaluate(self._query, response, self._protocol)
        if self._log:
            _trace_response(self._log, self.data, self.rtt, outcome, reason)
        self._finish(ProbeResult(
            outcome, reason, rtt_seconds=self.rtt, rcode=_rcode_text(response.rcode),
            answers=answers, started_at=self._started_at,
        ))

    # -- clocks and reads ------------------------------------------------------------

    def _start_clock(self) -> None:
        self._sent_ns = time.time_ns()
        self._sent = time.perf_counter()

    def _elapsed(self) -> float:
        elapsed = time.perf_counter() - self._sent
        if self._rx_ns is not None:
            kernel = (self._rx_ns - self._sent_ns) / 1e9
            if 0.0 <= kernel <= elapsed:
                return self._handshake + kernel
        return self._handshake + elapsed

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes now, noting the kernel's timestamp; BlockingIOError if none."""
        assert self._sock is not None
        data, ancillary, _, _ = self._sock.recvmsg(size, _ANCILLARY)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                self._rx_ns = seconds * 1_000_000_000 + nanoseconds
        return data

    def _accept(self, data: bytes) -> bool:
        """True when `data` is the response (kept in .response); False when it is someone
        else's and was ignored. A response with our ID and question that does not parse
        is the server's fault and fails the probe (_MalformedResponse)."""
        rtt = self._elapsed()
        note = _mismatch(data, self._wire)
        if note is not None:
            self._ignored.append(note)
            if self._log:
                self._log(f"ignored {note}")
            return False
        try:
            self.response = read_response(data, self._rdtype)
        except dns.exception.DNSException as exc:
            raise _MalformedResponse(f"malformed response: {exc}", rtt) from exc
        self.data, self.rtt = data, rtt
        return True

    # -- UDP: callbacks ---------------------------------------------------------------

    def _udp_readable(self) -> None:
        try:
            data = self._read(_MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(*_unreachable(exc))
            return
        try:
            if self._accept(data):
                self._answered()
        except _MalformedResponse as exc:
            self._fail(Outcome.ERROR, str(exc), exc.rtt)

    # -- TCP: a task -----------------------------------------------------------------

    async def _tcp(self, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._tcp_exchange(host, port)
        except TimeoutError:
            self._expired()
        except OSError as exc:
            self._fail(*_unreachable(exc))
        except _MalformedResponse as exc:
            self._fail(Outcome.ERROR, str(exc), exc.rtt)
        else:
            self._answered()
        finally:
            self._close()

    async def _recv(self, size: int) -> bytes:
        assert self._sock is not None
        while True:
            try:
                return self._read(size)
            except (BlockingIOError, InterruptedError):
                await _readable(self._sock)

    async def _recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await self._recv(n - len(buf))
            if not chunk:
                raise _Closed(len(buf), n)
            buf += chunk
        return buf

    async def _tcp_exchange(self, host: str, port: int) -> None:
        """The round trip is the handshake's, as the kernel measured it (TCP_INFO), plus
        the query's from sending to the kernel's receive timestamp of the answer."""
        assert self._sock is not None
        loop = self._loop
        self._start_clock()
        await loop.sock_connect(self._sock, (host, port))
        connected = time.perf_counter() - self._sent
        self._handshake = _handshake_rtt(self._sock, connected)
        if self._log:
            self._log(f"connected, handshake round trip {self._handshake * 1000:.3f}ms")
        self._start_clock()
        await loop.sock_sendall(self._sock, struct.pack("!H", len(self._wire)) + self._wire)
        try:
            while True:
                (length,) = struct.unpack("!H", await self._recv_exactly(2))
                if self._accept(await self._recv_exactly(length)):
                    return
        except _Closed as exc:
            raise _MalformedResponse(
                f"server closed the TCP connection before a full response ({exc})",
                self._handshake + time.perf_counter() - self._sent,
            ) from exc


class StreamError(Exception):
    """A byte stream could not carry the exchange; `outcome` and the message say why."""

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome


class Stream(typing.Protocol):
    """A byte stream to a DNS server's TCP port that someone else opened (a tunnel)."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes:
        """The next bytes; b"" once the server closed. StreamError on failure."""

    async def close(self) -> None: ...


async def probe_stream(
    open_stream: Callable[[], typing.Awaitable[Stream]], query: Query, timeout: float
) -> ProbeResult:
    """DNS over TCP through a stream (the API server's port-forward to a pod): open it,
    send the length-prefixed query, read the answer, judge it as a TCP probe.

    The timeout covers opening the stream too. The round trip is from sending the query
    to the whole answer having arrived: it includes the tunnel, not only the server.
    """
    started_at = time.time()
    _, wire = build_query(query)
    stream: Stream | None = None
    rtt: float | None = None
    try:
        async with asyncio.timeout(timeout):
            stream = await open_stream()
            sent = time.perf_counter()
            await stream.send(struct.pack("!H", len(wire)) + wire)
            buffer = b""
            while True:
                while len(buffer) < 2 or len(buffer) < 2 + (buffer[0] << 8 | buffer[1]):
                    chunk = await stream.receive()
                    if not chunk:
                        return ProbeResult(
                            Outcome.ERROR, "the server closed the stream before a full "
                            f"response ({len(buffer)} bytes)", started_at=started_at)
                    buffer += chunk
                length = buffer[0] << 8 | buffer[1]
                data, buffer = buffer[2 : 2 + length], buffer[2 + length :]
                if _mismatch(data, wire) is None:
                    break
            rtt = time.perf_counter() - sent
        response = read_response(data, _rdtype(query.rdtype))
    except TimeoutError:
        return ProbeResult(Outcome.TIMEOUT, f"no response within {timeout:g}s",
                           started_at=started_at)
    except StreamError as exc:
        return ProbeResult(exc.outcome, str(exc), started_at=started_at)
    except dns.exception.DNSException as exc:
        return ProbeResult(Outcome.ERROR, f"malformed response: {exc}", rtt_seconds=rtt,
                           started_at=started_at)
    finally:
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()
    outcome, reason, answers = evaluate(query, response, Protocol.TCP)
    return ProbeResult(outcome, reason, rtt_seconds=rtt, rcode=_rcode_text(response.rcode),
                       answers=answers, started_at=started_at)


def _mismatch(data: bytes, query: bytes) -> str | None:
    """Why `data` is not a response to `query` (both wire form), or None if it is.

    A datagram whose ID differs, or that is not a response, is stray or spoofed. One
    that does not echo our question is ignored too, as resolvers do. Header and question
    are compared as bytes, so only a real answer is parsed.
    """
    if len(data) < 2 or data[:2] != query[:2]:
        return f"{len(data)}-byte datagram with a different ID"
    if len(data) < 12:
        return None  # ours, and too short to read: malformed
    if not data[2] & 0x80:
        return "datagram with our ID that is not a response"
    question = query[12:]
    qdcount = data[4:6]
    if qdcount == b"\0\0":
        if data[3] & 0x0F not in _QUESTIONLESS_RCODES:
            return "response without a question"
    elif qdcount != b"\0\1" or data[12 : 12 + len(question)].lower() != question.lower():
        return "response whose question does not match the query"
    return None
