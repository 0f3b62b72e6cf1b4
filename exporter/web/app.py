"""The HTTP application: the routes, /metrics and the health endpoints. The composition
root (root.py) builds the state and the background work; this module only serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..remediation.alerts import MAX_BODY
from .access import WebAccess
from .probe import probe_handler
from .state import STATE, AppState
from .status import status_page
from .webhook import webhook_handler


def build(state: AppState,
          background: Callable[[web.Application], AsyncIterator[None]],
          access: WebAccess | None = None) -> web.Application:
    """The application over `state`; `background` runs for as long as it serves;
    `access` (--web-config-file) sees every request first and adds its headers to every
    response."""
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[access.middleware] if access else [])
    if access is not None:
        app.on_response_prepare.append(access.on_prepare)
    app[STATE] = state
    app.cleanup_ctx.append(background)
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/probe", probe_handler)
    app.router.add_post("/webhook/alertmanager", webhook_handler)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    """Streamed: the body of a large cluster is megabytes, rendered between probes."""
    exposition = request.app[STATE].exposition
    accept = request.headers.get("Accept", "")
    response = web.StreamResponse(headers={"Content-Type": exposition.content_type(accept)})
    await response.prepare(request)
    async for chunk in exposition.stream(accept):
        await response.write(chunk)
    await response.write_eof()
    return response


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="Healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[STATE].ready:
        return web.Response(text="Ready.\n")
    return web.Response(status=503, text="Not ready: target discovery has not synced yet.\n")
