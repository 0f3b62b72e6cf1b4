"""DNS probes over UDP and TCP: the only module that speaks DNS.

A probe sends one query to one server over one transport and returns a `ProbeResult`:
an outcome, the rcode, the answer values, the round-trip time and a reason a person can
read. It knows nothing about metrics, HTTP or Kubernetes.

Sockets are plain non-blocking sockets driven by the event loop (dnspython only builds
and parses messages): dnspython's own async query path costs several times more CPU per
probe, and a connected UDP socket is what lets the kernel report ICMP port-unreachable
as `ConnectionRefusedError` and drop datagrams from any other source address.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype


class Outcome(enum.StrEnum):
    """What became of a probe; the values are the `result` label of `dnsprobe_probes_total`."""

    SUCCESS = "success"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    RCODE = "rcode"
    WRONG_ANSWER = "wrong_answer"
    TRUNCATED = "truncated"
    ERROR = "error"


class Protocol(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Query:
    """One question to ask, and what its answer must contain.

    `label` is the value of the `query` metric label: `kubernetes` for the default query,
    otherwise the name as the user wrote it (with `/TYPE` when the type is not A).
    """

    label: str
    qname: str
    rdtype: str = "A"
    expect: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProbeResult:
    outcome: Outcome
    reason: str
    # Seconds from sending the query (for TCP: from starting to connect) to the arrival
    # of a matching response; None when no response arrived.
    rtt_seconds: float | None = None
    rcode: str | None = None
    answers: tuple[str, ...] = ()
    # Wall-clock time the probe started, seconds since the epoch.
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.SUCCESS


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


def _normalise(rdtype: int, value: str) -> str:
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    return value.lower().rstrip(".")


def evaluate(
    query: Query, response: dns.message.Message, protocol: Protocol
) -> tuple[Outcome, str, tuple[str, ...]]:
    """Judge a response to `query`: outcome, reason, and the answer values of the asked type.

    Pure: passes when the rcode is NOERROR, the answer section holds at least one record
    of the asked type, and every expected value is among them. A UDP response with TC set
    is `truncated` whatever else it holds: a client would have to retry over TCP.
    """
    rdtype = _rdtype(query.rdtype)
    answers = tuple(
        rdata.to_text()
        for rrset in response.answer
        if rrset.rdtype == rdtype
        for rdata in rrset
    )
    if protocol is Protocol.UDP and response.flags & dns.flags.TC:
        reason = "response truncated (TC set): clients must retry over TCP"
        return Outcome.TRUNCATED, reason, answers
    rcode = response.rcode()
    if rcode != dns.rcode.NOERROR:
        return Outcome.RCODE, f"rcode {dns.rcode.to_text(rcode)}", answers
    if not answers:
        return (
            Outcome.WRONG_ANSWER,
            f"NOERROR but no {query.rdtype} record in the answer section",
            answers,
        )
    got = {_normalise(rdtype, a) for a in answers}
    missing = [e for e in query.expect if _normalise(rdtype, e) not in got]
    if missing:
        return (
            Outcome.WRONG_ANSWER,
            f"expected {', '.join(missing)} in the answer, got {', '.join(answers)}",
            answers,
        )
    return Outcome.SUCCESS, f"NOERROR, {query.rdtype} {', '.join(answers)}", answers


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _unreachable_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "port unreachable (connection refused)"
    return f"unreachable: {exc.strerror or exc}"


async def probe(
    host: str,
    port: int,
    protocol: Protocol,
    query: Query,
    timeout: float,
    trace: list[str] | None = None,
) -> ProbeResult:
    """Send `query` to `host`:`port` over `protocol` and judge the answer.

    Never raises for anything the network or the server does; cancellation propagates.
    `trace`, when given, receives the probe's log lines.
    """
    log = _Trace(trace)
    started_at = time.time()
    qid, wire = build_query(query)
    if log:
        log(
            f"sending {query.rdtype} {query.qname} id={qid} to {host} port {port} "
            f"over {protocol}, timeout {timeout:g}s"
        )
    try:
        family = _family(host)
    except ValueError:
        return ProbeResult(Outcome.ERROR, f"not an IP address: {host!r}", started_at=started_at)
    try:
        sock = socket.socket(
            family, socket.SOCK_DGRAM if protocol is Protocol.UDP else socket.SOCK_STREAM
        )
    except OSError as exc:  # out of file descriptors, most likely: say so, do not crash
        return ProbeResult(Outcome.ERROR, f"cannot open a socket: {exc}", started_at=started_at)
    sock.setblocking(False)
    ignored: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            if protocol is Protocol.UDP:
                response, rtt = await _exchange_udp(sock, host, port, wire, log, ignored)
            else:
                response, rtt = await _exchange_tcp(sock, host, port, wire, log, ignored)
    except TimeoutError:
        reason = f"no response within {timeout:g}s"
        if ignored:
            reason += f" (ignored {len(ignored)} non-matching datagram(s): {ignored[-1]})"
        log(reason)
        return ProbeResult(Outcome.TIMEOUT, reason, started_at=started_at)
    except OSError as exc:
        reason = _unreachable_reason(exc)
        log(reason)
        if isinstance(exc, ConnectionRefusedError) or exc.errno in _UNREACHABLE_ERRNOS:
            return ProbeResult(Outcome.UNREACHABLE, reason, started_at=started_at)
        return ProbeResult(Outcome.ERROR, f"socket error: {exc}", started_at=started_at)
    except _MalformedResponse as exc:
        log(str(exc))
        return ProbeResult(Outcome.ERROR, str(exc), rtt_seconds=exc.rtt, started_at=started_at)
    finally:
        sock.close()
    outcome, reason, answers = evaluate(query, response, protocol)
    if log:
        log(
            f"response after {rtt * 1000:.3f}ms: rcode {dns.rcode.to_text(response.rcode())}, "
            f"flags {dns.flags.to_text(response.flags)}, {len(response.answer)} answer RRset(s)"
        )
        for rrset in response.answer:
            log(f"  answer: {rrset.to_text()}")
        log(f"outcome {outcome}: {reason}")
    return ProbeResult(
        outcome,
        reason,
        rtt_seconds=rtt,
        rcode=dns.rcode.to_text(response.rcode()),
        answers=answers,
        started_at=started_at,
    )


_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EHOSTDOWN}
)


class _MalformedResponse(Exception):
    def __init__(self, message: str, rtt: float) -> None:
        super().__init__(message)
        self.rtt = rtt


# Rcodes with which a server may omit the question (as dnspython's is_response allows).
_QUESTIONLESS_RCODES = frozenset(
    {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}
)


def _parse(
    data: bytes, query: bytes, rtt: float, log: _Trace, ignored: list[str]
) -> dns.message.Message | None:
    """The response if `data` answers `query` (both wire form); None if it is someone else's.

    A datagram whose ID differs, or that is not a response, is ignored: it is stray or
    spoofed. One that does not echo our question is ignored too, as resolvers do. One
    with our ID that does not parse is the server's fault and fails the probe. The
    header and question are compared as bytes first, so only a real answer is parsed.
    """
    note = None
    if len(data) < 2 or data[:2] != query[:2]:
        note = f"{len(data)}-byte datagram with a different ID"
    elif len(data) >= 12 and not data[2] & 0x80:
        note = "datagram with our ID that is not a response"
    elif len(data) >= 12:
        question = query[12:]
        qdcount = data[4:6]
        if qdcount == b"\0\0":
            if data[3] & 0x0F not in _QUESTIONLESS_RCODES:
                note = "response without a question"
        elif qdcount != b"\0\1" or data[12 : 12 + len(question)].lower() != question.lower():
            note = "response whose question does not match the query"
    if note is not None:
        ignored.append(note)
        if log:
            log(f"ignored {note}")
        return None
    try:
        return dns.message.from_wire(data)
    except dns.exception.DNSException as exc:
        raise _MalformedResponse(f"malformed response: {exc}", rtt) from exc


async def _exchange_udp(
    sock: socket.socket,
    host: str,
    port: int,
    wire: bytes,
    log: _Trace,
    ignored: list[str],
) -> tuple[dns.message.Message, float]:
    loop = asyncio.get_running_loop()
    # connect() on UDP only sets the peer: the kernel then drops datagrams from other
    # sources and reports ICMP port-unreachable on the next receive.
    sock.connect((host, port))
    t0 = time.perf_counter()
    sock.send(wire)
    while True:
        data = await loop.sock_recv(sock, _MAX_MESSAGE)
        rtt = time.perf_counter() - t0
        response = _parse(data, wire, rtt, log, ignored)
        if response is not None:
            return response, rtt


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise _Closed(len(buf), n)
        buf += chunk
    return bytes(buf)


class _Closed(Exception):
    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"connection closed after {got} of {wanted} bytes")


async def _exchange_tcp(
    sock: socket.socket,
    host: str,
    port: int,
    wire: bytes,
    log: _Trace,
    ignored: list[str],
) -> tuple[dns.message.Message, float]:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    await loop.sock_connect(sock, (host, port))
    if log:
        log(f"connected after {(time.perf_counter() - t0) * 1000:.3f}ms")
    await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
    try:
        while True:
            (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
            data = await _recv_exactly(loop, sock, length)
            rtt = time.perf_counter() - t0
            response = _parse(data, wire, rtt, log, ignored)
            if response is not None:
                return response, rtt
    except _Closed as exc:
        raise _MalformedResponse(
            f"server closed the TCP connection before a full response ({exc})",
            time.perf_counter() - t0,
        ) from exc
