"""DNS over TCP through the API server's port-forward to a pod, for `--mode port-forward`.

The exporter runs where neither pod IPs nor NodePorts are reachable, but the API server
is. `pods/portforward` over a WebSocket (subprotocol `v4.channel.k8s.io`, as kubectl's
fallback and the official clients speak it): every message starts with a channel byte,
channel 0 carries the data and channel 1 the errors of the one forwarded port, and each
channel's first message is the port number (2 bytes, little endian). The API server
passes the stream to the kubelet of the pod's node, which connects to the port inside
the pod's network namespace.

Only TCP can be forwarded: these targets are probed over TCP alone (`protocol="tcp"`),
and the log says so when the mode is chosen. A UDP-only outage is invisible here.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from .. import kube
from ..dns.stream import StreamError, probe_stream
from ..model import Check, Outcome, ProbeResult

log = logging.getLogger(__name__)

SUBPROTOCOL = "v4.channel.k8s.io"
_DATA, _ERROR = 0, 1


class _Channel:
    """The data channel of one forwarded port, as a probe.Stream."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, where: str) -> None:
        self._ws = ws
        self._where = where
        self._prefix = {_DATA: 2, _ERROR: 2}  # port-number bytes still to skip, per channel
        self._error = b""

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(bytes([_DATA]) + data)
        except (aiohttp.ClientError, ConnectionError) as exc:
            # The kubelet's side ended the stream before our query went out: when the
            # runtime could not connect to the port, it said why on the error channel.
            raise await self._ended_early(exc) from exc

    async def receive(self) -> bytes:
        while True:
            data = self._take(await self._ws.receive())
            if data is not None:
                return data

    def _take(self, message: aiohttp.WSMessage) -> bytes | None:
        """The data a message carries (b"" once the stream has ended), None for nothing
        to return yet; StreamError when the error channel speaks."""
        if message.type is aiohttp.WSMsgType.BINARY:
            data: bytes = message.data
            if not data or data[0] not in self._prefix:
                return None  # a channel this port does not have: ignore, as the kubelet does
            channel, payload = data[0], data[1:]
            skip = min(self._prefix[channel], len(payload))
            self._prefix[channel] -= skip
            payload = payload[skip:]
            if not payload:
                return None
            if channel == _DATA:
                return payload
            self._error += payload
            text = self._error.decode("utf-8", errors="replace").strip()
            raise StreamError(Outcome.UNREACHABLE, f"port-forward to {self._where}: {text}")
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.CLOSED):
            return b""
        if message.type is aiohttp.WSMsgType.ERROR:
            raise StreamError(Outcome.ERROR,
                              f"port-forward to {self._where}: {self._ws.exception()}")
        return None

    async def _ended_early(self, exc: BaseException) -> StreamError:
        """Why the stream ended before the query could be written: the error channel's
        message when one arrived, else the write's own failure."""
        try:
            async with asyncio.timeout(1):
                while True:
                    if self._take(await self._ws.receive()) == b"":
                        break
        except StreamError as said:
            return said
        except (TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
            pass
        return StreamError(Outcome.UNREACHABLE, f"port-forward to {self._where}: the stream "
                                                f"ended before the query was sent ({exc!r})")

    async def close(self) -> None:
        await self._ws.close()


class PortForward:
    """Opens one port-forward per probe (a probe's failure stays its own)."""

    def __init__(self, client: kube.Client) -> None:
        self._client = client
        self._session: aiohttp.ClientSession | None = None

    async def probe(self, check: Check, timeout: float) -> ProbeResult:
        target = check.target
        return await probe_stream(
            lambda: self._open(target.namespace, target.pod, target.endpoint.port),
            check.query, timeout,
        )

    async def _open(self, namespace: str, pod: str, port: int) -> _Channel:
        where = f"pod {namespace}/{pod} port {port}"
        # In a thread: refreshing the credentials may run an exec plugin (DESIGN.md: the
        # sync client never runs on the event loop).
        url, context, headers = await asyncio.to_thread(
            self._client.stream_endpoint,
            f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward?ports={port}")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            ws = await self._session.ws_connect(
                url, protocols=(SUBPROTOCOL,), headers=headers,
                ssl=context if context is not None else True, autoping=True,
            )
        except aiohttp.WSServerHandshakeError as exc:
            reason = {403: "forbidden: grant 'get' and 'create' on pods/portforward",
                      404: "no such pod"}.get(exc.status, exc.message)
            raise StreamError(Outcome.ERROR, f"the API server refused the port-forward to "
                                             f"{where}: HTTP {exc.status}: {reason}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise StreamError(Outcome.ERROR, f"cannot open a port-forward to {where}: "
                                             f"cannot reach the API server: {exc}") from exc
        return _Channel(ws, where)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
