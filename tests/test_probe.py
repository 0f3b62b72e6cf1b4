"""The probe engine against real CoreDNS servers: every outcome, over UDP and TCP.

Stray and spoofed datagrams come from a small UDP peer in the test itself, since no
honest DNS server sends them; everything else is a real CoreDNS process.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from exporter.dns.engine import probe, start_probe
from exporter.dns.wire import Response, _read_fast, evaluate, read_response
from exporter.model import Outcome, ProbeResult, Protocol, Query
from tests.conftest import StartDNS
from tests.harness.coredns import (
    ERRATIC_IP,
    KUBERNETES_IP,
    KUBERNETES_NAME,
    WRONG_IP,
    Behaviour,
    CoreDNS,
)

KUBERNETES = Query("kubernetes", KUBERNETES_NAME + ".", "A", (KUBERNETES_IP,))
ANY_A = Query("kubernetes", KUBERNETES_NAME + ".", "A")
BOTH = list(Protocol)


@pytest.mark.parametrize("protocol", BOTH)
async def test_healthy_server_passes_with_the_expected_answer(
    healthy_dns: CoreDNS, protocol: Protocol
) -> None:
    result = await probe(healthy_dns.host, healthy_dns.port, protocol, KUBERNETES, 1.0)
    assert result.outcome is Outcome.SUCCESS, result.reason
    assert result.rcode == "NOERROR"
    assert result.answers == (KUBERNETES_IP,)
    assert result.rtt_seconds is not None and 0 < result.rtt_seconds < 1.0


@pytest.mark.parametrize("protocol", BOTH)
async def test_wrong_answer_is_reported_with_what_came_back(
    start_dns: StartDNS, protocol: Protocol
) -> None:
    server = start_dns(Behaviour.WRONG_ANSWER)
    result = await probe(server.host, server.port, protocol, KUBERNETES, 1.0)
    assert result.outcome is Outcome.WRONG_ANSWER
    assert KUBERNETES_IP in result.reason and WRONG_IP in result.reason
    assert result.answers == (WRONG_IP,)


async def test_without_expectation_any_record_of_the_type_passes(start_dns: StartDNS) -> None:
    server = start_dns(Behaviour.WRONG_ANSWER)
    result = await probe(server.host, server.port, Protocol.UDP, ANY_A, 1.0)
    assert result.outcome is Outcome.SUCCESS


@pytest.mark.parametrize("protocol", list(Protocol))
async def test_latency_is_the_round_trip_not_the_event_loop_delay(
    healthy_dns: CoreDNS, protocol: Protocol
) -> None:
    """The kernel stamps the response when it arrives: a loop blocked meanwhile (by a big
    scrape, say) delays reading it, not the latency reported."""
    await probe(healthy_dns.host, healthy_dns.port, protocol, KUBERNETES, 1.0)  # warm up
    task = asyncio.create_task(
        probe(healthy_dns.host, healthy_dns.port, protocol, KUBERNETES, 1.0)
    )
    blocked = 0.2
    loop = asyncio.get_running_loop()
    # Block the loop once the probe has sent its query (UDP) or started to connect (TCP);
    # CoreDNS, another process, answers meanwhile.
    loop.call_soon(lambda: loop.call_soon(time.sleep, blocked))
    t0 = time.perf_counter()
    result = await task
    assert time.perf_counter() - t0 >= blocked
    assert result.ok, result.reason
    assert result.rtt_seconds is not None and result.rtt_seconds < blocked / 2


async def test_nodata_is_a_wrong_answer(healthy_dns: CoreDNS) -> None:
    aaaa = Query("kubernetes/AAAA", KUBERNETES_NAME + ".", "AAAA")
    result = await probe(healthy_dns.host, healthy_dns.port, Protocol.UDP, aaaa, 1.0)
    assert result.outcome is Outcome.WRONG_ANSWER
    assert result.rcode == "NOERROR"
    assert "no AAAA record" in result.reason


@pytest.mark.parametrize(
    ("behaviour", "rcode"), [(Behaviour.SERVFAIL, "SERVFAIL"), (Behaviour.NXDOMAIN, "NXDOMAIN")]
)
@pytest.mark.parametrize("protocol", BOTH)
async def test_error_rcodes_fail_as_rcode(
    start_dns: StartDNS, behaviour: Behaviour, rcode: str, protocol: Protocol
) -> None:
    server = start_dns(behaviour)
    result = await probe(server.host, server.port, protocol, KUBERNETES, 1.0)
    assert result.outcome is Outcome.RCODE
    assert result.rcode == rcode
    assert rcode in result.reason


async def test_truncated_udp_response_is_truncated(start_dns: StartDNS) -> None:
    server = start_dns(Behaviour.TRUNCATE)
    result = await probe(server.host, server.port, Protocol.UDP, ANY_A, 1.0)
    assert result.outcome is Outcome.TRUNCATED
    assert "TC" in result.reason
    # Over TCP the same server's answer is whole and judged on its content.
    tcp = await probe(server.host, server.port, Protocol.TCP, ANY_A, 1.0)
    assert tcp.outcome is Outcome.SUCCESS
    assert tcp.answers == (ERRATIC_IP,)


@pytest.mark.parametrize("protocol", BOTH)
async def test_answer_slower_than_the_timeout_is_a_timeout(
    start_dns: StartDNS, protocol: Protocol
) -> None:
    server = start_dns(Behaviour.SLOW, delay="1500ms")
    result = await probe(server.host, server.port, protocol, ANY_A, 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert result.rtt_seconds is None
    assert "0.3s" in result.reason


async def test_answer_just_under_the_timeout_passes(start_dns: StartDNS) -> None:
    server = start_dns(Behaviour.SLOW, delay="200ms")
    result = await probe(server.host, server.port, Protocol.UDP, ANY_A, 1.0)
    assert result.outcome is Outcome.SUCCESS
    assert result.rtt_seconds is not None and result.rtt_seconds >= 0.2


@pytest.mark.parametrize("protocol", BOTH)
async def test_closed_port_is_unreachable_not_a_timeout(
    healthy_dns: CoreDNS, protocol: Protocol
) -> None:
    # Same address as a live server, a port nobody listens on: ICMP port-unreachable for
    # UDP, RST for TCP, both answered at once by the kernel.
    result = await probe(healthy_dns.host, healthy_dns.port + 1, protocol, ANY_A, 1.0)
    assert result.outcome is Outcome.UNREACHABLE
    assert "refused" in result.reason


@pytest.mark.parametrize("protocol", BOTH)
async def test_cancelled_probe_closes_its_socket_and_reports_nothing(
    peer: PeerFactory, protocol: Protocol
) -> None:
    """A probe abandoned mid-flight (shutdown, a removed target) leaves no socket behind
    and never calls back."""
    host, port = await peer(lambda query: [])  # a UDP peer that never answers
    if protocol is Protocol.TCP:
        listener = socket.create_server((host, 0))  # accepts, never answers
        port = listener.getsockname()[1]
    # The loop's UDP poller (one epoll set, made by its first UDP probe) is not a probe's.
    await probe(host, port, Protocol.UDP, KUBERNETES, 0.01)
    fds = len(os.listdir("/proc/self/fd"))
    results: list[ProbeResult] = []
    handle = start_probe(host, port, protocol, KUBERNETES, 5.0, results.append)
    task = asyncio.create_task(probe(host, port, protocol, KUBERNETES, 5.0))
    await asyncio.sleep(0)  # the task starts its probe; nothing will answer either
    assert len(os.listdir("/proc/self/fd")) == fds + 2
    handle.cancel()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the cancelled TCP task runs its cleanup
    assert handle.finished and results == []
    assert len(os.listdir("/proc/self/fd")) == fds
    if protocol is Protocol.TCP:
        listener.close()


async def test_invalid_host_is_an_error_not_an_exception() -> None:
    result = await probe("not-an-ip", 53, Protocol.UDP, ANY_A, 0.5)
    assert result.outcome is Outcome.ERROR


async def test_trace_records_the_exchange(healthy_dns: CoreDNS) -> None:
    trace: list[str] = []
    await probe(healthy_dns.host, healthy_dns.port, Protocol.UDP, KUBERNETES, 1.0, trace=trace)
    text = "\n".join(trace)
    assert "sending A kubernetes.default.svc.cluster.local." in text
    assert "outcome success" in text


# --- stray, spoofed and malformed datagrams, from a UDP peer the test controls ---

Reply = Callable[[bytes], list[bytes]]


class _Peer(asyncio.DatagramProtocol):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for datagram in self.reply(data):
            self.transport.sendto(datagram, addr)


PeerFactory = Callable[[Reply], Awaitable[tuple[str, int]]]


@pytest.fixture
async def peer() -> AsyncIterator[PeerFactory]:
    transports: list[asyncio.DatagramTransport] = []

    async def start(reply: Reply) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Peer(reply), local_addr=("127.0.0.1", 0), family=socket.AF_INET
        )
        transports.append(transport)
        host, port = transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    yield start
    for transport in transports:
        transport.close()


def _answer(query_wire: bytes, ip: str = KUBERNETES_IP, qname: str | None = None) -> bytes:
    query = dns.message.from_wire(query_wire)
    response = dns.message.make_response(query)
    name = qname or query.question[0].name.to_text()
    response.answer.append(dns.rrset.from_text(name, 5, "IN", "A", ip))
    if qname:
        response.question[0] = dns.rrset.RRset(
            dns.name.from_text(qname), query.question[0].rdclass, query.question[0].rdtype
        )
    return response.to_wire()


def _with_id(wire: bytes, new_id: int) -> bytes:
    return struct.pack("!H", new_id) + wire[2:]


async def test_wrong_id_is_ignored_and_the_real_answer_accepted(peer: PeerFactory) -> None:
    def reply(query: bytes) -> list[bytes]:
        (qid,) = struct.unpack("!H", query[:2])
        spoofed = _with_id(_answer(query, WRONG_IP), (qid + 1) % 65536)
        return [spoofed, _answer(query)]

    host, port = await peer(reply)
    result = await probe(host, port, Protocol.UDP, KUBERNETES, 1.0)
    assert result.outcome is Outcome.SUCCESS
    assert result.answers == (KUBERNETES_IP,)


async def test_only_spoofed_datagrams_time_out_and_say_so(peer: PeerFactory) -> None:
    def reply(query: bytes) -> list[bytes]:
        (qid,) = struct.unpack("!H", query[:2])
        return [_with_id(_answer(query), (qid + 1) % 65536)]

    host, port = await peer(reply)
    result = await probe(host, port, Protocol.UDP, KUBERNETES, 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert "ignored 1 non-matching datagram" in result.reason


async def test_response_to_another_question_is_ignored(peer: PeerFactory) -> None:
    def reply(query: bytes) -> list[bytes]:
        return [_answer(query, WRONG_IP, qname="evil.example.")]

    host, port = await peer(reply)
    result = await probe(host, port, Protocol.UDP, KUBERNETES, 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert "question does not match" in result.reason


async def test_echoed_query_is_not_taken_for_a_response(peer: PeerFactory) -> None:
    host, port = await peer(lambda query: [query])
    result = await probe(host, port, Protocol.UDP, KUBERNETES, 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert "not a response" in result.reason


async def test_malformed_response_with_our_id_is_an_error(peer: PeerFactory) -> None:
    def reply(query: bytes) -> list[bytes]:
        return [query[:2] + b"\x81\x80\x00\x01\x00\x05"]  # header cut short

    host, port = await peer(reply)
    result = await probe(host, port, Protocol.UDP, KUBERNETES, 1.0)
    assert result.outcome is Outcome.ERROR
    assert "malformed" in result.reason


# --- a TCP peer that writes its answer as a slow or broken server would ---

# The pieces to write, then the connection is closed; None: close now; b"": keep it open
# until the client closes it.
TcpReply = Callable[[bytes], list[bytes | None]]


@pytest.fixture
async def tcp_peer() -> AsyncIterator[Callable[[TcpReply], Awaitable[tuple[str, int]]]]:
    servers: list[asyncio.Server] = []

    async def start(reply: TcpReply) -> tuple[str, int]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            for piece in reply(await reader.readexactly(length)):
                if piece is None:
                    break
                if not piece:
                    await reader.read()  # the client's close
                    break
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)  # a slow server: each piece its own segment
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return "127.0.0.1", int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _framed(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


async def test_tcp_answer_in_pieces_after_a_stranger_is_read_whole(
    tcp_peer: Callable[[TcpReply], Awaitable[tuple[str, int]]],
) -> None:
    def reply(query: bytes) -> list[bytes | None]:
        (qid,) = struct.unpack("!H", query[:2])
        stranger = _framed(_with_id(_answer(query, WRONG_IP), (qid + 1) % 65536))
        ours = _framed(_answer(query))
        # The stranger and the first byte of our length together, then the rest of the
        # length, then our answer in two.
        return [stranger + ours[:1], ours[1:2], ours[2:9], ours[9:]]

    host, port = await tcp_peer(reply)
    trace: list[str] = []
    result = await probe(host, port, Protocol.TCP, KUBERNETES, 2.0, trace=trace)
    assert result.outcome is Outcome.SUCCESS, result.reason
    assert result.answers == (KUBERNETES_IP,)
    assert any("ignored" in line for line in trace)
    assert result.rtt_seconds is not None and result.rtt_seconds >= 0.02  # the 3 pauses


async def test_tcp_server_closing_mid_answer_is_an_error_that_says_where(
    tcp_peer: Callable[[TcpReply], Awaitable[tuple[str, int]]],
) -> None:
    def reply(query: bytes) -> list[bytes | None]:
        ours = _framed(_answer(query))
        return [ours[:10], None]

    host, port = await tcp_peer(reply)
    result = await probe(host, port, Protocol.TCP, KUBERNETES, 2.0)
    assert result.outcome is Outcome.ERROR
    assert "closed the TCP connection before a full response" in result.reason
    assert "after 8 of" in result.reason


async def test_tcp_server_that_never_answers_times_out(
    tcp_peer: Callable[[TcpReply], Awaitable[tuple[str, int]]],
) -> None:
    host, port = await tcp_peer(lambda query: [b"\x00", b""])  # half a length, then nothing
    started = time.perf_counter()
    result = await probe(host, port, Protocol.TCP, KUBERNETES, 0.3)
    assert result.outcome is Outcome.TIMEOUT
    assert time.perf_counter() - started >= 0.3


# --- evaluate(), the pure judgement ---


def _message(
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR, ips: tuple[str, ...] = (), tc: bool = False
) -> dns.message.Message:
    query = dns.message.make_query(KUBERNETES_NAME, "A")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if ips:
        response.answer.append(dns.rrset.from_text(KUBERNETES_NAME + ".", 5, "IN", "A", *ips))
    if tc:
        response.flags |= dns.flags.TC
    return response


def _response(
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR, ips: tuple[str, ...] = (), tc: bool = False
) -> Response:
    return _read(_message(rcode, ips, tc), "A")


def _read(message: dns.message.Message, rdtype: str) -> Response:
    return read_response(message.to_wire(), dns.rdatatype.from_text(rdtype))


def test_evaluate_requires_every_expected_value() -> None:
    query = Query("q", KUBERNETES_NAME + ".", "A", ("10.0.0.1", "10.0.0.2"))
    outcome, reason, _ = evaluate(query, _response(ips=("10.0.0.1",)), Protocol.UDP)
    assert outcome is Outcome.WRONG_ANSWER and "10.0.0.2" in reason
    outcome, _, answers = evaluate(query, _response(ips=("10.0.0.2", "10.0.0.1")), Protocol.UDP)
    assert outcome is Outcome.SUCCESS and set(answers) == {"10.0.0.1", "10.0.0.2"}


def test_evaluate_compares_addresses_not_spellings() -> None:
    query = Query("q", KUBERNETES_NAME + ".", "AAAA", ("2001:db8:0:0::1",))
    message = _message()
    message.answer.append(
        dns.rrset.from_text(KUBERNETES_NAME + ".", 5, "IN", "AAAA", "2001:db8::1")
    )
    assert evaluate(query, _read(message, "AAAA"), Protocol.UDP)[0] is Outcome.SUCCESS


def test_evaluate_tc_only_matters_over_udp() -> None:
    response = _response(ips=(KUBERNETES_IP,), tc=True)
    assert evaluate(KUBERNETES, response, Protocol.UDP)[0] is Outcome.TRUNCATED
    assert evaluate(KUBERNETES, response, Protocol.TCP)[0] is Outcome.SUCCESS


def test_evaluate_rcode_wins_over_answers() -> None:
    response = _response(rcode=dns.rcode.SERVFAIL, ips=(KUBERNETES_IP,))
    outcome, reason, _ = evaluate(KUBERNETES, response, Protocol.UDP)
    assert outcome is Outcome.RCODE and reason == "rcode SERVFAIL"


# --- read_response(): the fast path agrees with dnspython ---


def _corpus() -> list[bytes]:
    """Responses a server may send: the shapes CoreDNS uses and some it does not."""
    name = KUBERNETES_NAME + "."
    messages: list[dns.message.Message] = []

    def response(rdtype: str = "A", **kwargs: object) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
        message = dns.message.make_response(query)
        messages.append(message)
        return message

    response().answer.append(dns.rrset.from_text(name, 5, "IN", "A", KUBERNETES_IP))
    response().answer.append(dns.rrset.from_text(name, 5, "IN", "A", "10.0.0.1", "10.0.0.2"))
    chain = response()
    chain.answer.append(dns.rrset.from_text(name, 5, "IN", "CNAME", "other.example."))
    chain.answer.append(dns.rrset.from_text("other.example.", 5, "IN", "A", "10.0.0.3"))
    response("AAAA").answer.append(dns.rrset.from_text(name, 5, "IN", "AAAA", "2001:db8::1"))
    mixed = response()  # an AAAA in an A answer is not an answer
    mixed.answer.append(dns.rrset.from_text(name, 5, "IN", "AAAA", "2001:db8::2"))
    nx = response()
    nx.set_rcode(dns.rcode.NXDOMAIN)
    nx.authority.append(dns.rrset.from_text(
        "cluster.local.", 30, "IN", "SOA", "ns.dns.cluster.local. h.cluster.local. 1 2 3 4 5"
    ))
    glue = response()
    glue.answer.append(dns.rrset.from_text(name, 5, "IN", "A", KUBERNETES_IP))
    glue.authority.append(dns.rrset.from_text("cluster.local.", 5, "IN", "NS", "ns.cluster.local."))
    glue.additional.append(dns.rrset.from_text("ns.cluster.local.", 5, "IN", "A", "10.96.0.10"))
    edns = response(use_edns=0)
    edns.answer.append(dns.rrset.from_text(name, 5, "IN", "A", KUBERNETES_IP))
    badvers = response(use_edns=0)
    badvers.set_rcode(dns.rcode.BADVERS)
    padded = response(use_edns=0, pad=64)
    padded.answer.append(dns.rrset.from_text(name, 5, "IN", "A", KUBERNETES_IP))
    txt = response()
    txt.answer.append(dns.rrset.from_text(name, 5, "IN", "TXT", '"hello"'))
    chaos = response()
    chaos.answer.append(dns.rrset.from_text(name, 5, "CH", "A", "cluster.local. 1"))
    truncated = response()
    truncated.flags |= dns.flags.TC
    servfail = response()
    servfail.set_rcode(dns.rcode.SERVFAIL)
    servfail.question = []
    wires = [m.to_wire() for m in messages]
    header = bytes.fromhex("1234 8180 0001 0001 0000 0000")
    owner = dns.name.from_text(name).to_wire()
    assert owner is not None
    question = owner + b"\0\1\0\1"
    record = b"\0\1\0\1\0\0\0\5\0\4" + bytes([10, 96, 0, 1])
    # Uncompressed; then a pointer to itself, a pointer forwards, a refused label type.
    wires.append(header + question + owner + record)
    wires.append(header + question + b"\xc0\x28" + record)
    wires.append(header + question + b"\xc0\xff" + record)
    wires.append(header + question + b"\x40" + record)
    return wires


def _reference(wire: bytes, rdtype: int) -> Response:
    message = dns.message.from_wire(wire)
    answers = [r.to_text() for rs in message.answer if rs.rdtype == rdtype for r in rs]
    return Response(int(message.flags), int(message.rcode()), tuple(dict.fromkeys(answers)))


def _outcome(read: Callable[[bytes, int], Response], wire: bytes, rdtype: int) -> object:
    try:
        response = read(wire, rdtype)
    except dns.exception.DNSException:
        return "malformed"
    return response.flags, response.rcode, sorted(response.answers)


def test_fast_reader_agrees_with_dnspython_on_responses_and_their_corruptions() -> None:
    rng = random.Random(53)
    cases = 0
    for wire in _corpus():
        variants = [wire] + [wire[:cut] for cut in range(len(wire))]
        for _ in range(200):
            mutated = bytearray(wire)
            mutated[rng.randrange(len(wire))] = rng.randrange(256)
            variants.append(bytes(mutated))
        for variant in variants:
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                expected = _outcome(_reference, variant, rdtype)
                assert _outcome(read_response, variant, rdtype) == expected, variant.hex()
                cases += 1
    assert cases > 5000
    # And the fast path really reads what CoreDNS sends, rather than handing it on.
    corpus = _corpus()
    for wire in corpus[:8] + corpus[12:14]:
        assert _read_fast(wire, dns.rdatatype.A) is not None


def test_a_response_read_once_is_not_read_again_and_the_memory_of_it_is_bounded() -> None:
    """Responses that differ only in their ID are read once (the same Response comes
    back); the memo of them never outgrows its bound."""
    from exporter.dns import wire as wire_module

    first = _corpus()[0]
    response = read_response(first, dns.rdatatype.A)
    again = read_response(b"\xab\xcd" + first[2:], dns.rdatatype.A)
    assert again is response
    assert _outcome(read_response, first, dns.rdatatype.A) == _outcome(
        _reference, first, dns.rdatatype.A)
    for ttl in range(wire_module._READ_SIZE + 10):  # answers that always differ
        varied = first[:-10] + ttl.to_bytes(4, "big") + first[-6:]
        read_response(varied, dns.rdatatype.A)
        assert len(wire_module._READ) <= wire_module._READ_SIZE


async def test_probes_with_different_timeouts_each_time_out_on_their_own_deadline(
    peer: PeerFactory,
) -> None:
    """UDP deadlines are kept per timeout value: a short timeout started after a long one
    still expires first, and an answered probe in the same queue does not hold either up."""
    silent_host, silent_port = await peer(lambda query: [])
    answering_host, answering_port = await peer(lambda query: [_answer(query)])
    order: list[str] = []
    slow = asyncio.create_task(probe(silent_host, silent_port, Protocol.UDP, KUBERNETES, 2.0))
    slow.add_done_callback(lambda _: order.append("2s"))
    answered = await probe(answering_host, answering_port, Protocol.UDP, KUBERNETES, 2.0)
    quick = await probe(silent_host, silent_port, Protocol.UDP, KUBERNETES, 0.1)
    order.append("0.1s")
    assert answered.outcome is Outcome.SUCCESS
    assert quick.outcome is Outcome.TIMEOUT and "0.1s" in quick.reason
    result = await slow
    assert result.outcome is Outcome.TIMEOUT and "2s" in result.reason
    assert order == ["0.1s", "2s"]


async def test_a_probe_callback_that_raises_is_reported_and_other_probes_go_on(
    peer: PeerFactory,
) -> None:
    """A `done` that raises, on an answer or on a timeout, goes to the loop's exception
    handler; the probes after it are still answered and still time out."""
    silent = await peer(lambda query: [])
    answering = await peer(lambda query: [_answer(query)])
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))

    def boom(result: ProbeResult) -> None:
        raise RuntimeError(f"boom after {result.outcome}")

    start_probe(*answering, Protocol.UDP, KUBERNETES, 0.05, boom)
    start_probe(*silent, Protocol.UDP, KUBERNETES, 0.05, boom)
    answered: asyncio.Future[ProbeResult] = loop.create_future()
    timed_out: asyncio.Future[ProbeResult] = loop.create_future()
    start_probe(*answering, Protocol.UDP, KUBERNETES, 0.05, answered.set_result)
    start_probe(*silent, Protocol.UDP, KUBERNETES, 0.05, timed_out.set_result)
    assert (await asyncio.wait_for(answered, 2)).outcome is Outcome.SUCCESS
    assert (await asyncio.wait_for(timed_out, 2)).outcome is Outcome.TIMEOUT
    assert sorted(str(e) for e in reported) == ["boom after success", "boom after timeout"]
