"""The Alertmanager webhook endpoint: token (503 without one), 401, 413, bounded
concurrency, a body read in bounded time, 400 for a bad payload, then the remediator's
decisions.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..remediation.alerts import MAX_BODY, PayloadError, parse_payload
from ..remediation.remediator import ApiUnavailable
from .auth import authorized
from .state import STATE, AppState

log = logging.getLogger(__name__)


# Seconds a webhook client has to send its whole body (Alertmanager sends it at once).
BODY_TIMEOUT = 10.0
# Seconds a request waits for the exporter to decide its mode (and so to have a
# remediator) before it is answered 503, for Alertmanager to retry.
MODE_WAIT = 10.0


async def webhook_handler(request: web.Request) -> web.Response:
    """Alertmanager's webhook: 503 (no token), 401, 413, 400, then a decision per alert."""
    state = request.app[STATE]
    token = state.token.current()
    if token is None:
        state.token.tell_once()
        return web.Response(status=503, text=f"webhook disabled: {state.token.problem}\n")
    if not authorized(request.headers.get("Authorization", ""), token):
        return web.Response(status=401, text="unauthorized: a valid bearer token is required\n",
                            headers={"WWW-Authenticate": 'Bearer realm="webhook"'})
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _too_large()
    busy = state.webhook.refuse()
    if busy is not None:
        return busy
    with state.webhook.held():
        return await _webhook(request, state)


def _too_large() -> web.Response:
    return web.Response(status=413, text=f"body larger than {MAX_BODY} bytes\n")


async def _webhook(request: web.Request, state: AppState) -> web.Response:
    try:
        # A client that trickles its body must not hold a handler (and its memory) open.
        body = await asyncio.wait_for(request.read(), timeout=BODY_TIMEOUT)
    except web.HTTPRequestEntityTooLarge:
        return _too_large()
    except TimeoutError:
        log.warning("webhook: body not received in time", extra={"fields": {
            "remote": request.remote, "timeout_seconds": BODY_TIMEOUT}})
        return web.Response(status=408, text=f"body not received within {BODY_TIMEOUT:g}s\n",
                            headers={"Connection": "close"})
    try:
        payload = parse_payload(body)
    except PayloadError as exc:
        log.warning("webhook: bad payload", extra={"fields": {"error": str(exc)}})
        return web.Response(status=400, text=f"bad Alertmanager payload: {exc}\n")
    # The remediator exists once the exporter has decided how it reaches CoreDNS.
    parts = await state.parts.wait(MODE_WAIT)
    if parts is None:
        log.warning("webhook: answering 503 until the exporter has decided how it reaches "
                    "CoreDNS", extra={"fields": {"waited_seconds": MODE_WAIT}})
        return web.Response(status=503, text="Kubernetes API unavailable: the exporter has not "
                            "yet decided how it reaches CoreDNS (see its log: mode)\n")
    try:
        decisions = await parts.remediator.handle(payload)
    except ApiUnavailable as exc:
        log.warning("webhook: Kubernetes API unavailable; answering 503 so that "
                    "Alertmanager retries", extra={"fields": {"error": str(exc)}})
        return web.Response(status=503, text=f"Kubernetes API unavailable: {exc}\n")
    except Exception as exc:  # a bug must not take the exporter down; say it plainly
        log.exception("webhook: internal error")
        return web.Response(status=500, text=f"internal error: {exc!r}\n")
    return web.json_response({"decisions": [
        {"pod": d.pod, "namespace": d.namespace, "alert": d.alert, "action": d.action.value,
         "result": d.result, "message": d.message, "trigger": d.trigger}
        for d in decisions
    ]})



