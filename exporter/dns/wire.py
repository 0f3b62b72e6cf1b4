"""The DNS wire format: queries built once, responses read (a fast path for the
messages a healthy CoreDNS sends, dnspython for anything else), and the judgement of an
answer against what the query expects. No sockets here.
"""

from __future__ import annotations

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

from ..model import Outcome, Protocol, Query

# Largest DNS message over TCP (two-byte length prefix) and the UDP receive buffer.
_MAX_MESSAGE = 65535


class _Trace:
    """Collects a probe's log lines for `/probe?debug=true`; a no-op when not asked for."""

    __slots__ = ("_lines", "_t0", "enabled")

    def __init__(self, lines: list[str] | None) -> None:
        self._lines = lines
        self._t0 = time.perf_counter()
        # An attribute, not __bool__: probes test it on every step, thousands of times a
        # second.
        self.enabled = lines is not None

    def __call__(self, message: str) -> None:
        if self._lines is not None:
            elapsed_ms = (time.perf_counter() - self._t0) * 1000
            self._lines.append(f"{elapsed_ms:9.3f}ms {message}")


@functools.lru_cache(maxsize=4096)
def _template(qname: str, rdtype: str) -> bytes:
    message = dns.message.make_query(qname, rdtype)
    message.id = 0
    return message.to_wire()


class _RandomIds:
    """Query IDs from the system's random source, read 2,048 at a time: a fresh
    unpredictable ID for every probe, without a getrandom() call for each."""

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[int] = []

    def next(self) -> int:
        if not self._ids:
            self._ids = list(memoryview(os.urandom(4096)).cast("H"))
        return self._ids.pop()


_IDS = _RandomIds()


def build_query(query: Query) -> tuple[int, bytes]:
    """A fresh random ID and the query's wire form: recursion desired, no EDNS, as a stub
    resolver sends it. dnspython builds each distinct query once; a probe only stamps
    its ID into a copy, which keeps per-probe CPU low."""
    template = _template(query.qname, query.rdtype)
    qid = _IDS.next()
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
    key = (rdtype, wire[2:])  # all but the ID: a healthy server repeats the rest
    known = _READ.get(key)
    if known is not None:
        return known
    if rdtype in _FAST_TYPES:
        response = _read_fast(wire, rdtype)
        if response is None:
            response = _read_dnspython(wire, rdtype)
    else:
        response = _read_dnspython(wire, rdtype)
    if len(_READ) >= _READ_SIZE:
        _READ.clear()
    _READ[key] = response
    return response


# Responses read, by question type and every byte after the ID. Reading is a function of
# those bytes alone, and the same server sends the same answer thousands of times: a
# dictionary lookup instead of walking the records, for all but the first. Bounded: a
# server whose answers always differ (TTLs counting down) only refills it.
_READ: dict[tuple[int, bytes], Response] = {}
_READ_SIZE = 4096


def _read_dnspython(wire: bytes, rdtype: int) -> Response:
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
    if protocol is Protocol.UDP and response.flags & _TC:
        reason = "response truncated (TC set): clients must retry over TCP"
        return Outcome.TRUNCATED, reason, answers
    if response.rcode != _NOERROR:
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
    return Outcome.SUCCESS, _success_reason(query.rdtype, answers), answers


# Plain ints: comparing with dnspython's enums goes through enum's operators, per probe.
_TC = int(dns.flags.TC)
_NOERROR = int(dns.rcode.NOERROR)


@functools.lru_cache(maxsize=4096)
def _success_reason(rdtype: str, answers: tuple[str, ...]) -> str:
    return f"NOERROR, {rdtype} {', '.join(answers)}"


@functools.lru_cache(maxsize=4096)
def _rcode_text(rcode: int) -> str:
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))


# Rcodes with which a server may omit the question (as dnspython's is_response allows).
_QUESTIONLESS_RCODES = frozenset(
    {dns.rcode.FORMERR, dns.rcode.SERVFAIL, dns.rcode.NOTIMP, dns.rcode.REFUSED}
)


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

