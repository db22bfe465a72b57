"""
The I/O of both faces: one call in, one :class:`Reply` (or one typed error) out.

The sync face sends with ``httpx.Client`` (one per hook, for workers); the async face with an
``aiohttp.ClientSession`` shared by every hook on an event loop for one origin, reference-counted and
closed when its last user leaves (a triggerer's thousand triggers share one pool instead of opening a
thousand). Both are configured alike, from :mod:`.settings`: the environment's proxy for the origin,
the same TLS context, :data:`~.settings.MAX_CONNECTIONS` connections, no redirects, ``timeout`` as a
deadline for the whole call. Bodies are read up to a bound, after decompression; an error answer keeps
its status however large its body. Every failure leaves as one of the hook's typed exceptions, mapped by
:mod:`.errors` (the same tables for both libraries).

The async face uses aiohttp rather than httpx for its CPU cost on the triggerer's loop: measured on
the triggerer bench (1,000 triggers, 200 ms answers), httpx's connection pool alone costs about 1.1 ms of
loop CPU per poll, aiohttp about 0.3 ms (see the README's "How it fits together").
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import httpcore
import httpx

from airflow_provider_llmbatch.exceptions import APIConnectionError, VendorAPIError
from airflow_provider_llmbatch.hooks import errors
from airflow_provider_llmbatch.hooks._core import Core, Reply, Request
from airflow_provider_llmbatch.hooks.settings import MAX_CONNECTIONS, ConnSettings, proxy_for, ssl_context

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Bytes of a JSON answer read at most (decompressed): far above any page, bounded for a hostile server."""

ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error body read at most: enough for any message; the status decides the error's kind."""

_CHUNK = 64 * 1024


def _too_large(core: Core, request: Request) -> VendorAPIError:
    return errors.malformed(
        f"the {request.operation} answer is larger than {MAX_BODY_BYTES} bytes",
        vendor=core.vendor,
        conn_id=core.settings.conn_id,
        operation=request.operation,
        status=200,
        request_id=None,
    )


def short_download(core: Core, request: Request, got: int, expected: int) -> VendorAPIError:
    """Return the error for a download whose size is not the one the vendor lists for the file."""
    return APIConnectionError(
        f"the download has {got} bytes, the vendor lists the file at {expected} bytes",
        vendor=core.vendor.name,
        conn_id=core.settings.conn_id,
        operation=request.operation,
        effect="unknown",
    )


def _transport(core: Core, request: Request, exc: BaseException) -> VendorAPIError:
    settings = core.settings
    return errors.transport_error(
        exc,
        vendor=core.vendor,
        conn_id=settings.conn_id,
        operation=request.operation,
        secret=settings.api_key,
    )


# -- sync face: httpx ----------------------------------------------------------------------------------

_DEADLINE: ContextVar[float | None] = ContextVar("llmbatch_call_deadline", default=None)
"""When the sync face's current JSON call must be over (``time.monotonic``), or None."""


def _left(timeout: float | None, late: type[Exception]) -> float | None:
    """Return a socket wait bounded by what is left of the call's deadline; raise ``late`` once it passed."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise late("the call's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits no longer than its call's deadline allows."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own network backend, with every connection bounded by its call's deadline."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        bounded = _left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def new_client(settings: ConnSettings) -> httpx.Client:
    """Return the sync face's client: the environment's proxy for the origin, the shared TLS context."""
    limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS)
    transport = httpx.HTTPTransport(
        verify=ssl_context(),
        limits=limits,
        proxy=proxy_for(settings.base_url),
        trust_env=False,  # what it would read is read once, in settings, the same way as the async face
    )
    # httpx's timeouts bound each socket operation; a deadline for a whole call (an answer trickled a
    # byte at a time) needs each read and write bounded by what is left of it. httpcore takes a network
    # backend for that, which httpx does not pass through: it is set on httpx's own pool.
    pool = transport._pool
    pool._network_backend = _DeadlineBackend(pool._network_backend)
    return httpx.Client(
        transport=transport, timeout=httpx.Timeout(settings.timeout), follow_redirects=False, trust_env=False
    )


@contextmanager
def stream(
    client: httpx.Client,
    core: Core,
    request: Request,
    content: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Iterator[httpx.Response]:
    """
    Send ``request`` and yield its open successful response; any failure raises the typed error.

    A streamed transfer (``content``, or a download read from the yielded response) waits at most
    ``timeout`` per read or write, not for the whole call.

    :param client: the sync face's client.
    :param core: the connection's request builder and reader.
    :param request: the call.
    :param content: a body to stream instead of the request's own.
    :param headers: headers of that body.
    """
    settings = core.settings
    try:
        with client.stream(
            request.method,
            request.url(settings),
            params={**settings.params, **request.params} or None,
            headers=settings.request_headers({**request.headers(), **(headers or {})}),
            content=content if content is not None else request.body,
        ) as response:
            if not response.is_success:
                body = b"".join(_capped(response.iter_bytes(), ERROR_BODY_LIMIT))
                raise core.error(
                    request, response.status_code, response.reason_phrase, response.headers, body
                )
            yield response
    except httpx.HTTPError as exc:
        raise _transport(core, request, exc) from None


def _capped(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """Yield decoded chunks up to ``limit`` bytes in all; stop reading at the limit."""
    got = 0
    for chunk in chunks:
        yield chunk[: limit - got]
        got += len(chunk)
        if got >= limit:
            return


def send(
    client: httpx.Client,
    core: Core,
    request: Request,
    content: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """
    Make one call on the sync face and return its answer read whole (see :func:`stream`).

    A call without a streamed body must be over within ``timeout``, however its answer trickles in.
    """
    token = _DEADLINE.set(time.monotonic() + core.settings.timeout if content is None else None)
    try:
        with stream(client, core, request, content, headers) as response:
            body = b"".join(_capped(response.iter_bytes(), MAX_BODY_BYTES + 1))
            if len(body) > MAX_BODY_BYTES:
                raise _too_large(core, request)
            return Reply(response.status_code, response.headers, body)
    finally:
        _DEADLINE.reset(token)


# -- async face: aiohttp, one session per event loop and origin -----------------------------------------


@dataclass
class SharedSession:
    """
    What the hooks on one loop share for one origin.

    :param session: the aiohttp session (no credentials: the key travels per request).
    :param proxy: the environment's proxy for the origin (without credentials), or None.
    :param proxy_headers: ``Proxy-Authorization`` with the proxy's credentials, if its URL carried them.
    :param slots: one per connection; a caller holding one never waits for a connection inside aiohttp.
    """

    session: aiohttp.ClientSession
    proxy: str | None
    proxy_headers: Mapping[str, str] | None
    slots: asyncio.Semaphore


@dataclass
class _Entry:
    ready: asyncio.Future[SharedSession]
    refs: int = 0


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Entry]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()  # loops of different threads may touch the registry at once


async def _new_session(origin: str) -> SharedSession:
    # Read before the session exists: a proxy that is refused must not leave a session unclosed.
    proxy, proxy_headers = _split_credentials(proxy_for(origin))
    # The TLS context reads CA files from disk: built in a worker thread, off the loop.
    context = await asyncio.to_thread(ssl_context)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=context),
        cookie_jar=aiohttp.DummyCookieJar(),
        # Proxies are read once per origin (settings.proxy_for): aiohttp's own look-up costs a thread
        # hop per request and ignores ALL_PROXY.
        trust_env=False,
    )
    return SharedSession(session, proxy, proxy_headers, asyncio.Semaphore(MAX_CONNECTIONS))


def _split_credentials(proxy: str | None) -> tuple[str | None, dict[str, str] | None]:
    """Return a proxy URL without its ``user:password@``, and those credentials as proxy headers."""
    if proxy is None:
        return None, None
    parts = urlsplit(proxy)
    if parts.username is None:
        return proxy, None
    # As a header, the way httpx sends them: aiohttp's proxy_auth/BasicAuth are deprecated (gone in 4.0).
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    header = {"Proxy-Authorization": f"Basic {base64.b64encode(credentials).decode('ascii')}"}
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(), header


async def acquire(origin: str) -> SharedSession:
    """Return the shared session for ``origin`` on the running loop, creating it on first use."""
    loop = asyncio.get_running_loop()
    with _LOCK:
        entries = _SESSIONS.setdefault(loop, {})
        entry = entries.get(origin)
        creator = entry is None
        if entry is None:
            entry = entries[origin] = _Entry(ready=loop.create_future())
        entry.refs += 1
    if creator:
        try:
            shared = await _new_session(origin)
        except BaseException as exc:
            with _LOCK:
                if entries.get(origin) is entry:
                    del entries[origin]
            if isinstance(exc, Exception):
                entry.ready.set_exception(exc)
                entry.ready.exception()  # retrieved: the creator raises it here
            else:
                entry.ready.cancel()
            raise
        entry.ready.set_result(shared)
    return await asyncio.shield(entry.ready)


async def release(loop: asyncio.AbstractEventLoop, origin: str) -> None:
    """Give back one reference to a shared session; close it when it was the last."""
    with _LOCK:
        entries = _SESSIONS.get(loop) or {}
        entry = entries.get(origin)
        if entry is None:
            return
        entry.refs -= 1
        last = entry.refs <= 0
        if last:
            del entries[origin]
    ready = entry.ready
    usable = ready.done() and not ready.cancelled() and ready.exception() is None
    # From another loop the session cannot be closed cleanly; its sockets go with the garbage.
    if last and usable and asyncio.get_running_loop() is loop:
        await ready.result().session.close()


def shared_sessions(loop: asyncio.AbstractEventLoop | None = None) -> dict[str, int]:
    """Return the shared sessions on ``loop`` (default: the running one) by origin, with their users."""
    loop = loop or asyncio.get_running_loop()
    with _LOCK:
        return {origin: entry.refs for origin, entry in (_SESSIONS.get(loop) or {}).items()}


async def asend(shared: SharedSession, core: Core, request: Request) -> Reply:
    """Make one call on the async face and return its answer read whole, or raise the typed error."""
    settings = core.settings
    url = request.url(settings)
    headers = settings.request_headers(request.headers())
    if shared.proxy_headers and url.startswith("http:"):
        # aiohttp sends proxy_headers with the CONNECT of a tunnel only; plain HTTP talks to the proxy.
        headers.update(shared.proxy_headers)
    try:
        async with shared.session.request(
            request.method,
            url,
            params={**settings.params, **request.params} or None,
            headers=headers,
            data=request.body,
            proxy=shared.proxy,
            proxy_headers=shared.proxy_headers,
            timeout=aiohttp.ClientTimeout(total=settings.timeout),
            allow_redirects=False,
        ) as response:
            # 2xx only, as on the sync face: aiohttp's ``ok`` counts a redirect (not followed) as success.
            success = 200 <= response.status < 300
            limit = MAX_BODY_BYTES + 1 if success else ERROR_BODY_LIMIT
            body = bytearray()
            while len(body) < limit and (chunk := await response.content.read(_CHUNK)):
                body += chunk
            if not success:
                reason = response.reason or ""
                raise core.error(request, response.status, reason, response.headers, bytes(body[:limit]))
            if len(body) > MAX_BODY_BYTES:
                raise _too_large(core, request)
            return Reply(response.status, response.headers, bytes(body))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _transport(core, request, exc) from None
