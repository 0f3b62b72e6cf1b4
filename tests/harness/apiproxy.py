"""A fault injector in front of the real API server, for the reliability tests.

It serves HTTPS with the API server's own certificate (so clients verify it as the API
server) and forwards every request, watches streamed, to the real kube-apiserver. A test
flips what it does to the next requests:

- `delay`: seconds to wait before forwarding (a slow API server);
- `throttle`: a predicate on (method, path); matching requests get what an API server
  under API Priority and Fairness sends, 429 with a Status body and Retry-After;
- `down`: every request's connection is closed unanswered, and open watches are cut;
- `hold`: a predicate; matching requests wait until `release()` (a request in flight when
  a test kills the client), and `held` tells when one arrived.

Runs on an event loop in a thread of its own; `address` is where it listens (loopback).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from .cluster import Cluster

Match = Callable[[str, str], bool]
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class ApiProxy:
    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self.delay = 0.0
        self.throttle: Match | None = None
        self.down = False
        self.hold: Match | None = None
        self.held = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self._release = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._cuts: set[web.StreamResponse] = set()
        self.address = ""
        threading.Thread(target=self._run, daemon=True, name="apiproxy").start()
        if not self._started.wait(10):
            raise RuntimeError("the API proxy did not start")

    def release(self) -> None:
        self._release.set()

    def set_down(self, down: bool) -> None:
        self.down = down
        if down:  # cut open watches too, as a dead server's connections end
            for response in list(self._cuts):
                self._loop.call_soon_threadsafe(self._cut, response)

    @staticmethod
    def _cut(response: web.StreamResponse) -> None:
        task = response.task
        if task is not None:
            task.cancel()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        pki: Path = self._cluster.pki
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(pki / "apiserver.crt", pki / "apiserver.key")
        client_tls = ssl.create_default_context(cafile=str(self._cluster.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_tls),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        app = web.Application(client_max_size=16 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._forward)
        runner = self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.address = f"{host}:{port}"
        self._started.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, request.path
        self.requests.append((method, path))
        if self.down:
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("API proxy: down")
        if self.throttle is not None and self.throttle(method, path):
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429,
                 "reason": "TooManyRequests",
                 "message": "too many requests, please try again later"},
                status=429, headers={"Retry-After": "1"})
        body = await request.read()  # whole, before a hold: the client may be gone after
        if self.hold is not None and self.hold(method, path):
            self.held.set()
            await asyncio.to_thread(self._release.wait, 60)
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = f"{self._cluster.server}{request.path_qs}"
        async with self._session.request(method, url, headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP})
            await response.prepare(request)
            self._cuts.add(response)
            try:
                async for chunk in upstream.content.iter_any():
                    if self.down:
                        break
                    await response.write(chunk)
            finally:
                self._cuts.discard(response)
            await response.write_eof()
            return response

    def stop(self) -> None:
        self._release.set()
        self.set_down(True)  # cut open watches: nothing holds the shutdown

        async def close() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

