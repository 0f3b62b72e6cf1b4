"""DNS probes over UDP and TCP: the socket engine of the only package that speaks DNS.

A probe sends one query to one server over one transport and returns a `ProbeResult`:
an outcome, the rcode, the answer values, the round-trip time and a reason a person can
read. It knows nothing about metrics, HTTP or Kubernetes.

Sockets are plain non-blocking sockets driven by the event loop: dnspython's own async
query path costs several times more CPU per probe, and a connected UDP socket is what
lets the kernel report ICMP port-unreachable as `ConnectionRefusedError` and drop
datagrams from any other source address. dnspython builds each distinct query once;
responses are read by `wire.read_response`, whose fast path handles the messages a
healthy CoreDNS sends and hands anything else to dnspython.

Latency is measured from the kernel's receive timestamp of the response (clock.py:
SO_TIMESTAMPNS, CLOCK_REALTIME) back to the wall-clock time taken just before sending: an
event loop busy with other probes or a scrape delays when a response is read, not the
latency reported.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import errno
import functools
import ipaddress
import os
import select
import socket
import struct
import threading
import time
import typing
from collections.abc import Callable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from ..model import Outcome, ProbeResult, Protocol, Query
from .clock import ANCILLARY, SO_TIMESTAMPNS, TIMESPEC, enable_timestamps, handshake_rtt
from .wire import (
    _MAX_MESSAGE,
    Response,
    _mismatch,
    _rcode_text,
    _rdtype,
    _Trace,
    build_query,
    evaluate,
    read_response,
)


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
    *,
    loop: asyncio.AbstractEventLoop | None = None,
) -> ProbeHandle:
    """Start a probe on the running event loop; `done` gets its result, exactly once.

    A UDP probe is driven by loop callbacks alone (no task, no coroutine): this is the
    path the scheduler takes thousands of times a second. `done` is called from a loop
    callback, or before this returns when the probe cannot start (a bad address, no
    socket to be had). `ProbeHandle.cancel()` abandons the probe without calling `done`.
    """
    exchange = _Exchange(query, protocol, timeout, done, _Trace(trace) if trace is not None
                         else _NO_TRACE)
    exchange.start(loop or asyncio.get_running_loop(), host, port)
    return exchange


_NO_TRACE = _Trace(None)


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


# Sockets made non-blocking by socket() itself where the platform can (Linux): one
# syscall fewer per probe than setblocking(False) after it. Python sees the flag and
# treats the socket as non-blocking (timeout 0.0) either way.
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)
_UDP = socket.SOCK_DGRAM | _NONBLOCK
_TCP = socket.SOCK_STREAM | _NONBLOCK

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EHOSTDOWN}
)


class _MalformedResponse(Exception):
    def __init__(self, message: str, rtt: float) -> None:
        super().__init__(message)
        self.rtt = rtt


class _Deadlines:
    """The timeouts of every in-flight probe with one timeout value: a queue in start
    order (so in deadline order) and one timer, armed for the oldest probe still in
    flight. A probe that is answered leaves its entry behind, skipped when the timer
    fires or the next probe starts; a timer per probe, armed and cancelled thousands of
    times a second, cost more than the whole queue."""

    __slots__ = ("_loop", "_queue", "_timeout", "_timer")

    # A loop may run a timer up to its clock's resolution early (uvloop's is 1 ms): a
    # deadline that close counts as reached, or the queue would re-arm the same instant.
    _SLACK = 0.001

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._queue: collections.deque[tuple[float, _Exchange]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, exchange: _Exchange) -> None:
        queue = self._queue
        while queue and queue[0][1]._finished:
            queue.popleft()
        deadline = self._loop.time() + self._timeout
        queue.append((deadline, exchange))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        queue, now = self._queue, self._loop.time() + self._SLACK
        while queue:
            deadline, exchange = queue[0]
            if not exchange._finished and deadline > now:
                self._timer = self._loop.call_at(deadline, self._fire)
                return
            queue.popleft()
            if not exchange._finished:
                _run(self._loop, exchange._expired)

    def close(self) -> None:
        """Stop. Probes still in flight time out now, unless their loop is closed (then
        nothing could run their callbacks anyway)."""
        if self._timer is not None:
            self._timer.cancel()
        expire = not self._loop.is_closed()
        while self._queue:
            _, exchange = self._queue.popleft()
            if expire and not exchange._finished:
                _run(self._loop, exchange._expired)


def _run(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Exception | None:
    """A probe's callback, as the loop would run it: an exception (its `done` raising,
    most likely) is reported to the loop's handler, and returned; the other probes go on."""
    try:
        callback()
    except Exception as exc:
        loop.call_exception_handler({"message": f"probe callback {callback!r} failed",
                                     "exception": exc})
        return exc
    return None


class _Poller:
    """The probes in flight on one event loop, behind one epoll set that the loop watches
    once. A probe's socket is registered with one epoll_ctl() and leaves the set when it
    is closed; asking the loop to watch and unwatch each socket cost several times that
    (the loop's handle objects for every socket, and a second syscall; for TCP, a task,
    futures and a reader and a writer per probe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._probes: dict[int, _Exchange] = {}
        self._deadlines: dict[float, _Deadlines] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, fd: int, exchange: _Exchange, timeout: float,
              events: int = select.EPOLLIN) -> None:
        """Call `exchange._ready()` when `fd` has one of `events` (readable unless told),
        `exchange._expired()` if it is not finished `timeout` seconds from now."""
        self._epoll.register(fd, events)
        self._probes[fd] = exchange
        deadlines = self._deadlines.get(timeout)
        if deadlines is None:
            deadlines = self._deadlines[timeout] = _Deadlines(self.loop, timeout)
        deadlines.add(exchange)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed (closing it takes it out of the epoll set)."""
        del self._probes[fd]

    def _ready(self) -> None:
        probes = self._probes
        for fd, _ in self._epoll.poll(0):
            exchange = probes.get(fd)
            if exchange is None:  # it finished earlier in this batch
                continue
            exc = _run(self.loop, exchange._ready)
            if exc is not None and not exchange._finished:  # its socket would stay readable
                fail = functools.partial(exchange._fail, Outcome.ERROR, f"internal error: {exc!r}")
                _run(self.loop, fail)

    def close(self) -> None:
        for deadlines in self._deadlines.values():
            deadlines.close()
        self._probes.clear()
        if not self.loop.is_closed():
            self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


# One poller per thread, for the loop running there: a new loop (a test's, another
# asyncio.run()) gets a new one and the previous is closed.
_local = threading.local()


def _poller(loop: asyncio.AbstractEventLoop) -> _Poller:
    poller: _Poller | None = getattr(_local, "poller", None)
    if poller is None or poller.loop is not loop:
        if poller is not None:
            poller.close()
        poller = _local.poller = _Poller(loop)
    return poller


class _Exchange:
    """One probe: a query and its response on a socket of its own.

    Both transports run on loop callbacks: the loop's `_Poller` calls back when the socket
    is ready, its `_Deadlines` when the timeout passes, and whichever finishes the probe
    first wins. UDP sends at once and waits to be readable. TCP connects without waiting,
    waits to be writable (connected), sends the length-prefixed query and reads the
    answer as it comes, in as many pieces as the kernel hands over; the timeout covers
    the whole exchange, the connection included. Reads go through recvmsg() to get the
    kernel's receive timestamp; the round trip is that timestamp minus the wall-clock
    time taken just before sending. When the kernel gives no timestamp, or a clock step
    makes it implausible (later than the read itself), the monotonic user-space measure
    is used instead.
    """

    __slots__ = (
        "_connected", "_done", "_fd", "_finished", "_handshake", "_ignored", "_log", "_loop",
        "_outgoing", "_poller", "_protocol", "_query", "_rdtype", "_received", "_rx_ns",
        "_sent", "_sent_ns", "_sock", "_started_at", "_timeout", "_wire", "data",
        "response", "rtt",
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
        self._sock: _socket.socket | None = None
        self._fd = -1  # watched by the loop's _Poller
        self._poller: _Poller | None = None
        self._connected = False  # TCP: the handshake is done
        self._outgoing = b""  # TCP: the part of the query the kernel has not taken yet
        self._received = b""  # TCP: what has arrived and is not a whole message yet
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
        if self._log.enabled:
            self._log(
                f"sending {query.rdtype} {query.qname} id={qid} to {host} port {port} "
                f"over {protocol}, timeout {self._timeout:g}s"
            )
        try:
            family = _family(host)
        except ValueError:
            self._fail(Outcome.ERROR, f"not an IP address: {host!r}")
            return
        udp = protocol is Protocol.UDP
        try:
            # The C socket type itself: the Python subclass's __init__ and close()
            # wrappers were a tenth of a UDP probe.
            sock = _socket.socket(family, _UDP if udp else _TCP)
        except OSError as exc:  # out of file descriptors, most likely: say so, do not crash
            self._fail(Outcome.ERROR, f"cannot open a socket: {exc}")
            return
        self._sock = sock
        if not _NONBLOCK:
            sock.setblocking(False)
        enable_timestamps(sock)
        if not udp:
            self._tcp_start(loop, host, port)
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
        self._poller = _poller(loop)
        self._poller.watch(self._fd, self, self._timeout)

    @property
    def finished(self) -> bool:
        return self._finished

    def cancel(self) -> None:
        """Abandon the probe: close its socket, and never call `done`."""
        if not self._finished:
            self._finished = True
            self._done = _ignore
            self._close()

    def _close(self) -> None:
        if self._poller is not None:
            self._poller.forget(self._fd)
            self._poller = None
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
        if self._log.enabled:
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
        data, ancillary, _, _ = self._sock.recvmsg(size, ANCILLARY)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack_from(payload)
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
            if self._log.enabled:
                self._log(f"ignored {note}")
            return False
        try:
            self.response = read_response(data, self._rdtype)
        except dns.exception.DNSException as exc:
            raise _MalformedResponse(f"malformed response: {exc}", rtt) from exc
        self.data, self.rtt = data, rtt
        return True

    # -- readiness --------------------------------------------------------------------

    def _ready(self) -> None:
        """The poller's call: the socket is ready for what the probe waits for."""
        if self._protocol is Protocol.UDP:
            self._udp_readable()
        elif self._connected:
            self._tcp_ready()
        else:
            self._tcp_connected()

    # -- UDP -------------------------------------------------------------------------

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

    # -- TCP -------------------------------------------------------------------------
    # The round trip is the handshake's, as the kernel measured it (TCP_INFO), plus the
    # query's from sending to the kernel's receive timestamp of the answer's last piece.

    def _tcp_start(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        sock = self._sock
        assert sock is not None
        self._start_clock()
        try:
            error = sock.connect_ex((host, port))
        except OSError as exc:  # an address the socket cannot take
            self._fail(*_unreachable(exc))
            return
        if error not in (0, errno.EINPROGRESS):
            self._fail(*_unreachable(OSError(error, os.strerror(error))))
            return
        # Connected when writable; a connection the kernel made at once is writable at
        # once too.
        self._fd = sock.fileno()
        self._poller = _poller(loop)
        self._poller.watch(self._fd, self, self._timeout, select.EPOLLOUT)

    def _tcp_connected(self) -> None:
        sock = self._sock
        assert sock is not None
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fail(*_unreachable(OSError(error, os.strerror(error))))
            return
        self._connected = True
        self._handshake = handshake_rtt(sock, time.perf_counter() - self._sent)
        if self._log.enabled:
            self._log(f"connected, handshake round trip {self._handshake * 1000:.3f}ms")
        self._start_clock()
        self._outgoing = struct.pack("!H", len(self._wire)) + self._wire
        self._tcp_send()

    def _tcp_send(self) -> None:
        """Send what the kernel takes; wait to be writable again for any rest, else for
        the answer."""
        assert self._sock is not None and self._poller is not None
        try:
            sent = self._sock.send(self._outgoing)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(*_unreachable(exc))
            return
        self._outgoing = self._outgoing[sent:]
        self._poller.modify(self._fd, select.EPOLLOUT if self._outgoing else select.EPOLLIN)

    def _tcp_ready(self) -> None:
        if self._outgoing:
            self._tcp_send()
            return
        while not self._finished:
            try:
                chunk = self._read(_MAX_MESSAGE + 2)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._fail(*_unreachable(exc))
                return
            if not chunk:
                self._tcp_closed()
                return
            self._received += chunk
            try:
                self._tcp_messages()
            except _MalformedResponse as exc:
                self._fail(Outcome.ERROR, str(exc), exc.rtt)

    def _tcp_messages(self) -> None:
        """Each whole message received: the answer finishes the probe; another one (not
        ours) is noted and skipped."""
        received = self._received
        while len(received) >= 2:
            length = received[0] << 8 | received[1]
            if len(received) < 2 + length:
                return
            data, received = received[2 : 2 + length], received[2 + length :]
            self._received = received
            if self._accept(data):
                self._answered()
                return

    def _tcp_closed(self) -> None:
        received = self._received
        if len(received) < 2:
            got, wanted = len(received), 2
        else:
            got, wanted = len(received) - 2, received[0] << 8 | received[1]
        self._fail(
            Outcome.ERROR,
            "server closed the TCP connection before a full response "
            f"(connection closed after {got} of {wanted} bytes)",
            self._handshake + time.perf_counter() - self._sent,
        )
