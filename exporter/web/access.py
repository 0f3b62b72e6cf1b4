"""Who may talk to the exporter, from `--web-config-file` (web/webconfig.py): the TLS
server context, rebuilt when a certificate file changes, and the middleware that checks
basic auth and client certificates' SANs and sets the configured response headers, on
every endpoint.

Basic auth and the webhook: Alertmanager sends one Authorization header, which the
webhook's bearer token takes. So on `/webhook/alertmanager` the bearer token is the
authentication (checked by the webhook as always, 401 without it); TLS and client
certificates apply to it as to every endpoint. `/-/healthy` and `/-/ready` need no basic
auth either: the kubelet's probes cannot send any.

The file is looked at again on each request and each handshake (a stat): a changed file
is read and checked; a bad one is logged once and the last good one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import bcrypt
from aiohttp import web

from .auth import FileStamp, authorized_basic, file_stamp
from .webconfig import ClientAuth, TLSServer, WebConfig, WebConfigError, load

log = logging.getLogger(__name__)

WEBHOOK = "/webhook/alertmanager"
# Paths basic auth leaves alone: the webhook (its bearer token is its authentication) and
# the health endpoints (the kubelet's probes cannot authenticate; they tell only that the
# process lives and has synced).
NO_BASIC_AUTH = frozenset({WEBHOOK, "/-/healthy", "/-/ready"})
# bcrypt of "fakepassword" (cost 10): an unknown user costs as much as a wrong password,
# so the timing does not tell which users exist (the exporter-toolkit's trick).
_DUMMY = b"$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"
_CACHE = 100

Stamp = tuple[FileStamp | None, ...]


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    return tuple(file_stamp(path) for path in paths)


class WebAccess:
    """The configuration in force, reloaded when its file (or a certificate) changes."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self.config = load(self._path)  # WebConfigError at start: the exporter exits 2
        self._stamp = _stamp((self._path,))
        self._told = ""
        self._checked: OrderedDict[bytes, bool] = OrderedDict()
        self._bcrypt = asyncio.Lock()
        self._tls: TLSContext | None = None
        if self.config.tls is not None:
            try:
                self._tls = TLSContext(self.config.tls, self.current)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise WebConfigError(self._path, [
                    f"tls_server_config: the certificate, key or client CA cannot be "
                    f"loaded: {exc}"]) from exc

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._tls.context if self._tls else None

    def current(self) -> WebConfig:
        """The configuration, read again if its file changed since the last look."""
        stamp = _stamp((self._path,))
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                fresh = load(self._path)
            except WebConfigError as exc:
                if str(exc) != self._told:
                    self._told = str(exc)
                    log.error("web config changed but cannot be used; the last good one "
                              "stays in force", extra={"fields": {"error": str(exc)}})
            else:
                if (fresh.tls is None) != (self.config.tls is None):
                    log.error("web config: turning TLS on or off needs a restart; the rest "
                              "of the change is in force")
                self.config, self._told = fresh, ""
                log.info("web config reloaded", extra={"fields": {"path": str(self._path)}})
        return self.config

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        config = self.current()
        refused = self._refuse_san(request, config)
        if refused is None and config.users and request.path not in NO_BASIC_AUTH:
            refused = await self._refuse_user(request, config)
        return refused if refused is not None else await handler(request)

    async def on_prepare(self, _request: web.Request, response: web.StreamResponse) -> None:
        """The configured headers, on every response (streamed ones too) before it is
        sent."""
        response.headers.update(self.config.headers)

    @staticmethod
    def _refuse_san(request: web.Request, config: WebConfig) -> web.Response | None:
        tls = config.tls
        if tls is None or not tls.client_allowed_sans:
            return None
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        names = {value for _, value in (cert or {}).get("subjectAltName", ())}
        if names & set(tls.client_allowed_sans):
            return None
        return web.Response(status=403, text="forbidden: the client certificate names none "
                                             "of the allowed SANs (client_allowed_sans)\n")

    async def _refuse_user(self, request: web.Request, config: WebConfig
                           ) -> web.Response | None:
        given = authorized_basic(request.headers.get("Authorization", ""))
        if given is not None:
            user, password = given
            hashed = config.users.get(user)
            ok = await self._check(password.encode(), hashed or _DUMMY)
            if ok and hashed is not None:
                return None
        return web.Response(status=401, text="Unauthorized\n",
                            headers={"WWW-Authenticate": "Basic"})

    async def _check(self, password: bytes, hashed: bytes) -> bool:
        """bcrypt, off the event loop, one at a time (it is costly by design); results
        cached by (hash, password), failures too, as the exporter-toolkit does."""
        key = hashed.hex().encode() + b":" + password.hex().encode()
        if key in self._checked:
            self._checked.move_to_end(key)
            return self._checked[key]
        async with self._bcrypt:
            ok = await asyncio.to_thread(bcrypt.checkpw, password, hashed)
        self._checked[key] = ok
        while len(self._checked) > _CACHE:
            self._checked.popitem(last=False)
        return ok


class TLSContext:
    """The server's SSLContext; at each handshake (its SNI callback) the certificate,
    key and client CA files are looked at, and a changed set is loaded into a new
    context for this connection and the next ones. A set that cannot be loaded is logged
    and the last good context goes on."""

    def __init__(self, tls: TLSServer, current: Callable[[], WebConfig]) -> None:
        self._current = current
        self._tls = tls
        self._stamp = _stamp(tls.files())
        self._told = ""
        self.context = build_context(tls, self._on_hello)

    def _on_hello(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        tls = self._current().tls or self._tls
        stamp = _stamp(tls.files())
        if tls == self._tls and stamp == self._stamp:
            return None
        try:
            context = build_context(tls, self._on_hello)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if str(exc) != self._told:
                self._told = str(exc)
                log.error("web config: the TLS certificate changed but cannot be loaded; the "
                          "last good one is served", extra={"fields": {"error": str(exc)}})
            return None
        self._tls, self._stamp, self._told, self.context = tls, stamp, "", context
        log.info("web config: TLS certificate reloaded")
        sock.context = context
        return None


def build_context(tls: TLSServer,
                  on_hello: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None] | None
                  = None) -> ssl.SSLContext:
    """An SSLContext for `tls`; OSError/ssl.SSLError when a file cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = tls.min_version
    context.maximum_version = tls.max_version
    with _pem_files(tls) as (cert, key):
        context.load_cert_chain(cert, key)
    if tls.client_auth is not ClientAuth.NONE:
        context.verify_mode = (ssl.CERT_REQUIRED if tls.client_auth is ClientAuth.REQUIRED
                               else ssl.CERT_OPTIONAL)
        if tls.client_ca_file:
            context.load_verify_locations(cafile=str(tls.client_ca_file))
        else:
            context.load_verify_locations(cadata=tls.client_ca)
    if tls.ciphers:
        context.set_ciphers(":".join(tls.ciphers))
    if tls.curve:
        context.set_ecdh_curve(tls.curve)
    if on_hello is not None:
        context.sni_callback = on_hello
    return context


@contextlib.contextmanager
def _pem_files(tls: TLSServer) -> Iterator[tuple[str, str]]:
    """Paths of the certificate and key: the files; an inline PEM is written to a private
    temporary file for as long as ssl reads it (it reads paths only; it needs a writable
    $TMPDIR, an emptyDir under a read-only root filesystem)."""
    if tls.cert_file is not None and tls.key_file is not None:
        yield str(tls.cert_file), str(tls.key_file)
        return
    with tempfile.TemporaryDirectory(prefix="web-config-") as tmp:
        def path(file: Path | None, inline: str, name: str) -> str:
            if file is not None:
                return str(file)
            where = Path(tmp) / name
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(inline)
            return str(where)

        yield path(tls.cert_file, tls.cert, "cert.pem"), path(tls.key_file, tls.key, "key.pem")
