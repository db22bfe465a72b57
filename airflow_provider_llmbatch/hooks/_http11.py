"""
A lean HTTP/1.1 client for the async face's small JSON calls: polls, cancels, listings.

A triggerer runs every poll of every batch on one event loop. Through ``httpx`` a poll costs about a
millisecond of loop CPU (``bench/``), most of it in machinery these calls never use (cookies, auth
flows, redirects, URL models, a generic pool); at hundreds of polls a second that is the loop's lag.
This client speaks only what the calls need, on an :class:`asyncio.Protocol`: keep-alive connections,
``Content-Length``, chunked and read-to-close bodies, gzip/deflate, TLS set up as ``httpx`` sets it up
(certifi, ``SSL_CERT_FILE``/``SSL_CERT_DIR``), for about a tenth of that CPU and far fewer objects
for the garbage collector. Uploads, downloads, and any origin reached through a proxy stay on ``httpx``.

Failures are raised as ``httpx``'s transport exceptions, so retries, classification and messages are
the same on both paths. Header values are checked for line breaks without being echoed: one of them
is the API key.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import httpx

KEEPALIVE_EXPIRY = 15.0
"""Seconds an idle connection is kept; servers commonly drop idle ones after 60 seconds or more."""

MAX_HEAD_BYTES = 64 * 1024
"""The largest status line plus headers accepted."""

MAX_BODY_BYTES = 32 * 1024 * 1024
"""The largest body accepted: these calls answer kilobytes; a runaway proxy must not exhaust memory."""

_NO_BODY_STATUS = frozenset({204, 304})
_CRLF = b"\r\n"


@dataclass(slots=True)
class LeanResponse:
    """
    A finished response: what the hook's core reads (the same attributes as ``httpx.Response``).

    :param status_code: the HTTP status.
    :param reason_phrase: the status line's reason phrase.
    :param headers: the response headers (case-insensitive).
    :param content: the whole (decoded) body.
    """

    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    content: bytes

    @property
    def is_success(self) -> bool:
        """Return True for a 2xx status."""
        return 200 <= self.status_code < 300


def proxied(origin: str) -> bool:
    """Return True when the environment routes ``origin`` through a proxy (as ``httpx`` would read it)."""
    parts = urlsplit(origin)
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.netloc)


def ssl_context() -> ssl.SSLContext:
    """Return a client TLS context as ``httpx`` builds it, offering HTTP/1.1 only (reads CA files)."""
    context = httpx.create_ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


def request_target(base_url: str, path: str, params: Mapping[str, str] | None = None) -> str:
    """
    Return the request target (path and query) of ``path`` under ``base_url``, percent-encoded.

    :param base_url: the API base URL; its path prefixes ``path``.
    :param path: the path under the base URL (segments already quoted).
    :param params: query parameters.
    """
    target = quote(urlsplit(base_url).path + path, safe=_PATH_SAFE) or "/"
    if params:
        target += "?" + urlencode(params, quote_via=quote)
    return target


def _check_header(name: str, value: str) -> None:
    if any(c in name for c in "\r\n\0:") or any(c in value for c in "\r\n\0"):
        # Never the value: it may be the API key.
        raise httpx.LocalProtocolError(f"header {name!r} has a line break or NUL in its name or value")


def encode_request(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    """
    Return the bytes of one HTTP/1.1 request.

    :param method: the method.
    :param target: the path and query, already percent-encoded.
    :param host: the ``Host`` header (host, and port when not the scheme's default).
    :param headers: further headers.
    :param body: the body, if any; a POST without one says ``Content-Length: 0``.
    """
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise httpx.LocalProtocolError(f"invalid request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept: */*", "Accept-Encoding: gzip, deflate"]
    for name, value in headers.items():
        _check_header(name, value)
        lines.append(f"{name}: {value}")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def _decode(encoding: str, body: bytes) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding == "gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise httpx.DecodingError(f"the {encoding} body does not decode: {exc}") from None
    if encoding in ("", "identity"):
        return body
    raise httpx.DecodingError(f"unsupported content encoding {encoding!r}")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: a byte buffer the loop fills, read by one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0

    # -- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- state ----------------------------------------------------------------------------------

    def reusable(self, now: float) -> bool:
        """Return True if the connection is open, quiet (nothing unread) and not idle for too long."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self._eof
            and not self._buffer
            and now - self.idle_since < KEEPALIVE_EXPIRY
        )

    def close(self) -> None:
        """Close the connection (the socket goes at the loop's next turn)."""
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the loop has let go of the socket."""
        await self._closed

    # -- reading --------------------------------------------------------------------------------

    async def _more(self, what: str) -> None:
        if self._eof:
            if isinstance(self._error, OSError):
                raise httpx.ReadError(str(self._error) or type(self._error).__name__)
            raise httpx.RemoteProtocolError(what)
        waiter = self._waiter = self._loop.create_future()
        await waiter

    async def _head(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                return head
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("the response headers are too long")
            await self._more("Server disconnected without sending a response.")

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._more("peer closed connection without sending complete message body")
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _line(self) -> bytes:
        while True:
            end = self._buffer.find(_CRLF)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("a chunk header is too long")
            await self._more("peer closed connection without sending complete message body")

    async def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = await self._line()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx.RemoteProtocolError("malformed chunk size") from None
            if size < 0 or len(body) + size > MAX_BODY_BYTES:
                raise httpx.RemoteProtocolError("the response body is too large")
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return bytes(body)
            body += await self._exactly(size)
            if await self._exactly(2) != _CRLF:
                raise httpx.RemoteProtocolError("malformed chunk")

    async def _to_eof(self) -> bytes:
        while not self._eof:
            if len(self._buffer) > MAX_BODY_BYTES:
                raise httpx.RemoteProtocolError("the response body is too large")
            waiter = self._waiter = self._loop.create_future()
            await waiter
        if isinstance(self._error, OSError):
            raise httpx.ReadError(str(self._error) or type(self._error).__name__)
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def exchange(self, data: bytes, method: str, seconds: float) -> tuple[LeanResponse, bool]:
        """Send one request and read its response; return it and whether the connection can be reused."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise httpx.WriteError("the connection is closed")
        transport.write(data)
        try:
            async with asyncio.timeout(seconds):
                while True:
                    status, reason, headers, keep = _parse_head(await self._head())
                    if status >= 200 or status == 101:
                        break  # 1xx answers other than a protocol switch precede the real one
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the response headers") from None
        try:
            async with asyncio.timeout(seconds):
                body, framed = await self._body(method, status, headers)
        except TimeoutError:
            raise httpx.ReadTimeout("timed out reading the response body") from None
        encoding = headers.get("content-encoding")
        if encoding:
            body = _decode(encoding, body)
        return LeanResponse(status, reason, headers, body), keep and framed

    async def _body(self, method: str, status: int, headers: httpx.Headers) -> tuple[bytes, bool]:
        if method == "HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200:
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked(), True
        length = headers.get("content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                raise httpx.RemoteProtocolError("malformed Content-Length") from None
            if size < 0 or size > MAX_BODY_BYTES:
                raise httpx.RemoteProtocolError("the response body is too large")
            return await self._exactly(size), True
        return await self._to_eof(), False


def _parse_head(head: bytes) -> tuple[int, str, httpx.Headers, bool]:
    """Return (status, reason, headers, keep-alive) of a status line plus headers."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise httpx.RemoteProtocolError("malformed status line")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    raw: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise httpx.RemoteProtocolError("malformed header line")
        raw.append((name, value.strip()))
    headers = httpx.Headers(raw)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep = "close" not in tokens and (parts[0] != b"HTTP/1.0" or "keep-alive" in tokens)
    return status, reason, headers, keep


class LeanPool:
    """
    Keep-alive connections to one origin, shared by every caller on one event loop.

    :param origin: ``scheme://host[:port]``.
    :param timeout: seconds for the connect, for the response headers and for the body, each.
    :param max_connections: connections open at most; further requests wait for one.
    :param context: the TLS context for ``https`` (see :func:`ssl_context`).
    """

    def __init__(
        self, origin: str, timeout: float, max_connections: int, context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {origin!r}")
        self._tls = parts.scheme == "https"
        if self._tls and context is None:
            raise ValueError("an https origin needs a TLS context")
        self._context = context
        self._hostname = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def connections(self) -> int:
        """Return the connections open now (idle or busy)."""
        return len(self._open)

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> LeanResponse:
        """
        Send one request and return its whole response.

        :param method: the method.
        :param target: the path and query, already percent-encoded.
        :param headers: the request's headers (with the key: they are never logged or echoed).
        :param body: the body, if any.
        :raises httpx.TransportError: the subclass ``httpx`` would raise for the same failure.
        """
        if self._closed:
            raise httpx.ConnectError("the connection pool is closed")
        data = encode_request(method, target, self.host_header, headers, body)
        async with self._slots:
            connection = self._take_idle() or await self._connect()
            try:
                response, reusable = await connection.exchange(data, method, self._timeout)
            except BaseException:
                self._drop(connection)
                raise
            if reusable and not self._closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                self._drop(connection)
            return response

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable(now):
                return connection
            self._drop(connection)
        return None

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop),
                    self._hostname,
                    self._port,
                    ssl=self._context if self._tls else None,
                    server_hostname=self._hostname if self._tls else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("timed out connecting") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        self._open.add(connection)
        return connection

    async def aclose(self) -> None:
        """Close every connection; requests in flight finish, then their connections close too."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._drop(connection)
        if idle:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in idle], timeout=5)
