"""One DNS exchange over a byte stream that is not a socket of ours (the API
server's port-forward): the length-prefixed TCP framing, the timeout, the checks of the
answer, as a direct TCP probe does them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
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
from .wire import _mismatch, _rcode_text, _rdtype, build_query, evaluate, read_response


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


